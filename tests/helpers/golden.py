"""The golden data in tests/golden/ (recorded from the real distributed-llama; see its README): the
one place tests find it. A missing file is an error, never a skip.

    model("tiny_q40")            -> Path of models/tiny_q40.m
    tokenizer("tiny_q40")        -> Path of models/tiny_q40.t
    logits("tiny_q40_2nodes")    -> the run's npz (tokens, positions, logits, generated, ...)
    single_node_run("tiny_q40")  -> logits("tiny_q40_1node")
    single_node("tiny_q40")      -> (model("tiny_q40"), single_node_run("tiny_q40"))
    run_recorded(model, z)       -> our logits for the run's forwards, same batch split
    check(name, logits, gold)    -> asserts LIMITS[name] (an independent implementation's error)

`python tests/helpers/golden.py --write-manifest` rewrites golden/manifest.json after a
deliberate change to the data.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
MODELS = ("tiny_f32", "tiny_q40", "qwen3tiny_f32", "qwen3tiny_q40", "moetiny_q40")
PROMPT = "hello world the of and to in a is hello world"     # README §4: every golden run's prompt


def model(name: str) -> Path:
    return _existing(GOLDEN / "models" / f"{name}.m")


def tokenizer(name: str) -> Path:
    return _existing(GOLDEN / "models" / f"{name}.t")


def logits(run: str):
    """logits/<run>.npz, e.g. "tiny_q40_1node", "moetiny_q40_4nodes" (README §4)."""
    import numpy as np
    return np.load(_existing(GOLDEN / "logits" / f"{run}.npz"))


def wire(*parts: str) -> Path:
    """A path under wire/ (README §6), e.g. wire("tiny_q40_2nodes", "messages.json")."""
    return _existing(GOLDEN.joinpath("wire", *parts))


def run_recorded(model, z):
    """Feed a golden run's forwards (same batch sizes and positions) to `model.forward`; stack
    the logits rows."""
    import numpy as np
    rows = []
    for size, start in zip(z["forward_batch_sizes"], z["forward_row_starts"]):
        tokens = z["tokens"][start:start + size]
        rows.append(np.asarray(model.forward(tokens, int(z["positions"][start]))))
    return np.concatenate(rows)


def single_node_run(name: str):
    """The single-node run of one of MODELS: logits(f"{name}_1node")."""
    return logits(f"{name}_1node")


def single_node(name: str):
    """(model path, its single-node run) for one of MODELS."""
    return model(name), single_node_run(name)


# -- comparing our logits with a single-node golden run ---------------------------------------------
# name: (max median row error, max single-row error, min argmax agreement of 64 rows,
#        max error of row 0)
# Row 0 of tiny_q40/qwen3tiny_q40 is already off with exact exp: dllama's AVX2 SiLU uses a
# polynomial exp whose 1e-5 differences flip Q80 roundings from the first layer on (README §5).
LIMITS = {
    "tiny_f32": (3e-5, 1e-4, 64, 1e-4),
    "qwen3tiny_f32": (3e-5, 1e-4, 64, 1e-4),
    "tiny_q40": (2.5e-2, 6e-2, 59, 6e-2),
    "qwen3tiny_q40": (2.5e-2, 6e-2, 59, 6e-2),
    "moetiny_q40": (2.0e-2, 2.0e-1, 59, 1e-4),   # one row hits an expert-gate near-tie
}
# dairllm's exact arithmetic keeps the residual stream in F32 where dllama rounds every block
# output through Q80: on Q40 models that is a different (more accurate) computation, off by that
# rounding from row 0 on. Measured (float64 reference without the residual rounding vs golden):
# median 1.4-2.9e-2, max 2.6e-2..3.8e-2 (moe: 0.13, the gate near-tie), 59-61 of 64 argmax.
EXACT_LIMITS = dict(LIMITS, **{
    "tiny_q40": (3.5e-2, 6e-2, 57, 4e-2),
    "qwen3tiny_q40": (3.5e-2, 6e-2, 57, 4e-2),
    "moetiny_q40": (2.5e-2, 2.0e-1, 57, 4e-2),
})


def row_errors(ours, gold):
    """||ours - gold|| / ||ours|| per row, over the vocabulary."""
    import numpy as np
    return np.linalg.norm(ours - gold, axis=1) / np.linalg.norm(ours, axis=1)


def check(name: str, logits, gold, limits: "dict | None" = None) -> dict:
    """Assert limits[name] (default LIMITS) for logits of the run's rows; return the summary."""
    import numpy as np
    rel = row_errors(logits, gold)
    agree = int((logits.argmax(axis=1) == gold.argmax(axis=1)).sum())
    summary = dict(median=float(np.median(rel)), max=float(rel.max()), first=float(rel[0]),
                   argmax=agree)
    med, worst, min_agree, first = (limits or LIMITS)[name]
    assert logits.shape == gold.shape
    assert rel[0] <= first, summary
    assert np.median(rel) <= med, summary
    assert rel.max() <= worst, summary
    assert agree >= min_agree, summary
    return summary


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"golden file {path} is missing (tests/golden/ is part of the "
                                f"repository; see its README)")
    return path


# -- manifest --------------------------------------------------------------------------------------

MANIFEST = GOLDEN / "manifest.json"


def data_files() -> list:
    """Every file of the golden folder except the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(GOLDEN).as_posix() for p in GOLDEN.rglob("*")
                  if p.is_file() and p != MANIFEST)


def describe(rel: str) -> dict:
    data = (GOLDEN / rel).read_bytes()
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest() -> None:
    files = [describe(rel) for rel in data_files()]
    text = json.dumps({"files": files, "total_bytes": sum(f["bytes"] for f in files)}, indent=1)
    MANIFEST.write_text(text + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-manifest"]:
        sys.exit(f"usage: python {sys.argv[0]} --write-manifest")
    write_manifest()
    print(f"wrote {MANIFEST}")
