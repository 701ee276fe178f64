"""`dairllm bench`: end-to-end prompt and decode speed on a synthetic Llama-3.2-1B-shaped Q40 model,
peak memory, the kernel benchmarks, and llama.cpp on the very same weight bytes, side by side.

Q40 blocks are byte-identical to GGUF Q4_0 (f16 scale, 16 bytes of nibbles: element j in the low
nibble of byte j, element j+16 in the high one, value (q - 8) * d), and LLAMA q/k rows are in the
interleaved rotary order in both formats, so the .m tensors are re-wrapped as GGUF without
requantizing. Each engine runs in its own child process (clean peak-RSS figures, no shared
state); both see the same file pages in the page cache.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DairError

HELP = "benchmark prompt/decode tokens/s, memory and kernels, next to llama.cpp on the same weights"

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a LLAMA Q40 .m file or a GGUF file (default: a synthetic model, made once)")
    p.add_argument("--preset", default="llama-3.2-1b", help="synthetic model shape (default llama-3.2-1b)")
    p.add_argument("--gguf-type", choices=sorted(LLAMA_CPP_FTYPES),
                   help="benchmark a synthetic GGUF of this llama.cpp file type instead of the Q40 "
                        ".m model (made once by llama.cpp's quantizer from an F16 GGUF; needs the "
                        "bench extra)")
    p.add_argument("--cache-dir", default=os.environ.get("DAIRLLM_CACHE", "~/.cache/dairllm"),
                   help="where synthetic models and GGUF copies are kept")
    p.add_argument("--nthreads", type=int, default=None, help="threads for every engine (default all)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (default 128)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens to decode (default 64)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the engines alternately this many times, keep each one's best run")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel benchmarks")
    p.add_argument("--no-repack", action="store_true",
                   help="skip the run on Q40x8 weights (generate --repack; its copy is made once)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--ram-budget", default=None,
                   help="streaming instead: run dairllm alone under this RAM budget and report "
                        "decode and prompt speed against the disk bound (bytes that had to be "
                        "read / the disk's speed measured in the same run)")
    p.add_argument("--drop-cache", action="store_true",
                   help="with --ram-budget: start from a cold page cache and evict streamed bytes "
                        "after use, as on a machine whose RAM cannot cache the model")
    p.add_argument("--child", choices=["dairllm", "dairllm-x8", "llamacpp", "streaming"],
                   help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)


# ---------------------------------------------------------------------------------------------
# Model files

# llama.cpp file types `--gguf-type` can make (llama_cpp.LLAMA_FTYPE_MOSTLY_<name>)
LLAMA_CPP_FTYPES = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
                    "q8_0": "Q8_0"}


def synthetic_model(args) -> Path:
    if args.gguf_type:
        return synthetic_gguf(args)
    return _synthetic_m(args, "q40")


def _synthetic_m(args, weights: str) -> Path:
    cache = Path(args.cache_dir).expanduser() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{args.preset}-{weights}.m"
    if not path.exists():
        from ..synth import make_model

        log.warning("making synthetic %s %s model at %s (once)", args.preset, weights.upper(), path)
        make_model(path, None, args.preset, weights)
    return path


def synthetic_gguf(args) -> Path:
    """A synthetic model as llama.cpp quantizes it: the F16 .m re-wrapped as an F16 GGUF, then
    llama_model_quantize to the file type asked for (K-quant mixes included), made once."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--gguf-type needs llama.cpp's quantizer: pip install 'dairllm[bench]'")
    f16 = gguf_copy(_synthetic_m(args, "f16"))
    name = LLAMA_CPP_FTYPES[args.gguf_type]
    out = f16.with_name(f"{args.preset}-{args.gguf_type}.gguf")
    if not out.exists():
        import ctypes

        log.warning("quantizing %s to %s with llama.cpp (once)", f16, name)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = os.cpu_count() or 1
        tmp = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), ctypes.byref(params)):
            raise DairError(f"llama.cpp could not quantize {f16} to {name}")
        tmp.rename(out)
    return out


