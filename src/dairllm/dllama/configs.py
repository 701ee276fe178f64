"""The structs a dllama root sends (spec §0.2, §5): sizes, pointers, ops, segments, configs.

The byte-level reading and writing lives in dairllm._net (DllamaReader, dllama_pack_*); these
dataclasses are what the rest of the package works with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from .. import _net

ACK = _net.DLLAMA_ACK


class Op(IntEnum):
    MERGE_ADD = 0
    MERGE_SUM = 1
    EMBEDDING = 2
    INV_RMS = 3
    RMS_NORM = 4
    MATMUL = 5
    ROPE = 6
    MULTIHEAD_ATT = 7
    GELU = 8
    SILU = 9
    MUL = 10
    SCALE = 11
    CAST = 12
    REPEAT_Z = 13
    SHIFT = 14
    SOFTMAX = 15
    MOE_GATE = 16


class Src(IntEnum):
    PIPE = 0
    BUFFER = 1


class Ptr(IntEnum):
    RAW = 0
    BATCH = 1
    BATCHED_SLICE = 2


class Sync(IntEnum):
    WITH_ROOT = 0
    NODE_SLICES = 1
    NODE_SLICES_EXCEPT_ROOT = 2


NO_TYPE = -1          # the float type of an empty Size3D (the reference's F_UNK)


@dataclass(frozen=True)
class Size3D:
    """NnSize3D: z planes of y rows of x columns of float type ft (ft = -1: no size)."""

    ft: int
    z: int = 1
    y: int = 1
    x: int = 1

    @classmethod
    def empty(cls) -> "Size3D":
        return cls(NO_TYPE, 0, 0, 0)

    @property
    def is_empty(self) -> bool:
        return self.ft == -1

    @property
    def length(self) -> int:
        return self.z * self.y * self.x

    @property
    def nbytes(self) -> int:
        return 0 if self.is_empty else _net.dllama_float_nbytes(self.ft, self.length)

    @property
    def nbytes_xy(self) -> int:
        return 0 if self.is_empty else _net.dllama_float_nbytes(self.ft, self.x * self.y)

    def row_bytes(self, x: int | None = None) -> int:
        return _net.dllama_float_nbytes(self.ft, self.x if x is None else x)

    def pack(self) -> bytes:
        return _net.dllama_pack_size3d(self.ft, self.z, self.y, self.x)


@dataclass(frozen=True)
class Pointer:
    source: Src
    index: int
    type: Ptr

    def pack(self) -> bytes:
        return _net.dllama_pack_pointer(self.source, self.index, self.type)


@dataclass
class OpConfig:
    code: Op
    index: int              # layer index (0 for non-layer ops)
    weight: Size3D
    name: str
    input: Pointer
    output: Pointer
    config: dict = field(default_factory=dict)
    raw_config: bytes | None = None   # the bytes as received (kept for re-sending verbatim)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.index}] ({self.code.name})"

    def config_bytes(self) -> bytes:
        if self.raw_config is not None:
            return self.raw_config
        return _net.dllama_pack_op_config(self.code, self.config)

    def pack(self) -> bytes:
        cfg = self.config_bytes()
        return b"".join([_net.dllama_pack_u32(self.code, self.index), self.weight.pack(),
                         _net.dllama_pack_u32(len(cfg)), _net.dllama_pack_string(self.name),
                         self.input.pack(), self.output.pack(), cfg])


@dataclass
class Segment:
    syncs: list[tuple[int, Sync]]
    ops: list[OpConfig]


@dataclass
class NetConfig:
    n_batches: int
    n_nodes: int
    pipes: list[tuple[str, Size3D]]
    pre_syncs: list[int]

    def pack(self) -> bytes:
        """Everything after the root's leading ACK."""
        parts = [_net.dllama_pack_u32(self.n_batches, self.n_nodes, len(self.pipes))]
        for name, size in self.pipes:
            parts += [size.pack(), _net.dllama_pack_string(name)]
        parts.append(_net.dllama_pack_u32(len(self.pre_syncs), *self.pre_syncs))
        return b"".join(parts)


@dataclass
class NodeConfig:
    node_index: int
    buffers: list[tuple[str, Size3D]]
    segments: list[Segment]

    def pack(self) -> bytes:
        """Everything after the root's leading ACK."""
        parts = [_net.dllama_pack_u32(self.node_index, len(self.buffers), len(self.segments))]
        for name, size in self.buffers:
            parts += [size.pack(), _net.dllama_pack_string(name)]
        for seg in self.segments:
            parts.append(_net.dllama_pack_u32(len(seg.syncs), len(seg.ops)))
            for pipe, sync in seg.syncs:
                parts.append(_net.dllama_pack_u32(pipe, sync))
            parts += [op.pack() for op in seg.ops]
        return b"".join(parts)

    def ops(self):
        for seg in self.segments:
            yield from seg.ops


# ---------------------------------------------------------------------------------------------
# From the tuples DllamaReader returns

def _size(t: tuple) -> Size3D:
    return Size3D(*t)


def _pointer(t: tuple) -> Pointer:
    return Pointer(Src(t[0]), t[1], Ptr(t[2]))


def read_net_config(reader) -> NetConfig:
    n_batches, n_nodes, pipes, pre = reader.net_config()
    return NetConfig(n_batches, n_nodes, [(n, _size(s)) for n, s in pipes], pre)


def read_node_config(reader, net: NetConfig) -> NodeConfig:
    node_index, buffers, segments = reader.node_config(len(net.pipes))
    segs = []
    for syncs, ops in segments:
        segs.append(Segment([(p, Sync(t)) for p, t in syncs],
                            [OpConfig(Op(code), index, _size(w), name, _pointer(i), _pointer(o), cfg, raw)
                             for code, index, w, name, i, o, raw, cfg in ops]))
    return NodeConfig(node_index, [(n, _size(s)) for n, s in buffers], segs)
