"""Sizes and RAM: budgets as users write them, and what this machine has.

"4G", "512M", "1.5GiB", "123456789" (bytes) or "50%": one syntax for every `--ram-budget`
(generate, chat, serve, worker, a cluster root). Units are binary (K = 1024, M = 2**20,
G = 2**30, T = 2**40), with or without a trailing "B" or "iB", case-insensitive. A percentage is
relative to what the model needs to run fully resident (every layer, the classifier and the run
state); it is resolved by whoever knows that number, so `parse_budget` returns a `Budget` that
may still be relative.
"""
from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

from ..errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class Budget:
    """Either an absolute number of bytes or a fraction (0 < f <= 1) of the fully resident size."""

    nbytes: "int | None" = None
    fraction: "float | None" = None

    def resolve(self, full_bytes: int) -> int:
        """Bytes allowed, given the bytes a fully resident run needs."""
        if self.nbytes is not None:
            return self.nbytes
        return int(self.fraction * full_bytes)

    def __str__(self) -> str:
        if self.nbytes is not None:
            return format_bytes(self.nbytes)
        return f"{self.fraction * 100:g}%"


def parse_budget(value: "str | int | float | Budget") -> Budget:
    """A Budget from "4G", "512M", "50%", a plain byte count, or a Budget (returned as is)."""
    if isinstance(value, Budget):
        return value
    if isinstance(value, bool):
        raise ConfigError(f"RAM budget must be a size like 4G, 512M or 50%, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0 or value != value:
            raise ConfigError(f"RAM budget must be positive, got {value!r}")
        return Budget(nbytes=int(value))
    if not isinstance(value, str):
        raise ConfigError(f"RAM budget must be a size like 4G, 512M or 50%, got {value!r}")
    m = _PERCENT.match(value)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ConfigError(f"RAM budget percentage must be in (0, 100], got {value!r}")
        return Budget(fraction=pct / 100.0)
    m = _PATTERN.match(value)
    if not m:
        raise ConfigError(f"cannot read RAM budget {value!r}: use a size like 4G, 512M, "
                          f"1.5GiB, a byte count, or a percentage like 50%")
    nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if nbytes <= 0:
        raise ConfigError(f"RAM budget must be positive, got {value!r}")
    return Budget(nbytes=nbytes)


def resolve_budget(value: "str | int | Budget | None", full_bytes: int) -> "int | None":
    """Bytes of a budget given what a fully resident run needs; None stays None."""
    return None if value is None else parse_budget(value).resolve(full_bytes)


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else physical RAM."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return physical_ram()


def physical_ram() -> int:
    """Total RAM via sysconf, else 4 GiB."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; for messages and tables."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class RamLedger:
    """One RAM budget shared by a worker's sessions: each reserves its KV cache and buffers when it
    is assigned work and releases them when it ends, so sessions together stay within `total`.

        n = ledger.reserve(state_bytes, "layers 0..3")   # ConfigError when it does not fit
        ledger.release(n)
    """

    def __init__(self, total: int) -> None:
        self.total = int(total)
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, what: str) -> int:
        with self._lock:
            if self.used + nbytes > self.total:
                raise ConfigError(
                    f"{what} need {nbytes / 2**20:.0f} MiB, more than "
                    f"this worker's {self.total / 2**20:.0f} MiB RAM budget leaves "
                    f"({self.used / 2**20:.0f} MiB held by its other sessions)")
            self.used += nbytes
        return nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.used = max(self.used - nbytes, 0)

    def free(self) -> int:
        with self._lock:
            return self.total - self.used
