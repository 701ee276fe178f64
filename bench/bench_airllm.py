"""AirLLM next to dairllm's layer streaming, on the same random Llama weights (benchmark, not CI).

    python bench/bench_airllm.py --python-airllm /path/to/venv-with-airllm/bin/python

1. Makes a random `transformers` LlamaForCausalLM of Llama-3.2-1B shape (or --layers fewer),
   saves it in float16 with a small WordLevel tokenizer (AirLLM needs one in the folder).
2. Converts that folder with `dairllm convert` to F16 (the same bytes AirLLM streams) and Q40.
3. AirLLM (`AutoModel.from_pretrained(folder, device="cpu")`, then `generate(max_new_tokens=N,
   use_cache=True)`) in its own process: it keeps one layer in memory at a time and re-reads
   every layer for every token.
4. dairllm on both files at its minimum RAM budget (also one streamed layer at a time) and at
   100%, with the same prompt length and new-token count; each in a child process; the page
   cache is cleared for the files first.
Reports seconds per generated token and peak RSS for each.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_hf_model(folder: Path, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                      vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0,
                      tie_word_embeddings=False, torch_dtype="float16")
    torch.manual_seed(0)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(1000)}
    vocab["[UNK]"] = 1000
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="w1",
                            eos_token="w2").save_pretrained(folder)


def evict(path: Path) -> None:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def airllm_child(folder: str, prompt: int, new: int) -> dict:
    import torch
    from airllm import AutoModel

    model = AutoModel.from_pretrained(folder, device="cpu")
    ids = torch.tensor([[1 + i % 900 for i in range(prompt)]])
    evict(Path(folder))
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, use_cache=True, return_dict_in_generate=True)
    dt = time.perf_counter() - t0
    seqs = out.sequences if hasattr(out, "sequences") else out
    return {"engine": "airllm", "seconds": dt, "new_tokens": int(seqs.shape[1] - prompt),
            "peak_rss": peak_rss()}


def dairllm_child(model_path: str, budget: str, prompt: int, new: int) -> dict:
    import numpy as np

    from dairllm import Model

    evict(Path(model_path))
    t0 = time.perf_counter()
    with Model.open(model_path, max_seq_len=prompt + new + 1, max_batch=prompt,
                    ram_budget=budget, stream_options=dict(drop_cache=True)) as m:
        logits = m.forward(np.arange(1, prompt + 1) % 900, 0)
        tok = int(np.argmax(logits[-1]))
        for i in range(new - 1):
            tok = int(np.argmax(m.forward([tok], prompt + i)[-1]))
        dt = time.perf_counter() - t0
        stats = m.weights.stats.as_dict()
    return {"engine": f"dairllm {Path(model_path).stem} {budget}", "seconds": dt,
            "new_tokens": new, "peak_rss": peak_rss(), "bytes_read": stats["bytes_read"]}


def child(cmd: list, timeout: float) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"engine": " ".join(cmd[2:5]), "error": out.stderr[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python-airllm", default=sys.executable,
                    help="a python with airllm installed (torch, transformers)")
    ap.add_argument("--dir", default=os.path.expanduser("~/.cache/dairllm/bench/airllm-llama1b"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "airllm":
            r = airllm_child(rest[0], args.prompt, args.new)
        else:
            r = dairllm_child(rest[0], rest[1], args.prompt, args.new)
        print(json.dumps(r))
        return 0

    folder = Path(args.dir)
    if not (folder / "config.json").exists():
        print(f"making the random HF model in {folder} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        make_hf_model(folder, args.layers)
    files = {}
    for w in ("f16", "q40"):
        files[w] = folder.parent / f"{folder.name}-{w}.m"
        if not files[w].exists():
            subprocess.run([sys.executable, "-m", "dairllm", "convert", str(folder), "-o",
                            str(files[w]), "--weights", w, "--quiet"], check=True)
    base = [__file__, "--prompt", str(args.prompt), "--new", str(args.new), "--child"]
    results = [child([args.python_airllm, *base, "airllm", str(folder)], args.timeout)]
    for w in ("f16", "q40"):
        for budget in ("1", "100%"):          # "1" byte: refused, so use the reported minimum
            b = budget if budget != "1" else minimum_budget(files[w], args)
            results.append(child([sys.executable, *base, "dairllm", str(files[w]), b],
                                 args.timeout))
    print(f"\nrandom Llama-3.2-1B-shaped model ({args.layers} layers), prompt {args.prompt}, "
          f"{args.new} new tokens, page cache cleared first")
    for r in results:
        if "error" in r:
            print(f"  {r['engine']}: FAILED\n{r['error']}")
            continue
        print(f"  {r['engine']:<40} {r['seconds'] / r['new_tokens']:7.2f} s/token   "
              f"peak RSS {r['peak_rss'] / 2**30:5.2f} GiB")
    return 0


def minimum_budget(path: Path, args) -> str:
    from dairllm.formats.modelfile import ModelFile
    from dairllm.engine.state import run_state_bytes
    from dairllm.store import make_residency

    with ModelFile(path, max_seq_len=args.prompt + args.new + 1) as mf:
        return str(make_residency(mf.layout, "100%", run_state_bytes(mf.header, args.prompt)).min_bytes)


if __name__ == "__main__":
    sys.exit(main())
