"""A pipeline cluster that changes while it serves: workers joining, and stage times that drift.

    watcher = WorkerWatcher(fingerprint, secret, path, timeout=10, discovery_port=9990)
    watcher.retry("10.0.0.5:9990")          # a worker that failed: try it again, with backoff
    ...                                      # between tokens, the root:
    for link in watcher.take(): ...          # connected, authenticated workers: re-plan

    drift = DriftMonitor(window=32)
    drift.add({"root": 0.004, "10.0.0.5:9990": 0.012})    # seconds per stage, one decoded token
    if drift.window_full(): per_token = drift.take(); ... drift.judge(current_s, best_s)

The watcher is a thread that only connects (the handshake proves the secret and the model's
fingerprint); it never touches the model: the root takes what it found at a token boundary and
re-plans there (cluster/root.py, ClusterModel.replan). Every wait is an Event wait, so stopping
it takes at most one connection attempt. A worker that answers with another secret or another
model is logged once and never tried again.

The drift rule has hysteresis: a window's measured layout must be slower than the best re-plan
with the measured speeds by more than `threshold`, `strikes` windows in a row, and the last
re-plan must be at least `cooldown` decoded tokens ago; one busy window does nothing.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from ..errors import DairError
from .connect import connect_worker
from .protocol import PeerLost

log = logging.getLogger("dairllm.cluster.elastic")

DISCOVER_EVERY = 3.0          # seconds between discovery queries
DISCOVER_WAIT = 1.0           # seconds one query waits for answers
RETRY_FIRST, RETRY_MAX = 1.0, 30.0      # backoff of a worker that does not answer


class WorkerWatcher:
    """A background thread that finds workers to join: addresses to retry, and (with
    `discovery_port`) whatever answers the discovery query."""

    def __init__(self, fingerprint: str, secret: "bytes | None", path, timeout: float,
                 discovery_port: "int | None" = None, interval: float = DISCOVER_EVERY,
                 known: "set[str] | None" = None) -> None:
        self.fingerprint, self.secret, self.path = fingerprint, secret, path
        self.timeout = timeout
        self.discovery_port = discovery_port
        self.interval = interval
        self._lock = threading.Lock()
        self._known = set(known or ())          # connected (or being used): not tried
        self._retry: dict = {}                  # address -> (next try at, backoff seconds)
        self._refused: set = set()              # another secret or model: never again
        self._found: list = []                  # links ready for the root
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker watcher", daemon=True)
        self._thread.start()

    def retry(self, address: str) -> None:
        """Try `address` again (it failed, left, or is down), after a backoff."""
        with self._lock:
            self._known.discard(address)
            if address not in self._refused and address not in self._retry:
                self._retry[address] = (_now() + RETRY_FIRST, RETRY_FIRST)
        self._wake.set()

    def take(self) -> list:
        """The workers connected since the last call (the caller owns the links now)."""
        with self._lock:
            found, self._found = self._found, []
        return found

    def waiting(self) -> int:
        """How many connected workers wait for the root to take them."""
        with self._lock:
            return len(self._found)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(self.timeout + DISCOVER_WAIT + 5)
        for link in self.take():
            link.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for addresses in self._candidates():
                if self._stop.is_set():
                    return
                self._try(addresses)
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        with self._lock:
            due = [t for t, _ in self._retry.values()]
        wait = self.interval if self.discovery_port is not None else RETRY_MAX
        return max(0.05, min([wait] + [t - _now() for t in due]))

    def _candidates(self) -> list:
        """Workers to try now, each as the addresses it may be reached at (first first)."""
        now = _now()
        with self._lock:
            out = [[a] for a, (t, _) in self._retry.items() if t <= now]
        if self.discovery_port is not None:
            out += self._discover()
        return out

    def _discover(self) -> list:
        from .discovery import discover
        try:
            found = discover(DISCOVER_WAIT, self.discovery_port)
        except OSError as e:
            log.debug("discovery failed: %s", e)
            return []
        with self._lock:
            seen = self._known | self._refused | set(self._retry)
            return [[f"{h}:{f.port}" for h in f.hosts] for f in found
                    if not seen & {f"{h}:{f.port}" for h in f.hosts}]

    def _try(self, addresses: list) -> None:
        """Connect to the first of `addresses` that answers (one worker may answer discovery
        from several interfaces and listen on one)."""
        for address in addresses:
            try:
                link = connect_worker(address, self.fingerprint, self.secret, self.timeout,
                                      self.path)
                break
            except PeerLost as e:
                log.debug("worker %s not reachable: %s", address, e)
            except DairError as e:               # another secret or model: never used
                with self._lock:
                    self._refused.update(addresses)
                    self._retry.pop(address, None)
                log.warning("worker %s cannot join: %s (not tried again)", address, e)
                return
        else:
            with self._lock:
                for address in addresses:
                    if address in self._retry:
                        _, backoff = self._retry[address]
                        backoff = min(backoff * 2, RETRY_MAX)
                        self._retry[address] = (_now() + backoff, backoff)
            return
        with self._lock:
            self._retry.pop(address, None)
            self._known.add(address)
            if self._stop.is_set():
                link.close()
                return
            self._found.append(link)


def _now() -> float:
    return time.monotonic()


@dataclass
class DriftMonitor:
    """Seconds per decoded token of each node's stages over a window, and the re-plan verdict."""
    window: int = 32              # decoded tokens per measurement
    threshold: float = 0.25       # re-plan when the layout is this much slower than the best
    strikes: int = 2              # windows in a row that must say so
    cooldown: int = 64            # decoded tokens after a re-plan before the next one
    _sums: dict = field(default_factory=dict)
    _tokens: int = 0
    _strikes: int = 0
    _since: int = 1 << 30         # tokens since the last re-plan

    def add(self, seconds: dict) -> None:
        """One decoded token: seconds each node spent on it (its stages, the hop included)."""
        for name, s in seconds.items():
            self._sums[name] = self._sums.get(name, 0.0) + s
        self._tokens += 1
        self._since += 1

    def window_full(self) -> bool:
        return self._tokens >= self.window

    def take(self) -> dict:
        """Seconds per token of each node over the window; starts the next window."""
        out = {name: s / max(self._tokens, 1) for name, s in self._sums.items()}
        self._sums, self._tokens = {}, 0
        return out

    def judge(self, current: float, best: float) -> bool:
        """True when the layout (predicted `current` seconds per token with the measured
        speeds) has been slower than the best plan (`best`) long enough to re-plan."""
        if current > best * (1 + self.threshold):
            self._strikes += 1
        else:
            self._strikes = 0
        return self._strikes >= self.strikes and self._since >= self.cooldown

    def replanned(self) -> None:
        """A re-plan happened (for any reason): measure the new layout from scratch."""
        self._sums, self._tokens, self._strikes, self._since = {}, 0, 0, 0


__all__ = ["WorkerWatcher", "DriftMonitor"]
