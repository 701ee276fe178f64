"""Hashes of the bytes each node uses: one per transformer layer, cached in a manifest.

A unit is a layer index, or "embedding" / "head" (final norm and classifier) for the nodes that
use those too (tensor-parallel workers embed their tokens and compute a slice of the logits).

The sampled fingerprint (fingerprint.py) tells two files apart in milliseconds but misses a
flipped byte it does not sample. A cluster therefore also compares, layer by layer, a hash of
every byte a worker will multiply: the worker hashes the layers it is assigned when it loads them
and reports them in READY; the root hashes the same layers of its own file and compares
(cluster/integrity.py). A layer's hash covers its tensors' bytes in layout order (GGUF padding
between tensors is not used, so not hashed).

Hashing reads every byte once (xxh3_128 runs at ~12 GB/s from memory here, BLAKE3 at ~3 GB/s,
SHA-256 at ~1 GB/s: bench/bench_integrity.py), so the hashes are kept in a manifest under
$DAIRLLM_CACHE/integrity (default ~/.cache/dairllm), one JSON file per model keyed on the resolved
path, size, mtime and inode: a restart re-hashes nothing, and any write to the file (which
changes its mtime) or a replaced file (another inode) discards the manifest. A file damaged
without its mtime changing (bit rot under a cached manifest) is not re-detected; delete the
manifest or run with --verify-model for a full read.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

from ..cache import cache_dir as user_cache_dir

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
CHUNK = 1 << 24                       # bytes hashed per update: bounded time between page-ins

try:
    import xxhash

    ALGORITHM = "xxh3_128"

    def _hasher():
        return xxhash.xxh3_128()
except ImportError:                   # a core dependency; never silently weaker than this
    xxhash = None
    ALGORITHM = "blake2b"
    log.warning("the xxhash package is missing: layer hashes fall back to blake2b (about 10x "
                "slower; every node must use the same one): pip install xxhash")

    def _hasher():
        return hashlib.blake2b(digest_size=16)

_lock = threading.Lock()              # sessions of one worker load layers on their own threads


def cache_dir() -> Path:
    return user_cache_dir() / "integrity"


EDGE_UNITS = {"embedding": ("embedding",), "head": ("final_norm", "wcls")}


def unit_tensors(mf, unit: "int | str") -> list:
    if isinstance(unit, str):
        return [mf.layout[name] for name in EDGE_UNITS[unit]]
    return mf.layout.layer_tensors(unit)


def hash_layer(mf, layer: "int | str") -> str:
    """'<algorithm>:<hex>' of the bytes of every tensor of `layer` (a unit), in layout order."""
    h = _hasher()
    for t in unit_tensors(mf, layer):
        data = mf.buffer[t.offset:t.end]
        for i in range(0, t.nbytes, CHUNK):
            h.update(data[i:i + CHUNK])
    return f"{ALGORITHM}:{h.hexdigest()}"


def _file_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino, "algorithm": ALGORITHM, "version": MANIFEST_VERSION}


def manifest_path(path: Path) -> Path:
    name = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return cache_dir() / f"{name}.json"


def _load(where: Path, key: dict) -> dict:
    """The cached layer hashes of the file `key` describes ({} when absent, stale or damaged)."""
    try:
        data = json.loads(where.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("key") != key:
        return {}
    layers = data.get("layers")
    if not isinstance(layers, dict):
        return {}
    return {unit_key(k): v for k, v in layers.items()
            if (k.isdigit() or k in EDGE_UNITS) and isinstance(v, str)}


def unit_key(name: str) -> "int | str":
    """A unit as JSON names it ("3", "head") -> as layer_hashes takes it (3, "head")."""
    return int(name) if name.isdigit() else name


def _save(where: Path, key: dict, layers: dict) -> None:
    """Write the manifest atomically; a cache that cannot be written only costs time."""
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"key": key, "layers": {str(l): v for l, v in
                                                           layers.items()}}, sort_keys=True))
        os.replace(tmp, where)
    except OSError as e:
        log.warning("cannot write the integrity manifest %s (%s): layers are re-hashed on the "
                    "next start", where, e)


def layer_hashes(mf, layers: Iterable) -> dict:
    """{unit: hash} for `layers` (layer indices, "embedding", "head") of the opened model `mf`
    (ModelFile or GGUFModel): from the manifest when it matches the file, else hashed now and
    added to it."""
    layers = list(layers)
    path = Path(mf.path)
    with _lock:
        key = _file_key(path)
        where = manifest_path(path)
        known = _load(where, key)
        missing = [l for l in layers if l not in known]
        for l in missing:
            known[l] = hash_layer(mf, l)
        if missing:
            if _file_key(path) == key:      # the file did not change while we read it
                _save(where, key, known)
            log.info("%s: hashed %d layers (%s), %d from the manifest", path.name, len(missing),
                     ALGORITHM, len(layers) - len(missing))
    return {l: known[l] for l in layers}


__all__ = ["ALGORITHM", "EDGE_UNITS", "hash_layer", "layer_hashes", "unit_key", "manifest_path",
           "cache_dir"]
