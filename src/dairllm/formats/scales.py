"""Damaged numbers in a model file: non-finite or absurd quantisation scales, non-finite floats.

`dairllm inspect --verify` reads every block scale (the F16 `d`, and the `dmin`/`m` of the types
that have one) of every quantised tensor, and every value of F32/F16/BF16 tensors. One damaged
2-byte scale turns a whole row of a matmul into inf or NaN: the model then answers token 0 at
every step. A scale is absurd above ABSURD_SCALE: a block's values are at most 127 x its scale
(Q8_0; 8 x for Q4_0), while trained weights stay within a few units, so a scale of 1000 already
means weights near 10^4-10^5.

    report = verify_scales(mf, progress=print_progress)
    for t in report.bad: print(t.name, t.nonfinite, t.absurd, t.first_offsets)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .quant import GGMLType, as_ggml_type

ABSURD_SCALE = 1000.0
FIRST_OFFSETS = 5                    # how many bad places each tensor reports
CHUNK_BYTES = 64 << 20               # scanned at a time (bounded memory, progress steps)

# Byte offsets of the float16 scales inside one block, as ggml lays the block structs out (Q8_1:
# only d; its s = d * sum(q) is not bounded like a scale).
F16_SCALES = {
    GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,), GGMLType.Q8_1: (0,), GGMLType.IQ4_NL: (0,),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2), GGMLType.Q6_K: (208,),
    GGMLType.IQ2_XXS: (0,), GGMLType.IQ2_XS: (0,), GGMLType.IQ3_XXS: (0,),
    GGMLType.IQ1_S: (0,), GGMLType.IQ3_S: (0,), GGMLType.IQ2_S: (0,), GGMLType.IQ4_XS: (0,),
    GGMLType.TQ1_0: (52,), GGMLType.TQ2_0: (64,),
}
PLAIN_FLOATS = {GGMLType.F32: "<f4", GGMLType.F16: "<f2"}


@dataclass
class TensorDamage:
    name: str
    type: str
    checked: int = 0                 # scales (or values) read
    nonfinite: int = 0
    absurd: int = 0                  # finite scales above ABSURD_SCALE in magnitude
    first_offsets: list = field(default_factory=list)   # absolute file offsets of bad numbers

    def as_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class ScaleReport:
    tensors: list                    # TensorDamage of every tensor checked
    skipped: list                    # names of tensors of a type without known scales

    @property
    def bad(self) -> list:
        return [t for t in self.tensors if t.nonfinite or t.absurd]

    def as_dict(self) -> dict:
        return {"ok": not self.bad, "absurd_scale": ABSURD_SCALE,
                "tensors_checked": len(self.tensors), "skipped": self.skipped,
                "damaged": [t.as_dict() for t in self.bad]}


def _bf16_as_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.view("<u2").astype(np.uint32) << 16).view("<f4")


def _record(dmg: TensorDamage, values: np.ndarray, offsets: Callable, scales: bool) -> None:
    """Count the bad values of one chunk; `offsets(indices)` -> their file offsets."""
    v = values if values.dtype == np.float32 else values.astype(np.float32)
    if not scales:
        with np.errstate(invalid="ignore", over="ignore"):
            if np.isfinite(np.add.reduce(v)):        # the usual case: one pass, no mask
                dmg.checked += v.size
                return
    nonfinite = ~np.isfinite(v)
    bad = nonfinite | (np.abs(v) > ABSURD_SCALE) if scales else nonfinite
    dmg.checked += v.size
    n_bad = int(np.count_nonzero(bad))
    if not n_bad:
        return
    n_nonfinite = int(np.count_nonzero(nonfinite))
    dmg.nonfinite += n_nonfinite
    dmg.absurd += n_bad - n_nonfinite
    room = FIRST_OFFSETS - len(dmg.first_offsets)
    if room > 0:
        dmg.first_offsets += [int(o) for o in offsets(np.flatnonzero(bad)[:room])]


def _scan_blocks(buf: np.ndarray, t, gt: GGMLType, dmg: TensorDamage, progress) -> None:
    bb = gt.block_bytes
    per_chunk = max(1, CHUNK_BYTES // bb)
    n_blocks = t.nbytes // bb
    blocks = buf[t.offset:t.offset + n_blocks * bb].reshape(n_blocks, bb)
    for b0 in range(0, n_blocks, per_chunk):
        chunk = blocks[b0:b0 + per_chunk]
        for off in F16_SCALES[gt]:
            d = np.ascontiguousarray(chunk[:, off:off + 2]).view("<f2").reshape(-1)
            base = t.offset + b0 * bb + off
            _record(dmg, d, lambda i: base + i * bb, scales=True)
        progress(chunk.nbytes)


def _scan_floats(buf: np.ndarray, t, gt: GGMLType, dmg: TensorDamage, progress) -> None:
    size = 2 if gt in (GGMLType.F16, GGMLType.BF16) else 4
    per_chunk = CHUNK_BYTES // size * size
    for o in range(t.offset, t.end, per_chunk):
        raw = buf[o:min(o + per_chunk, t.end)]
        values = _bf16_as_f32(raw) if gt is GGMLType.BF16 else raw.view(PLAIN_FLOATS[gt])
        _record(dmg, values, lambda i: o + i * size, scales=False)
        progress(raw.nbytes)


def verify_scales(mf, progress: "Optional[Callable[[int, int], None]]" = None) -> ScaleReport:
    """Every tensor of the opened model `mf` (ModelFile or GGUFModel) checked; `progress(done,
    total)` is called with bytes scanned so far after each chunk."""
    total = sum(t.nbytes for t in mf.tensors)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    tensors, skipped = [], []
    for t in mf.tensors:
        gt = as_ggml_type(t.ftype)
        dmg = TensorDamage(t.name, gt.name)
        if gt in F16_SCALES:
            _scan_blocks(mf.buffer, t, gt, dmg, step)
        elif gt in PLAIN_FLOATS or gt is GGMLType.BF16:
            _scan_floats(mf.buffer, t, gt, dmg, step)
        else:
            skipped.append(t.name)
            step(t.nbytes)
            continue
        tensors.append(dmg)
    return ScaleReport(tensors, skipped)


__all__ = ["ABSURD_SCALE", "verify_scales", "ScaleReport", "TensorDamage", "F16_SCALES"]
