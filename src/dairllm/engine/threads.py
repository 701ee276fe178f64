"""Kernel threads of this process: one setting for every execution mode."""
from __future__ import annotations

from .. import _ops
from ..errors import ConfigError


def set_nthreads(nthreads: "int | None") -> None:
    """Kernel threads from now on; None keeps the default (all cores or OMP_NUM_THREADS)."""
    if nthreads is None:
        return
    if int(nthreads) <= 0:
        raise ConfigError(f"nthreads must be positive, got {nthreads}")
    _ops.set_num_threads(int(nthreads))


def get_nthreads() -> int:
    return int(_ops.get_num_threads())
