"""Non-finite values are a fault, never an answer: checks for activations and logits.

A damaged scale (an F16 inf, or a huge value that overflows a dot product) turns whole rows into
NaN; argmax of NaN logits is token 0, so without a check a damaged model "works" and prints
garbage. A check is one sum, which allocates nothing in the decode loop: a finite sum means every
value is finite (a NaN or an infinity makes it NaN or infinite); only a non-finite sum (a fault,
or finite values whose float32 sum overflows) is looked at value by value.
"""
from __future__ import annotations

import numpy as np

from ..errors import IntegrityError


def all_finite(x: np.ndarray) -> bool:
    with np.errstate(invalid="ignore", over="ignore"):   # inf + -inf: the NaN is the answer
        if np.isfinite(np.add.reduce(x, axis=None)):     # in x's own type: no buffer
            return True
    return bool(np.isfinite(x).all())    # a NaN or an inf, or finite values whose sum overflows


def nonfinite_rows(x: np.ndarray) -> list:
    """Indices of the rows of a 2-D x holding a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(x).all(axis=1)).tolist()


def check_finite(x: np.ndarray, what: str, p0: "int | None" = None, hint: str = "") -> None:
    """IntegrityError naming `what` unless every value of the rows x (rows at positions p0..,
    when given) is finite."""
    if all_finite(x):
        return
    rows = x.reshape(x.shape[0], -1)
    bad = nonfinite_rows(rows)
    at = f"position {p0 + bad[0]}" if p0 is not None else f"row {bad[0]}"
    raise IntegrityError(f"{what}: non-finite values in {len(bad)} of {rows.shape[0]} rows "
                         f"(first at {at}){hint}")


def check_head(x: np.ndarray, logits: np.ndarray, p0: int, path: object) -> None:
    """The last stage boundary of a run: the residual stream x entering the head, then the
    logits. A damaged scale makes x infinite while the logits may stay finite (all zero: the
    quantized input of the classifier rounds NaN to 0), so x is checked first."""
    hint = (f": the weights of {path} are damaged or overflow; `dairllm inspect --verify "
            f"{path}` checks every scale")
    check_finite(x, "activations after the last layer", p0, hint)
    check_finite(logits, "logits", p0, hint)


__all__ = ["all_finite", "nonfinite_rows", "check_finite", "check_head"]
