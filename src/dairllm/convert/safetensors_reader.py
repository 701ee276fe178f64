"""Read tensors from a Hugging Face checkpoint's `*.safetensors` files, a slice of rows at a time.

A safetensors file is: u64 header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian data. We read row ranges with pread and hand them out as float32, so
the memory a conversion needs is one chunk of rows, never a whole model (nor a whole tensor);
nothing is mapped, so the checkpoint does not count against the process's resident memory.

Why not `safetensors.safe_open`: its NumPy backend cannot return BF16 — the dtype most real
checkpoints are stored in — and its torch backend would make torch (about 1 GB) a conversion
dependency. The tests check this reader against `safe_open(framework="pt")`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import ConfigError

MAX_HEADER = 100 << 20          # the format itself caps the JSON header at 100 MB

# safetensors dtype -> (storage dtype, bytes per element)
_DTYPES = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int                  # absolute byte offset in the file
    end: int


class SafetensorsFile:
    """One mapped `.safetensors` file and its validated header."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise ConfigError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise ConfigError(f"{self.path}: not a safetensors file (header length {n})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{self.path}: unreadable safetensors header: {e}") from None
        self.entries: dict[str, TensorEntry] = {}
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = (int(v) for v in info["data_offsets"])
                shape = tuple(int(s) for s in info["shape"])
                dtype = str(info["dtype"])
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f"{self.path}: malformed header entry for {name}") from None
            if not 0 <= start <= end or base + end > size:
                raise ConfigError(f"{self.path}: {name} lies outside the file")
            self.entries[name] = TensorEntry(name, dtype, shape, self.path, base + start,
                                             base + end)

        self._fd = os.open(self.path, os.O_RDONLY)

    def pread(self, nbytes: int, offset: int) -> bytes:
        data = os.pread(self._fd, nbytes, offset)
        if len(data) != nbytes:
            raise ConfigError(f"{self.path}: short read ({len(data)} of {nbytes} bytes "
                              f"at {offset})")
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Checkpoint:
    """Every tensor of a checkpoint folder, found by name across its safetensors files."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        files = self._listed_files()
        if not files:
            raise ConfigError(f"{self.folder}: no *.safetensors files (PyTorch .bin checkpoints "
                              "are not supported; re-save the model with safetensors)")
        self.files = [SafetensorsFile(p) for p in files]
        self.entries: dict[str, tuple[SafetensorsFile, TensorEntry]] = {}
        for sf in self.files:
            for name, e in sf.entries.items():
                if name in self.entries:
                    raise ConfigError(f"{self.folder}: tensor {name} is in both "
                                      f"{self.entries[name][0].path.name} and {sf.path.name}")
                self.entries[name] = (sf, e)

    def _listed_files(self) -> list[Path]:
        """The shards model.safetensors.index.json lists; without an index every *.safetensors
        (repositories may also carry e.g. a consolidated.safetensors in another naming)."""
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted(set(weight_map.values()))
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ConfigError(f"{index}: unreadable shard index: {e}") from None
            missing = [n for n in names if not (self.folder / n).is_file()]
            if missing:
                raise ConfigError(f"{self.folder}: shard {missing[0]} listed in {index.name} "
                                  "is missing")
            return [self.folder / n for n in names]
        if not self.folder.is_dir():
            raise ConfigError(f"{self.folder}: not a folder")
        return sorted(p for p in self.folder.glob("*.safetensors") if not p.name.startswith("."))

    def close(self) -> None:
        for sf in self.files:
            sf.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name][1]
        except KeyError:
            raise ConfigError(f"{self.folder}: the checkpoint has no tensor {name}") from None

    def rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of a tensor (first axis; a vector counts as one row) as float32,
        shape [r1 - r0, prod(other dims)]. Copies only those rows."""
        sf, e = self.entries[name]
        if e.dtype not in _DTYPES:
            raise ConfigError(f"{name}: unsupported checkpoint dtype {e.dtype} (F32, F16, BF16 "
                              "and F64 are supported; quantized checkpoints are not)")
        dt = _DTYPES[e.dtype]
        cols = int(np.prod(e.shape[1:])) if len(e.shape) > 1 else (e.shape[0] if e.shape else 1)
        n_rows = e.shape[0] if len(e.shape) > 1 else 1
        if (e.end - e.start) != n_rows * cols * dt.itemsize:
            raise ConfigError(f"{name}: {e.end - e.start} bytes do not hold shape {e.shape} "
                              f"{e.dtype}")
        if not 0 <= r0 <= r1 <= n_rows:
            raise ValueError(f"{name}: rows {r0}..{r1} outside 0..{n_rows}")
        row_bytes = cols * dt.itemsize
        raw = sf.pread((r1 - r0) * row_bytes, e.start + r0 * row_bytes)
        view = np.frombuffer(raw, dtype=dt).reshape(r1 - r0, cols)
        if e.dtype == "BF16":         # bfloat16 is the top half of a float32
            return (view.astype(np.uint32) << 16).view(np.float32)
        return view.astype(np.float32)

    def row_chunks(self, name: str, rows_per_chunk: int) -> Iterator[np.ndarray]:
        e = self.entry(name)
        n_rows = e.shape[0] if len(e.shape) > 1 else 1
        for r0 in range(0, n_rows, rows_per_chunk):
            yield self.rows(name, r0, min(n_rows, r0 + rows_per_chunk))
