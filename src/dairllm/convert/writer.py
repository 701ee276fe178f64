"""Writing a converted `.m` file: the one place every converter (Hugging Face folder, GGUF file)
goes through. The tensors come from a `source(info)` callback as row chunks (float values or
raw bytes), in the file order `ModelWriter` dictates; the file is written as `<out>.partial`
and renamed when complete, so an interrupted run never leaves a file that looks finished.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import ConfigError
from ..formats.modelfile import Header, Layout, ModelWriter, TensorInfo, tensor_layout

log = logging.getLogger(__name__)

Source = Callable[[TensorInfo], Iterable[np.ndarray]]


@dataclass
class ConvertStats:
    tensors: int = 0
    source_bytes: int = 0       # float32 bytes read
    output_bytes: int = 0
    seconds: float = 0.0


class Progress:
    """One updating line on a terminal, INFO logs otherwise."""

    def __init__(self, total: int, stream=sys.stderr, enabled: bool = True) -> None:
        self.total, self.stream, self.enabled = total, stream, enabled
        self.tty = enabled and hasattr(stream, "isatty") and stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, i: int, name: str, done_bytes: int) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        line = (f"[{i}/{self.total}] {name:<32} {done_bytes / 2**20:9.1f} MiB written, "
                f"{done_bytes / 2**20 / dt:7.1f} MiB/s")
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
        elif self.enabled:
            log.info(line)

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def planned_layout(header: Header) -> Layout:
    """The layout ModelWriter will write for `header` (tensor names, kinds, shapes, types)."""
    return tensor_layout(replace(header, header_size=len(header.to_bytes())))


def write_model(out_path: "str | os.PathLike", header: Header, source: Source,
                progress: bool = True,
                on_tensor: "Callable[[int, str, int], None] | None" = None) -> ConvertStats:
    """Write a `.m` file with `header`, each tensor's chunks from `source(info)`."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".partial")
    stats = ConvertStats()
    t0 = time.perf_counter()
    try:
        try:
            writer = ModelWriter(tmp, header)
        except OSError as e:
            raise ConfigError(f"cannot write {tmp}: {e.strerror}") from None
        with writer as w:
            infos = w.expected()
            bar = Progress(len(infos), enabled=progress)
            written = len(header.to_bytes())
            for i, t in enumerate(infos, 1):
                w.write_chunks(t.name, source(t))
                written += t.nbytes
                stats.source_bytes += 4 * t.rows * t.cols
                bar.update(i, t.name, written)
                if on_tensor:
                    on_tensor(i, t.name, written)
            bar.done()
        os.replace(tmp, out_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {out_path}: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats.tensors = len(infos)
    stats.output_bytes = out_path.stat().st_size
    stats.seconds = time.perf_counter() - t0
    return stats
