"""The Q40x8 sidecar: a model's Q40 matrices regrouped 8 rows at a time, in a file of their own.

The Q40x8 kernel (csrc/dl_kernels.h) reads one 32-byte load per 4 weight bytes of 8 rows and so
needs about two thirds of the instructions of the Q40 kernel per weight; on an AVX2 core that is
the difference between a compute-bound and a memory-bound decode. The `.m` file must keep
distributed-llama's layout, and weights are never copied into the heap, so the regrouped matrices
live in a second file that is memory-mapped the same way: built once (seconds per GB), validated by
a key over the model file's path, mtime and fingerprint (formats/fingerprint.py), rebuilt when stale or damaged. Its pages are
dropped from the page cache once written and the mapping asks for huge pages, so they are read back
in 2 MiB folios, one TLB entry each.

File: a HEADER_BYTES header (MAGIC, VERSION, the 16-character key, the payload size, the model's
path), then every repacked matrix in `repacked_names` order, each at a 64-byte aligned offset. A
rebuild removes the model's older sidecars (same path in the header, another key). A matrix of d rows
and nb blocks takes d / 8 rows of nb * 144 bytes: the same bytes as in the `.m` file.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np

from .. import _ops
from ..cache import cache_dir
from ..errors import ConfigError
from .fingerprint import model_fingerprint
from .modelfile import Arch, ModelFile, close_mapping
from .quant import FloatType

log = logging.getLogger(__name__)

MAGIC = b"DLQ40X8\0"
VERSION = 1
HEADER_BYTES = 4096
GROUP_BYTES = 144           # one block of 8 rows (DL_Q40X8_BYTES)
_HEADER = struct.Struct("<8sI16sQI")      # + the model path's UTF-8 bytes
_CHUNK_BYTES = 16 << 20     # repacked per write


def repacked_names(mf: ModelFile) -> list[str]:
    """The matrices the sidecar holds, in file order: every layer's q, k, v, wo, w1, w2, w3, then wcls."""
    names = [f"layers.{l}.{n}" for l in range(mf.header.n_layers)
             for n in ("q", "k", "v", "wo", "w1", "w2", "w3")]
    return names + ["wcls"]


def unsupported_reason(mf: ModelFile) -> "str | None":
    """Why this model cannot use the sidecar, or None."""
    h = mf.header
    if h.weight_type is not FloatType.Q40:
        return f"{h.weight_type.name} weights (Q40 only)"
    if h.arch is Arch.QWEN3_MOE:
        return "a mixture-of-experts model (dense models only)"
    for name in repacked_names(mf):
        t = mf.layout[name]
        if t.ftype is not FloatType.Q40 or t.rows % 8:
            return f"{name} is not a Q40 matrix of a multiple of 8 rows"
    return None


def sidecar_key(path: Path) -> str:
    """Changes when the model file does: its path, mtime and fingerprint (size, header, samples)."""
    st = path.stat()
    where = f"{path.resolve()}|{st.st_mtime_ns}|{VERSION}|{model_fingerprint(path)}"
    return hashlib.sha256(where.encode()).hexdigest()[:16]


def default_dir() -> Path:
    return cache_dir() / "repacked"


