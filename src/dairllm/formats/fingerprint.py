"""Is this model file that one? The one fingerprint every part of dairllm compares.

The sampled fingerprint hashes the file size, its first 64 KiB (the header and what follows) and
SAMPLES blocks of BLOCK bytes spread evenly over the file (first and last block included):
milliseconds even for a 40 GB file, and any re-quantisation, different model or truncated copy
changes it. `full=True` (`--verify-model`) hashes every byte instead.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEAD_BYTES = 1 << 16
SAMPLES = 64
BLOCK = 4096


def model_fingerprint(path: "str | os.PathLike", full: bool = False) -> str:
    """'sampled:<hex>' or 'full:<hex>' (sha256, first 32 hex digits)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if full:
            while chunk := f.read(1 << 22):
                h.update(chunk)
            return "full:" + h.hexdigest()[:32]
        h.update(f.read(HEAD_BYTES))
        for i in range(SAMPLES):
            f.seek((size - BLOCK) * i // (SAMPLES - 1) if size > BLOCK else 0)
            h.update(f.read(BLOCK))
    return "sampled:" + h.hexdigest()[:32]
