"""Counters and histograms for `/metrics`, written in Prometheus' text exposition format (0.0.4).

A few dozen lines instead of a dependency: the server needs counters (optionally labelled),
gauges read at scrape time, and cumulative histograms; nothing here is per token hot.
All updates take one lock, so the event loop and generation threads may both record.
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

# Seconds: time to first token and request latency span milliseconds (cached prompt, tiny
# model) to minutes (a long prompt on a cluster).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)


def _labels(pairs: "tuple[tuple[str, str], ...]") -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _number(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Registry:
    """Named metrics, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list = []

    def counter(self, name: str, help_: str) -> "Counter":
        return self._add(Counter(name, help_, self._lock))

    def gauge(self, name: str, help_: str, read: Callable[[], "float | dict[tuple, float]"],
              type_: str = "gauge") -> "Gauge":
        """A value read at scrape time; type_="counter" for totals kept elsewhere."""
        return self._add(Gauge(name, help_, read, type_))

    def histogram(self, name: str, help_: str,
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> "Histogram":
        return self._add(Histogram(name, help_, tuple(buckets), self._lock))

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        with self._lock:
            lines = [line for m in self._metrics for line in m.lines()]
        return "\n".join(lines) + "\n"


class Counter:
    """A monotonically increasing value per label set."""

    def __init__(self, name: str, help_: str, lock: threading.Lock) -> None:
        self.name, self.help, self._lock = name, help_, lock
        self._values: dict = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        values = self._values or {(): 0.0}
        out += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(values.items())]
        return out


class Gauge:
    """A value read when scraped: a number, or {label tuple: number} for labelled series."""

    def __init__(self, name: str, help_: str, read: Callable, type_: str = "gauge") -> None:
        self.name, self.help, self._read, self.type = name, help_, read, type_

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.type}"]
        value = self._read()
        series = value.items() if isinstance(value, dict) else [((), value)]
        out += [f"{self.name}{_labels(k)} {_number(v)}" for k, v in series]
        return out


class Histogram:
    """Cumulative buckets, sum and count of observed values."""

    def __init__(self, name: str, help_: str, buckets: tuple, lock: threading.Lock) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("histogram buckets must be increasing")
        self.name, self.help, self._lock = name, help_, lock
        self.buckets = buckets + (math.inf,)
        self.counts = [0] * len(self.buckets)      # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self.counts[i] += 1
                    break
            self.sum += value
            self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for upper, n in zip(self.buckets, self.counts):
            running += n
            le = "+Inf" if math.isinf(upper) else repr(float(upper))    # "1.0", as Go writes
            out.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        out += [f"{self.name}_sum {_number(self.sum)}", f"{self.name}_count {self.count}"]
        return out
