"""`dairllm inspect MODEL.m`: header, derived dims, bytes per layer, RAM per layer, tensor table."""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from .options import add_budget_argument

HELP = ("show a .m model's header, sizes, RAM per layer, (with --tensors) every tensor and "
        "(with --verify) damaged scales")

KV_BYTES = 4      # the KV cache holds float32 values, as dllama's does


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL.m", nargs="?", default=None,
                   help="the model file (default: the built-in tiny model, made on first use "
                        "in $DAIRLLM_CACHE or ~/.cache/dairllm)")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--verify", action="store_true",
                   help="read every quantisation scale and float value: report non-finite or "
                        "absurd ones per tensor (exit code 1 when any is found)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="size the KV cache for this context instead of the model's seq_len")
    add_budget_argument(p, "show what a run under this RAM budget would pin, stream, and read "
                           "from disk per token")


def kv_cache_bytes(h) -> int:
    """K and V cache of one layer at the header's seq_len."""
    return 2 * h.seq_len * h.kv_dim * KV_BYTES


def _metadata_value(v):
    """A GGUF metadata value as inspect shows it: scalars as they are, arrays by their length."""
    if isinstance(v, (list, np.ndarray)) and len(v) > 8:
        kind = "strings" if isinstance(v, list) else str(v.dtype)
        return f"[{len(v)} {kind}]"
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, str) and len(v) > 200:
        return v[:200] + f"... ({len(v)} characters)"
    return v


def summarize(mf, with_tensors: bool = False) -> dict:
    """Everything `inspect` shows, as plain JSON-able values."""
    h, lay = mf.header, mf.layout
    kv = kv_cache_bytes(h)
    layers = []
    for l in range(h.n_layers):
        ts = lay.layer_tensors(l)              # contiguous in a .m file, maybe not in a GGUF
        start, end = min(t.offset for t in ts), max(t.end for t in ts)
        nbytes = sum(t.nbytes for t in ts)
        layers.append(dict(layer=l, start=start, end=end, weight_bytes=nbytes,
                           kv_cache_bytes=kv, ram_bytes=nbytes + kv))
    emb, final_norm, wcls = lay["embedding"], lay["final_norm"], lay["wcls"]
    out = dict(
        file=str(mf.path), file_size=mf.file_size,
        header=h.describe(),
        derived=dict(head_dim=h.head_dim, q_dim=h.q_dim, kv_dim=h.kv_dim, ff_dim=h.ff_dim,
                     norm_epsilon=h.norm_epsilon, rope=h.effective_rope_type.name,
                     qk_norm=h.has_qk_norm, moe=h.is_moe),
        sizes=dict(header_bytes=h.header_size, embedding_bytes=emb.nbytes,
                   layers_bytes=sum(x["weight_bytes"] for x in layers),
                   head_bytes=final_norm.nbytes + wcls.nbytes, total_bytes=mf.file_size),
        ram=dict(seq_len=h.seq_len, kv_cache_bytes_per_layer=kv,
                 max_layer_bytes=max((x["ram_bytes"] for x in layers), default=0),
                 all_layers_bytes=sum(x["ram_bytes"] for x in layers),
                 everything_bytes=mf.file_size - h.header_size + kv * h.n_layers),
        layers=layers,
    )
    if hasattr(mf, "metadata"):                # a GGUF file
        out["metadata"] = {k: _metadata_value(v) for k, v in mf.metadata.items()}
    if with_tensors:
        out["tensors"] = [dict(name=t.name, type=t.ftype.name, shape=list(t.shape),
                               offset=t.offset, bytes=t.nbytes) for t in mf.tensors]
    return out


def plan_section(mf, args: argparse.Namespace) -> "dict | None":
    """The layer-streaming plan for `--ram-budget` (None without one)."""
    if getattr(args, "ram_budget", None) is None:
        return None
    from ..engine.model import DEFAULT_MAX_BATCH
    from ..engine.state import run_state_bytes
    from ..store import plan_report

    return plan_report(mf, args.ram_budget, run_state_bytes(mf.header, DEFAULT_MAX_BATCH),
                       DEFAULT_MAX_BATCH)


PROGRESS_FROM_BYTES = 256 << 20     # smaller files verify in well under a second