class RepackedFile:
    """The sidecar of an open ModelFile, built if missing or stale, mapped read-only."""

    def __init__(self, mf: ModelFile, cache_dir: "str | os.PathLike | None" = None) -> None:
        reason = unsupported_reason(mf)
        if reason:
            raise ConfigError(f"{mf.path}: cannot repack {reason}")
        self.model = mf
        self.key = sidecar_key(Path(mf.path))
        self.offsets, self.payload = self._layout()
        directory = Path(cache_dir).expanduser() if cache_dir else default_dir()
        self.path = directory / f"{Path(mf.path).stem}-{self.key}.q40x8"
        if not self._valid():
            self._build()
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(self._mmap) != HEADER_BYTES + self.payload or self._mmap[:HEADER_BYTES] != self._header():
            self._mmap.close()
            raise ConfigError(f"the repacked file {self.path} changed while it was opened; try again")
        if hasattr(mmap, "MADV_HUGEPAGE"):
            # pages read from here on come in 2 MiB folios mapped by one TLB entry each
            self._mmap.madvise(mmap.MADV_HUGEPAGE)
        self._buffer = np.frombuffer(self._mmap, dtype=np.uint8)

    def _layout(self) -> tuple[dict[str, int], int]:
        offsets, off = {}, HEADER_BYTES
        for name in repacked_names(self.model):
            offsets[name] = off
            off += -(-self.model.layout[name].nbytes // 64) * 64
        return offsets, off - HEADER_BYTES

    def _header(self) -> bytes:
        source = str(Path(self.model.path).resolve()).encode()[:HEADER_BYTES - _HEADER.size]
        head = _HEADER.pack(MAGIC, VERSION, self.key.encode(), self.payload, len(source)) + source
        return head.ljust(HEADER_BYTES, b"\0")

    def _remove_older(self) -> None:
        """Sidecars of this same model file made before it changed (their key differs)."""
        mine = self._header()[_HEADER.size:]
        for other in self.path.parent.glob(f"{Path(self.model.path).stem}-*.q40x8"):
            if other == self.path:
                continue
            try:
                with open(other, "rb") as f:
                    head = f.read(HEADER_BYTES)
                if head[:8] == MAGIC and head[_HEADER.size:] == mine:
                    other.unlink()
                    log.info("removed the outdated %s", other)
            except OSError:
                pass

    def _valid(self) -> bool:
        try:
            if self.path.stat().st_size != HEADER_BYTES + self.payload:
                log.warning("repacked file %s has the wrong size: rebuilding it", self.path)
                return False
            with open(self.path, "rb") as f:
                ok = f.read(HEADER_BYTES) == self._header()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            raise ConfigError(f"cannot read the repacked file {self.path}: {e}") from e
        if not ok:
            log.warning("repacked file %s does not match %s: rebuilding it", self.path, self.model.path)
        return ok

    def _build(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write()
        except OSError as e:
            raise ConfigError(f"cannot write the repacked file {self.path}: {e.strerror or e} "
                              f"(set DAIRLLM_CACHE to a writable directory)") from e
        self._remove_older()

    def _write(self) -> None:
        need = HEADER_BYTES + self.payload
        free = shutil.disk_usage(self.path.parent).free
        if free < need + (64 << 20):
            raise ConfigError(f"repacking needs {need / 2**30:.2f} GiB in {self.path.parent}, "
                              f"{free / 2**30:.2f} GiB free (set DAIRLLM_CACHE elsewhere)")
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        log.warning("repacking %s Q40 matrices into %s (%.2f GiB, once)",
                    len(self.offsets), self.path, self.payload / 2**30)
        t0 = last = time.monotonic()
        try:
            with open(tmp, "wb") as f:
                f.write(self._header())
                for i, (name, off) in enumerate(self.offsets.items()):
                    f.seek(off)
                    self._write_matrix(f, name)
                    if time.monotonic() - last > 2.0:
                        last = time.monotonic()
                        log.info("repacking: %d of %d matrices", i + 1, len(self.offsets))
                f.truncate(HEADER_BYTES + self.payload)
                f.flush()
                os.fsync(f.fileno())
                if hasattr(os, "posix_fadvise"):
                    # drop the written pages: read back through the mapping they come in huge
                    # folios (about 5% faster decode here than 4 KiB pages)
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log.info("repacked in %.1f s", time.monotonic() - t0)

    def _write_matrix(self, f, name: str) -> None:
        w = self.model.raw(name)                        # (d, nb * 18)
        rows = max(8, _CHUNK_BYTES // w.shape[1] // 8 * 8)
        out = np.empty((rows // 8, 8 * w.shape[1]), np.uint8)
        for r0 in range(0, w.shape[0], rows):
            part = w[r0:r0 + rows]
            o = out[:part.shape[0] // 8]
            _ops.repack_q40x8(o, part)
            f.write(o.data)

    def view(self, name: str) -> np.ndarray:
        """Matrix `name` in the Q40x8 layout: uint8 [d / 8, nb * 144], a view into the mmap."""
        t = self.model.layout[name]
        d, row = t.rows, t.nbytes // t.rows
        off = self.offsets[name]
        return self._buffer[off:off + t.nbytes].reshape(d // 8, 8 * row)

    def close(self) -> None:
        self._buffer = None  # type: ignore[assignment]
        close_mapping(self._mmap)
