"""Where a pipeline run rounds its activations to the wire type: a property of the run, not of
the current layout.

The first plan fixes the *rounding points*: the layer boundaries where activations crossed the
network (the edges of every remote stage; boundary b is the input of layer b, b == n_layers the
input of the head). Whatever the layout later becomes (a failover, a join, a leave, a re-balance),
every node rounds at exactly those points inside or at the edges of its range, and a hop at a
boundary that is not a rounding point travels as F32 (lossless). So the arithmetic, and the
greedy tokens, of a re-planned run are bit-identical to the undisturbed run's, with Q80 or F32
activations on the wire.

    points = RoundingPoints.of_stages([(4, 8), (8, 12)], act=FloatType.Q80)   # remote stages
    points.hop_type(8)                       # Q80: a hop at 8 may stay quantized
    points.run(compute, state, rows, 0, 10)  # layers 0..9, rounding at 4 and 8

Rounding a row that was already rounded to Q80 gives the same row again (the block scale and
the integers are reproduced exactly), so rounding twice at one point changes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import forward as fw
from ..formats.quant import FloatType
from . import protocol as P


@dataclass(frozen=True)
class RoundingPoints:
    points: frozenset          # layer boundaries where activations are rounded to `act`
    act: int                   # the run's wire type (FloatType)

    @classmethod
    def of_stages(cls, remote: "list[tuple[int, int]]", act: int) -> "RoundingPoints":
        """The points of a first plan whose remote stages are the (start, end) ranges."""
        return cls(frozenset(b for r in remote for b in r), act)

    def hop_type(self, boundary: int) -> int:
        """The wire type of a hop at `boundary`: the run's type at a rounding point, else F32."""
        return self.act if boundary in self.points else FloatType.F32

    def within(self, start: int, end: int) -> list:
        """The points in [start, end], sorted (what a node running layers start..end-1 honours)."""
        return sorted(b for b in self.points if start <= b <= end)

    def round(self, x: np.ndarray) -> None:
        """x (n, dim) in place through encode + decode in the run's type, as a hop would."""
        if self.act != FloatType.F32:
            n, dim = x.shape
            data = np.ascontiguousarray(P.encode_rows(x, self.act))
            P.decode_rows(memoryview(data.reshape(-1)), n, dim, self.act, x)

    def enter(self, x: np.ndarray, boundary: int) -> np.ndarray:
        """The rows as a hop at `boundary` carries them (a copy), with x rounded there in place
        if it is a rounding point."""
        data = np.array(P.encode_rows(x, self.hop_type(boundary)), copy=True)
        if boundary in self.points and self.act != FloatType.F32:
            n, dim = x.shape
            P.decode_rows(memoryview(data.reshape(-1)), n, dim, self.act, x)
        return data

    def run(self, compute, state, rows, start: int, end: int) -> None:
        """Layers start..end-1 over rows, rounding after every layer whose output boundary is a
        rounding point (end included; the input at `start` is the caller's: see enter)."""
        a = start
        for b in self.within(start + 1, end):
            fw.run_layers(compute, state, rows, a, b)
            self.round(rows.x)
            a = b
        if a < end:
            fw.run_layers(compute, state, rows, a, end)


def parse_round_at(value: object, start: int, end: int, peer: str) -> "list[int] | None":
    """An ASSIGN's "round_at" (None when absent: an old root, rounding only at the edges in the
    type of each record); every point must lie in [start, end]."""
    from ..errors import ProtocolError
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > end - start + 1 or not all(
            isinstance(b, int) and not isinstance(b, bool) and start <= b <= end for b in value):
        raise ProtocolError(f"{peer}: round_at must be a list of layer boundaries in "
                            f"{start}..{end}, got {str(value)[:100]}")
    return sorted(set(value))
