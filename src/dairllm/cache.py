"""Where dairllm keeps what it builds once and reuses: the default model, Q40x8 repacked copies,
layer hashes. $DAIRLLM_CACHE, or ~/.cache/dairllm."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("DAIRLLM_CACHE") or "~/.cache/dairllm").expanduser()
