"""A TCP forwarder that models a network link on 127.0.0.1: one-way delay and a rate per direction.

    python bench/linksim.py --listen 7001 --target 127.0.0.1:9998 --delay-ms 0.1 --rate-mbit 1000

For machines whose kernel lacks netem. Each direction is a reader thread and a sender thread:
a chunk that arrives at t is on the wire from max(t, when the previous chunk left) for
len * 8 / rate seconds, and is delivered `delay` after that. Threads sleep with
clock_nanosleep (time.sleep), so sub-millisecond delays hold to ~0.05 ms (an asyncio loop rounds
its timers up to whole milliseconds). The forwarder runs with real-time priority where it may
(a wire takes no CPU from the nodes; without it, every hop would wait for a time slice on a
machine whose cores the nodes keep busy).
"""
from __future__ import annotations

import argparse
import collections
import os
import socket
import subprocess
import sys
import threading
import time


def _pump(src: socket.socket, dst: socket.socket, delay: float, rate: float) -> None:
    queue: collections.deque = collections.deque()
    ready = threading.Condition()

    def read() -> None:
        free_at = 0.0
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            now = time.perf_counter()
            if data:
                start = max(now, free_at)
                free_at = start + len(data) * 8 / rate if rate else start
                due = free_at + delay
            else:
                due = now
            with ready:
                queue.append((due, data))
                ready.notify()
            if not data:
                return

    def send() -> None:
        while True:
            with ready:
                while not queue:
                    ready.wait()
                due, data = queue.popleft()
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=send, daemon=True).start()


def wire_priority() -> str:
    """Run ahead of the nodes' compute threads: a real link needs no CPU of the nodes, but on a
    machine whose cores the nodes keep busy the forwarder would wait for a time slice (a
    millisecond or more) at every hop. Real-time scheduling where allowed, else a lower nice."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        return "SCHED_FIFO"
    except (AttributeError, PermissionError, OSError):
        pass
    try:
        os.nice(-10)
        return "nice -10"
    except OSError:
        return "normal"


def serve(listen_port: int, target: tuple, delay: float, rate: float) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(16)
    print(f"listening on 127.0.0.1:{listen_port}", flush=True)
    while True:
        a, _ = srv.accept()
        try:
            b = socket.create_connection(target)
        except OSError:
            a.close()
            continue
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _pump(a, b, delay, rate)
        _pump(b, a, delay, rate)


class Link:
    """A forwarder child process in front of `target` ("host:port"); `.addr` is what to dial."""

    def __init__(self, target: str, delay_ms: float, rate_mbit: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.addr = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--listen", str(self.port), "--target", target,
             "--delay-ms", str(delay_ms), "--rate-mbit", str(rate_mbit)],
            stdout=subprocess.PIPE, text=True)
        if "listening" not in self.proc.stdout.readline():
            self.stop()
            raise RuntimeError(f"link forwarder to {target} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", required=True, help="host:port to forward to")
    ap.add_argument("--delay-ms", type=float, default=0.1, help="one-way delay (default 0.1)")
    ap.add_argument("--rate-mbit", type=float, default=1000.0, help="per direction (0: no limit)")
    args = ap.parse_args()
    wire_priority()
    host, _, port = args.target.rpartition(":")
    serve(args.listen, (host, int(port)), args.delay_ms / 1e3, args.rate_mbit * 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
