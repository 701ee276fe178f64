"""Text tables for people: the layer assignment and the network figures after a run."""
from __future__ import annotations


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def assignment_table(a) -> str:
    """One row per node: layers, memory vs budget, predicted compute and network per token."""
    rows = [("node", "layers", "resident", "streamed", "memory", "budget", "compute/tok",
             "network/tok")]
    for s in a.stages:
        layers = f"{s.start}-{s.end - 1}" if s.n_layers else ("(head)" if s.node == 0 else "(spare)")
        rows.append((s.name, layers, str(s.resident), str(s.streamed), _mib(s.memory),
                     _mib(s.budget), f"{s.compute_s * 1e3:.2f} ms", f"{s.network_s * 1e3:.2f} ms"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    b = a.bottleneck
    lines.append(f"predicted: {a.time_per_token * 1e3:.2f} ms/token, "
                 f"{a.bytes_per_token:,} bytes/token on the wire "
                 f"({a.costs.record_bytes:,} per record, 2 per active worker); "
                 f"slowest stage: {b.name} ({(b.compute_s + b.network_s) * 1e3:.2f} ms)"
                 + (" [manual --layers]" if a.manual else ""))
    lines.extend(f"note: {n}" for n in a.notes)
    return "\n".join(lines)


def network_summary(stats, generated: int) -> str:
    """Per-token bytes and per-stage timings of a cluster run (ClusterModel.net_stats)."""
    lines = []
    if stats.decode_bytes:
        n = len(stats.decode_bytes)
        lines.append(f"network: {sum(stats.decode_bytes) / n:,.0f} bytes per decoded token "
                     f"({n} tokens); {sum(stats.decode_seconds) / n * 1e3:.2f} ms per decoded token "
                     f"through all stages")
    lines.append(f"network total: {stats.bytes_sent:,} bytes sent, {stats.bytes_received:,} "
                 f"received over {stats.forwards} forwards ({stats.tokens} rows)")
    if stats.stage_seconds:
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in stats.stage_seconds.items())
        lines.append(f"stage time (incl. network): {parts}")
    for worker, err, dt in stats.faults:
        lines.append(f"fault: {worker} ({err}); recovered in {dt:.2f} s")
    return "\n".join(lines)
