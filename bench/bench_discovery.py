"""Worker discovery (issue 17): how long the broadcast query takes to reach every advertiser,
and what checking a discovered worker with the handshake costs.

    python bench/bench_discovery.py                     # 1, 4, 16 advertisers; 2 real workers
    python bench/bench_discovery.py --advertisers 1 32 --repeat 50

Part 1, in one process: N `Advertiser`s share a UDP port on this machine; one query goes to the
loopback broadcast address and the time until all N replies have arrived is taken, --repeat
times (median and max). Bytes per query and per reply are printed from the datagrams.
Part 2: two `dairllm worker --advertise` processes with the golden tiny model; the time of
`check_workers` (the HMAC handshake, fingerprint and round-trip pings an explicit --workers run
also does) over both, in parallel, --repeat times.
Run on a shared machine: take ratios and orders of magnitude, not exact figures.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from dairllm.cluster import discovery as D
from dairllm.cluster.local import LocalWorker

GOLDEN_MODEL = Path(__file__).resolve().parents[1] / "tests" / "golden" / "models" / "tiny_q40.m"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def all_replies_seconds(port: int, n: int, timeout: float = 2.0) -> float:
    """Seconds from sending one query to the n-th valid reply (inf if they do not all come)."""
    nonce = os.urandom(D.NONCE_BYTES)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        t0 = time.perf_counter()
        s.sendto(D.make_query(nonce), (D.LOOPBACK_BROADCAST, port))
        got = 0
        while got < n:
            s.settimeout(max(timeout - (time.perf_counter() - t0), 0.001))
            try:
                data = s.recv(64)
            except socket.timeout:
                return float("inf")
            got += D.parse_reply(data, nonce) is not None
        return time.perf_counter() - t0


def bench_replies(counts: list, repeat: int) -> None:
    print(f"query {D.QUERY_SIZE} bytes, reply {len(D.make_reply(bytes(16), bytes(8), 1))} bytes")
    for n in counts:
        port = free_udp_port()
        ads = [D.Advertiser(1000 + i, port) for i in range(n)]
        try:
            times = [all_replies_seconds(port, n) for _ in range(repeat)]
        finally:
            for a in ads:
                a.stop()
        print(f"{n:>3} advertisers: all replies in median {statistics.median(times) * 1e3:.2f} ms, "
              f"max {max(times) * 1e3:.2f} ms ({repeat} queries)")


def bench_check(repeat: int) -> None:
    port = free_udp_port()
    args = ["--advertise", "--discovery-port", str(port), "--secret", "S", "--speed", "1e9"]
    workers = [LocalWorker(GOLDEN_MODEL, args=args) for _ in range(2)]
    try:
        for w in workers:
            w.wait_ready(60)
        found = D.discover(0.5, port, targets=[D.LOOPBACK_BROADCAST])
        assert len(found) == 2, found
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            checked = D.check_workers(found, GOLDEN_MODEL, b"S", timeout=10)
            times.append(time.perf_counter() - t0)
            assert all(c.usable for c in checked), checked
        print(f"check_workers, 2 real workers (tiny_q40): median {statistics.median(times) * 1e3:.1f}"
              f" ms, max {max(times) * 1e3:.1f} ms ({repeat} runs)")
    finally:
        for w in workers:
            w.stop()


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--advertisers", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    print(f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} (shared machine)")
    bench_replies(args.advertisers, args.repeat)
    bench_check(max(args.repeat // 4, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