def write_gguf(model_path: Path, out: Path) -> Path:
    """Re-wrap a LLAMA Q40 or F16 .m file as GGUF (llama architecture, Q4_0 or F16), reusing the
    blocks as they are."""
    import gguf

    from .. import _ops
    from ..engine.state import rope_args
    from ..formats.modelfile import Arch, ModelFile, RopeType
    from ..formats.quant import FloatType

    mf = ModelFile(model_path)
    h = mf.header
    kinds = {FloatType.Q40: (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
             FloatType.F16: (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16)}
    if h.arch is not Arch.LLAMA or h.weight_type not in kinds:
        raise ConfigError(f"{model_path}: the llama.cpp comparison needs a LLAMA Q40 or F16 "
                          f"model, this is {h.arch.name} {h.weight_type.name}")
    raw_type, file_type = kinds[h.weight_type]
    tmp = out.with_suffix(".gguf.part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(h.orig_seq_len)
    w.add_embedding_length(h.dim)
    w.add_block_count(h.n_layers)
    w.add_feed_forward_length(h.hidden_dim)
    w.add_head_count(h.n_heads)
    w.add_head_count_kv(h.n_kv_heads)
    w.add_rope_dimension_count(h.head_dim)
    w.add_key_length(h.head_dim)
    w.add_value_length(h.head_dim)
    w.add_layer_norm_rms_eps(h.norm_epsilon)
    w.add_rope_freq_base(h.rope_theta)
    w.add_file_type(file_type)
    w.add_vocab_size(h.vocab_size)
    _add_placeholder_vocab(w, h.vocab_size)
    w.add_tensor("token_embd.weight", mf.f32("embedding"))
    if h.rope_scaling_factor != 1.0 and h.effective_rope_type is not RopeType.FALCON:
        # llama.cpp takes Llama-3.1 scaling as per-frequency divisors
        plain = _ops.rope_frequencies(h.head_dim, *rope_args(_unscaled(h)))
        scaled = _ops.rope_frequencies(h.head_dim, *rope_args(h))
        w.add_tensor("rope_freqs.weight", (plain / scaled).astype(np.float32))
    names = dict(q="attn_q", k="attn_k", v="attn_v", wo="attn_output", w1="ffn_gate",
                 w2="ffn_down", w3="ffn_up")
    for l in range(h.n_layers):
        w.add_tensor(f"blk.{l}.attn_norm.weight", mf.f32(f"layers.{l}.attn_norm"))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{l}.{theirs}.weight", _matrix(mf, f"layers.{l}.{ours}", raw_type),
                         raw_dtype=raw_type)
        w.add_tensor(f"blk.{l}.ffn_norm.weight", mf.f32(f"layers.{l}.ffn_norm"))
    w.add_tensor("output_norm.weight", mf.f32("final_norm"))
    w.add_tensor("output.weight", _matrix(mf, "wcls", raw_type), raw_dtype=raw_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def _matrix(mf, name: str, raw_type) -> np.ndarray:
    """A matrix's bytes as the GGUF writer takes them: F16 as float16 [rows, cols], blocks raw."""
    import gguf

    t = mf.layout[name]
    raw = mf.raw(t)
    if raw_type == gguf.GGMLQuantizationType.F16:
        return raw.view(np.float16).reshape(t.rows, t.cols)
    return raw


def _unscaled(h):
    from dataclasses import replace

    return replace(h, rope_scaling_factor=1.0)


def _add_placeholder_vocab(w, vocab: int) -> None:
    """A SentencePiece-style vocabulary of the right size (we feed token ids, never text)."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"<t{i}>" for i in range(len(tokens), vocab)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens[:vocab])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types[:vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)


def gguf_copy(model_path: Path) -> Path:
    """The GGUF file llama.cpp runs: the model itself when it is one, else a re-wrapped copy."""
    from ..formats.gguf import has_gguf_magic

    if has_gguf_magic(model_path):
        return model_path
    out = model_path.with_suffix(".gguf")
    if not out.exists() or out.stat().st_mtime < model_path.stat().st_mtime:
        log.warning("writing the GGUF copy %s", out)
        write_gguf(model_path, out)
    return out


# ---------------------------------------------------------------------------------------------
# Children: one engine each, results as one JSON line on stdout

def _memory() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _prompt(vocab: int, n: int) -> list[int]:
    return np.random.default_rng(0).integers(3, vocab, size=n).tolist()


def child_dairllm(args) -> dict:
    from ..modes import Model

    before = _memory()
    P, G = args.prompt_tokens, args.gen_tokens
    repack = args.child == "dairllm-x8"
    with Model.open(args.model, max_seq_len=P + G + 8, nthreads=args.nthreads, repack=repack) as m:
        prompt = _prompt(m.vocab_size, P)
        list(m.generate(prompt[:8], steps=4))                    # warm-up: page weights in
        tokens = list(m.generate(prompt, steps=G))
        st = m.stats
        mem = _memory()
        return dict(engine=args.child, prompt_tokens_per_s=st.prompt_tokens_per_s, decode_tokens_per_s=st.decode_tokens_per_s,
                    generated=len(tokens), peak_rss=mem.get("VmHWM"), rss_file=mem.get("RssFile"),
                    rss_anon=mem.get("RssAnon"), rss_anon_before_open=before.get("RssAnon"),
                    state_bytes=m.state.nbytes, kv_bytes=m.state.kv_nbytes,
                    nthreads=_threads())


def _threads() -> int:
    from .. import _ops

    return int(_ops.get_num_threads())


def child_llamacpp(args) -> dict:
    from llama_cpp import Llama

    P, G = args.prompt_tokens, args.gen_tokens
    n = args.nthreads or os.cpu_count()
    llm = Llama(model_path=args.gguf, n_ctx=P + G + 8, n_batch=max(P, 8), n_ubatch=max(P, 8),
                n_threads=n, n_threads_batch=n, use_mmap=True, verbose=False)
    prompt = _prompt(llm.n_vocab(), P)
    llm.eval(prompt[:8])                                          # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t0
    # Decode: one token per forward (the last row's logits are computed as in generation; the
    # token values do not change the work, so feed the prompt's tokens again).
    t0 = time.perf_counter()
    for i in range(G - 1):
        llm.eval([prompt[i % P]])
    decode_s = time.perf_counter() - t0
    mem = _memory()
    return dict(engine="llama.cpp", prompt_tokens_per_s=P / prompt_s, decode_tokens_per_s=(G - 1) / decode_s,
                peak_rss=mem.get("VmHWM"), rss_file=mem.get("RssFile"),
                rss_anon=mem.get("RssAnon"), nthreads=n)


def child_streaming(args) -> dict:
    """A prompt in one pass, then decoded tokens one by one, under the RAM budget: times and the
    layer store's counts for each phase."""
    from ..modes import Model
    from ..store.disk import drop_from_page_cache
    from ..store.store import disk_read_bytes

    P, G = args.prompt_tokens, args.gen_tokens
    if args.drop_cache:
        drop_from_page_cache(args.model)
    with Model.open(args.model, max_seq_len=P + G + 8, max_batch=P, nthreads=args.nthreads,
                    ram_budget=args.ram_budget,
                    stream_options={"drop_cache": args.drop_cache}) as m:
        st = m.weights.stats
        prompt = _prompt(m.vocab_size, P)
        d0, b0, t0 = disk_read_bytes(), st.bytes_read, time.perf_counter()
        token = int(np.argmax(m.forward(prompt, 0)[-1]))
        prompt_s = time.perf_counter() - t0
        d1, b1, t1 = disk_read_bytes(), st.bytes_read, time.perf_counter()
        for i in range(G):
            token = int(np.argmax(m.forward([token], P + i)[-1]))
        decode_s = time.perf_counter() - t1
        d2, b2 = disk_read_bytes(), st.bytes_read
        return dict(engine="dairllm", prompt_tokens_per_s=P / prompt_s,
                    decode_tokens_per_s=G / decode_s, prompt_bytes=b1 - b0,
                    prompt_disk_bytes=d1 - d0, decode_bytes_per_token=(b2 - b1) / G,
                    decode_disk_bytes_per_token=(d2 - d1) / G, prompt_s=prompt_s,
                    decode_s=decode_s, peak_rss=_memory().get("VmHWM"),
                    summary=m.weights.residency.summary(), stats=st.as_dict(),
                    nthreads=_threads())


def run_streaming(args, model: Path) -> int:
    """`bench --ram-budget`: the streamed run between two measurements of the disk."""
    from ..store.disk import streaming_speed

    disk = [streaming_speed(model, 256 << 20)]
    r = _spawn(args, "streaming", model)
    disk.append(streaming_speed(model, 256 << 20))
    bw = sum(disk) / 2
    r.update(disk_bytes_per_s=disk, model=str(model), ram_budget=args.ram_budget,
             drop_cache=args.drop_cache,
             decode_bound_tokens_per_s=bw / max(r["decode_bytes_per_token"], 1),
             prompt_bound_s=r["prompt_bytes"] / bw)
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return 0
    gb = 1e9
    print(f"model: {model}, RAM budget {args.ram_budget}"
          f"{', page cache dropped' if args.drop_cache else ''}: {r['summary']}")
    print(f"disk: {disk[0] / gb:.2f} GB/s before, {disk[1] / gb:.2f} after (O_DIRECT, the faster "
          f"of 1 and 8 reads at once)")
    print(f"prompt: {r['prompt_tokens_per_s']:.1f} tokens/s, {r['prompt_bytes'] / gb:.2f} GB "
          f"needed ({r['prompt_disk_bytes'] / gb:.2f} from disk): "
          f"{r['prompt_bound_s'] / r['prompt_s']:.0%} of the disk bound")
    print(f"decode: {r['decode_tokens_per_s']:.2f} tokens/s, "
          f"{r['decode_bytes_per_token'] / gb:.3f} GB/token needed "
          f"({r['decode_disk_bytes_per_token'] / gb:.3f} from disk): "
          f"{r['decode_tokens_per_s'] / r['decode_bound_tokens_per_s']:.0%} of the disk bound "
          f"({r['decode_bound_tokens_per_s']:.2f} tokens/s); peak RSS "
          f"{r['peak_rss'] / 2**30:.2f} GiB")
    return 0


def _spawn(args, which: str, model: Path, gguf_path: "Path | None" = None) -> dict:
    cmd = [sys.executable, "-m", "dairllm", "bench", "--child", which, "--model", str(model),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    if args.ram_budget is not None:
        cmd += ["--ram-budget", str(args.ram_budget)] + (["--drop-cache"] if args.drop_cache else [])
    if args.nthreads:
        cmd += ["--nthreads", str(args.nthreads)]
    if gguf_path is not None:
        cmd += ["--gguf", str(gguf_path)]
    env = dict(os.environ, DAIRLLM_CACHE=str(Path(args.cache_dir).expanduser()))   # Q40x8 copies too
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        raise DairError(f"{which} benchmark failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The report

def weight_bytes_per_token(model: Path) -> int:
    """Bytes a decode step must read: every layer, the classifier, one embedding row."""
    from ..formats.detect import open_model_file

    with open_model_file(model) as mf:
        h = mf.header
        layers = sum(t.nbytes for t in mf.tensors if t.layer >= 0)
        return layers + mf.layout["wcls"].nbytes + mf.layout["final_norm"].nbytes + 4 * h.dim


def kernel_section(args) -> "dict | None":
    """Q40xQ80 matvec/batched GB/s and the read bandwidth, from dairllm.bench_kernels."""
    try:
        from .. import _ops, bench_kernels
    except ImportError as e:
        log.warning("kernel benchmarks unavailable: %s", e)
        return None
    n = args.nthreads or _ops.get_num_threads()
    return bench_kernels.bench_kernels(threads=[1, n])


def run(args: argparse.Namespace) -> int:
    if args.child:
        child = {"llamacpp": child_llamacpp, "streaming": child_streaming}.get(args.child,
                                                                              child_dairllm)
        print(json.dumps(child(args)))
        return 0
    if args.prompt_tokens <= 0 or args.gen_tokens < 2:
        raise ConfigError("--prompt-tokens must be positive and --gen-tokens at least 2")
    if args.drop_cache and args.ram_budget is None:
        raise ConfigError("--drop-cache needs --ram-budget")
    model = Path(args.model) if args.model else synthetic_model(args)
    if args.ram_budget is not None:
        return run_streaming(args, model)
    report: dict = {"model": str(model), "weight_bytes_per_token": weight_bytes_per_token(model),
                    "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()[0]}
    if not args.no_kernels:
        report["kernels"] = kernel_section(args)
    gguf_path = None
    if not args.no_llamacpp:
        try:
            if importlib.util.find_spec("llama_cpp") is None:
                raise ImportError("llama-cpp-python is not installed (pip install 'dairllm[bench]')")
            gguf_path = gguf_copy(model)
        except (ImportError, DairError) as e:
            log.warning("llama.cpp comparison skipped: %s", e)
            report["llama.cpp"] = {"error": str(e)[-500:]}
    ours = ["dairllm"] + ([] if args.no_repack else ["dairllm-x8"])
    for _ in range(max(1, args.repeat)):        # alternate, so all see the same conditions
        for engine in ours:
            report[engine] = _best(report.get(engine), _spawn(args, engine, model))
        if gguf_path is not None:
            report["llama.cpp"] = _best(report.get("llama.cpp"),
                                        _spawn(args, "llamacpp", model, gguf_path))
    bw = _bandwidth(report.get("kernels"))
    report["load_average_after"] = os.getloadavg()[0]
    if bw:
        report["bandwidth_bytes_per_s"] = bw
        report["decode_floor_tokens_per_s"] = bw / report["weight_bytes_per_token"]
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


def _best(a: "dict | None", b: dict) -> dict:
    """Per figure, the better of two runs (the least disturbed by other work)."""
    if not a:
        return b
    out = dict(b)
    for k in ("prompt_tokens_per_s", "decode_tokens_per_s"):
        out[k] = max(a[k], b[k])
    out["runs"] = a.get("runs", 1) + 1
    return out


def _bandwidth(kernels) -> "float | None":
    """The decode limit (bytes/s): the read bandwidth at the most threads, probed again after the
    engines ran and the higher figure kept. Other tenants make a single probe read low at times,
    which would flatter the decode-vs-limit ratio."""
    if not isinstance(kernels, dict) or not kernels.get("bandwidth_gbs"):
        return None
    from .. import _ops

    bw = kernels["bandwidth_gbs"]
    t = max(bw)
    after = _ops.memory_read_bandwidth(1 << 30, t, 5)
    kernels["bandwidth_gbs_after"] = {t: after}
    return max(float(bw[t]), after) * 1e9


def print_report(r: dict) -> None:
    gb = 1e9
    print(f"model: {r['model']}  ({r['weight_bytes_per_token'] / gb:.3f} GB of weights read per "
          f"decoded token)")
    print(f"load average {r['load_average_before']:.2f} before, {r['load_average_after']:.2f} "
          f"after, on {r['cpu_count']} CPUs (other work on the machine skews every figure)")
    if r.get("kernels"):
        from ..bench_kernels import format_report

        print(format_report(r["kernels"]))
    ours = [r[e] for e in ("dairllm", "dairllm-x8") if e in r]
    theirs = r.get("llama.cpp") or {}
    floor = r.get("decode_floor_tokens_per_s")
    print(f"{'engine':12s} {'prompt tok/s':>13s} {'decode tok/s':>13s} {'peak RSS':>10s} "
          f"{'RSS file':>10s} {'RSS anon':>10s}")
    for e in (*ours, theirs):
        if "prompt_tokens_per_s" in e:
            print(f"{e['engine']:12s} {e['prompt_tokens_per_s']:13.1f} {e['decode_tokens_per_s']:13.1f} "
                  f"{e['peak_rss'] / 2**20:8.0f}Mi {e['rss_file'] / 2**20:8.0f}Mi "
                  f"{e['rss_anon'] / 2**20:8.0f}Mi")
        elif "error" in e:
            print(f"llama.cpp    skipped: {e['error'].splitlines()[-1] if e['error'] else ''}")
    if len(ours) > 1:
        print("dairllm-x8: the same model with its Q40 matrices read from a Q40x8 copy (--repack)")
    print(f"dairllm run state (KV cache + activations): {ours[0]['state_bytes'] / 2**20:.1f} MiB "
          f"(KV {ours[0]['kv_bytes'] / 2**20:.1f} MiB); anonymous RSS before opening the model "
          f"{ours[0]['rss_anon_before_open'] / 2**20:.0f} MiB")
    for e in ours:
        if "prompt_tokens_per_s" in theirs:
            print(f"ratio {e['engine']} / llama.cpp: prompt {e['prompt_tokens_per_s'] / theirs['prompt_tokens_per_s']:.2f}, "
                  f"decode {e['decode_tokens_per_s'] / theirs['decode_tokens_per_s']:.2f}")
    if floor:
        probes = r.get("kernels", {}).get("bandwidth_gbs_after", {})
        if probes:
            t, after = next(iter(probes.items()))
            print(f"memory read bandwidth, {t} thread(s), probed again after the engines: {after:.1f} GB/s; "
                  f"the limit below is the higher probe, {r['bandwidth_bytes_per_s'] / gb:.1f} GB/s")
        parts = [f"{e['engine']} {e['decode_tokens_per_s'] / floor:.0%}" for e in (*ours, theirs) if "decode_tokens_per_s" in e]
        print(f"decode vs bandwidth floor ({floor:.1f} tok/s): " + ", ".join(parts))
