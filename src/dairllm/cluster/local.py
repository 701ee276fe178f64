"""Workers on this machine as child processes: for the demo, benchmarks and tests.

`LocalWorker` runs `python -m dairllm worker` on a free port, waits until it prints that it
listens, and stops it (terminate, then kill) however the caller ends.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ..errors import DairError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalWorker:
    """One `dairllm worker --model MODEL` child process listening on `host`.

    prefix: a command to run it under (e.g. `ip netns exec NS`), with connect_host the address a
    root reaches it at when that is not `host`; capture_stderr keeps the
    worker's log for `stop()` to return; new_session keeps Ctrl-C for the parent, which stops it.
    """

    def __init__(self, model: "str | Path", *, host: str = "127.0.0.1", threads: int = 1,
                 args: Sequence[str] = (), prefix: Sequence[str] = (),
                 env: "dict | None" = None, capture_stderr: bool = False,
                 new_session: bool = False, connect_host: "str | None" = None) -> None:
        self.port = free_port()
        self.addr = f"{connect_host or host}:{self.port}"     # what a root dials
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "dairllm", "worker", "--model", str(model),
             "--host", host, "--port", str(self.port), "--nthreads", str(threads), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE if capture_stderr else subprocess.DEVNULL,
            text=True, env=env if env is not None else os.environ.copy(),
            start_new_session=new_session)

    def wait_ready(self, timeout: float = 60.0) -> "LocalWorker":
        """Block until the worker listens; DairError (and the worker stopped) if it cannot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready and "listening" in self.proc.stdout.readline():
                return self
        code = self.proc.poll()
        log = self.stop()
        why = f"exited ({code})" if code is not None else f"did not start in {timeout:.0f} s"
        raise DairError(f"worker on port {self.port} {why}" + (f": {log.strip()[-500:]}" if log else ""))

    def stop(self) -> str:
        """Stop the worker (terminate, then kill); its captured stderr, if any."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        err = self.proc.stderr.read() if self.proc.stderr else ""
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream:
                stream.close()
        return err

    def __enter__(self) -> "LocalWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
