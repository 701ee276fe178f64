"""Conversion speed and memory of `dairllm convert` (benchmark, not CI).

    python bench/bench_convert.py [--dim 2048 --hidden 5632 --layers 8 --vocab 32000] [--keep DIR]

Writes a random bfloat16 Llama checkpoint (sharded safetensors, written with NumPy: no torch
needed), converts it to each --weights type in a child process, and reports seconds, MiB/s of
float32-equivalent input, output size and the child's peak RSS (memory should stay near the
chunk size, not the model size).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def save_safetensors(path: Path, tensors: dict) -> None:
    """bfloat16 tensors (given as float32 arrays) in the safetensors layout."""
    header, blobs, offset = {}, [], 0
    for name, x in tensors.items():
        raw = (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(x.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def make_checkpoint(folder: Path, dim: int, hidden: int, layers: int, vocab: int,
                    heads: int, kv_heads: int) -> int:
    rng = np.random.default_rng(0)
    hd = dim // heads

    def r(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02)

    (folder / "config.json").write_text(json.dumps(dict(
        model_type="llama", hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0,
        hidden_act="silu", tie_word_embeddings=False)))
    total = 0
    shard = {"model.embed_tokens.weight": r(vocab, dim)}
    for l in range(layers):
        p = f"model.layers.{l}."
        shard.update({p + "self_attn.q_proj.weight": r(dim, dim),
                      p + "self_attn.k_proj.weight": r(kv_heads * hd, dim),
                      p + "self_attn.v_proj.weight": r(kv_heads * hd, dim),
                      p + "self_attn.o_proj.weight": r(dim, dim),
                      p + "mlp.gate_proj.weight": r(hidden, dim),
                      p + "mlp.up_proj.weight": r(hidden, dim),
                      p + "mlp.down_proj.weight": r(dim, hidden),
                      p + "input_layernorm.weight": np.ones(dim, np.float32),
                      p + "post_attention_layernorm.weight": np.ones(dim, np.float32)})
        if l % 4 == 3 or l == layers - 1:
            if l == layers - 1:
                shard.update({"model.norm.weight": np.ones(dim, np.float32),
                              "lm_head.weight": r(vocab, dim)})
            save_safetensors(folder / f"model-{l // 4:05d}.safetensors", shard)
            total += sum(x.size for x in shard.values()) * 2
            shard = {}
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--weights", nargs="+", default=["q40", "f16"])
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument("--make-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.make_only is not None:        # child: write the checkpoint (keeps the parent small)
        size = make_checkpoint(args.make_only, args.dim, args.hidden, args.layers, args.vocab,
                               args.heads, args.kv_heads)
        print(size)
        return 0
    tmp = None
    if args.keep is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = args.keep
        work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    hf.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    # In a child: a parent holding the arrays would inflate the children's peak RSS (fork).
    shape = [f"--dim={args.dim}", f"--hidden={args.hidden}", f"--layers={args.layers}",
             f"--vocab={args.vocab}", f"--heads={args.heads}", f"--kv-heads={args.kv_heads}"]
    made = subprocess.run([sys.executable, __file__, *shape, "--make-only", str(hf)],
                          check=True, capture_output=True, text=True)
    size = int(made.stdout.split()[-1])
    print(f"checkpoint: {size / 2**20:.0f} MiB bf16 in {time.perf_counter() - t0:.1f} s")
    for w in args.weights:
        out = work / f"model_{w}.m"
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "dairllm", "convert", str(hf), "-o",
                                  str(out), "--weights", w, "--quiet"], stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)       # this child's own rusage
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            raise SystemExit(f"convert failed with exit code {child.returncode}")
        dt = time.perf_counter() - t0
        rss = usage.ru_maxrss / 1024
        print(f"{w}: {dt:.1f} s, {2 * size / 2**20 / dt:.0f} MiB/s of float32 input, "
              f"output {out.stat().st_size / 2**20:.0f} MiB, peak RSS {rss:.0f} MiB")
        if args.keep is None:
            out.unlink()
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
