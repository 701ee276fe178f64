"""The Prometheus text exposition of dairllm.metrics, checked against NumPy-computed buckets."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from dairllm.metrics import Registry

LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def samples(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) \w+ ", line), line
            continue
        m = LINE.match(line)
        assert m, line
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3).replace("+Inf", "inf"))
    return out


def test_histogram_buckets_are_cumulative_counts():
    rng = np.random.default_rng(1)
    values = rng.exponential(0.7, 500)
    buckets = (0.01, 0.1, 0.5, 1.0, 2.5)
    r = Registry()
    h = r.histogram("lat_seconds", "latency", buckets)
    for v in values:
        h.observe(float(v))
    s = samples(r.render())
    for b in buckets:
        assert s[f'lat_seconds_bucket{{le="{b}"}}'] == np.count_nonzero(values <= b)
    assert s['lat_seconds_bucket{le="+Inf"}'] == s["lat_seconds_count"] == 500
    assert math.isclose(s["lat_seconds_sum"], float(values.sum()), rel_tol=1e-12)


def test_counters_gauges_labels_and_escaping():
    r = Registry()
    c = r.counter("req_total", "requests")
    c.inc(endpoint="/v1", status="200")
    c.inc(2, endpoint="/v1", status="200")
    c.inc(endpoint='we"ird\\\n', status="500")
    r.gauge("depth", "queue", lambda: 3)
    r.gauge("stage_seconds_total", "per stage", lambda: {(("stage", "root"),): 1.5},
            type_="counter")
    text = r.render()
    assert "# TYPE req_total counter" in text and "# TYPE stage_seconds_total counter" in text
    s = samples(text)
    assert s['req_total{endpoint="/v1",status="200"}'] == 3
    assert s['req_total{endpoint="we\\"ird\\\\\\n",status="500"}'] == 1
    assert s["depth"] == 3 and s['stage_seconds_total{stage="root"}'] == 1.5


def test_histogram_needs_increasing_buckets():
    with pytest.raises(ValueError):
        Registry().histogram("x", "x", (1.0, 0.5))