def verify_section(mf) -> dict:
    """`--verify`: formats/scales.py over every tensor, with progress on stderr for big files."""
    from ..formats.scales import verify_scales

    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if total >= PROGRESS_FROM_BYTES and (now - last[0] >= 1.0 or done == total):
            last[0] = now
            print(f"verifying {mf.path}: {100 * done / total:.0f}% of {_mb(total)}",
                  file=sys.stderr, flush=True)

    return verify_scales(mf, progress).as_dict()


def render_verify(v: dict) -> str:
    head = (f"verify: {v['tensors_checked']} tensors checked, scales above "
            f"{v['absurd_scale']:g} count as absurd")
    if v["skipped"]:
        head += f"; {len(v['skipped'])} of types without known scales skipped"
    if v["ok"]:
        return head + "\n  no non-finite or absurd numbers"
    lines = [head, f"  DAMAGED: {len(v['damaged'])} tensors",
             f"  {'tensor':<28} {'type':<7} {'non-finite':>10} {'absurd':>8}  first offsets"]
    for t in v["damaged"]:
        offsets = ", ".join(f"{o:,}" for o in t["first_offsets"])
        lines.append(f"  {t['name']:<28} {t['type']:<7} {t['nonfinite']:>10,} {t['absurd']:>8,}"
                     f"  {offsets}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def render_text(s: dict) -> str:
    h, sz, ram = s["header"], s["sizes"], s["ram"]
    types = h.get("weight_type") or h.get("tensor_types")     # GGUF: a type per tensor
    lines = [f"{s['file']}: {h['arch']} {types}, {_mb(s['file_size'])}", "", "header:"]
    lines += [f"  {k:<30} {v}" for k, v in h.items()]
    lines += ["", "derived:"] + [f"  {k:<30} {v}" for k, v in s["derived"].items()]
    lines += ["", "sizes:",
              f"  {'header':<30} {sz['header_bytes']} B",
              f"  {'embedding (F32)':<30} {_mb(sz['embedding_bytes'])}",
              f"  {'layers':<30} {_mb(sz['layers_bytes'])} ({len(s['layers'])} layers)",
              f"  {'final norm + classifier':<30} {_mb(sz['head_bytes'])}",
              f"  {'total':<30} {_mb(sz['total_bytes'])} ({sz['total_bytes']:,} B)"]
    lines += ["", f"RAM (KV cache float32 at seq_len {ram['seq_len']}):",
              f"  {'KV cache per layer':<30} {_mb(ram['kv_cache_bytes_per_layer'])}",
              f"  {'largest layer + its KV cache':<30} {_mb(ram['max_layer_bytes'])}",
              f"  {'all layers + KV caches':<30} {_mb(ram['all_layers_bytes'])}",
              f"  {'whole model + KV caches':<30} {_mb(ram['everything_bytes'])}"]
    lines += ["", f"  {'layer':>5} {'bytes in file':^32} {'weights':>12} {'KV cache':>12} "
              f"{'RAM':>12}"]
    for x in s["layers"]:
        lines.append(f"  {x['layer']:>5} {x['start']:>15,}..{x['end']:<15,} "
                     f"{_mb(x['weight_bytes']):>12} {_mb(x['kv_cache_bytes']):>12} "
                     f"{_mb(x['ram_bytes']):>12}")
    if s.get("metadata"):
        lines += ["", "GGUF metadata:"] + [f"  {k:<40} {v}" for k, v in s["metadata"].items()]
    if "verify" in s:
        lines += ["", render_verify(s["verify"])]
    if s.get("plan"):
        lines += ["", "plan:"] + [f"  {k:<30} {v}" for k, v in s["plan"].items()]
    if "tensors" in s:
        lines += ["", f"  {'tensor':<28} {'type':<4} {'shape':<16} {'offset':>15} {'bytes':>14}"]
        for t in s["tensors"]:
            shape = "x".join(map(str, t["shape"]))
            lines.append(f"  {t['name']:<28} {t['type']:<4} {shape:<16} {t['offset']:>15,} "
                         f"{t['bytes']:>14,}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..formats.detect import open_model_file

    if args.model is None:
        from ..synth import default_model
        args.model = default_model()[0]
    with open_model_file(args.model, max_seq_len=args.max_seq_len) as mf:
        summary = summarize(mf, with_tensors=args.tensors)
        plan = plan_section(mf, args)
        if plan:
            summary["plan"] = plan
        if args.verify:
            summary["verify"] = verify_section(mf)
    print(json.dumps(summary, indent=1) if args.json else render_text(summary))
    return 0 if summary.get("verify", {}).get("ok", True) else 1
