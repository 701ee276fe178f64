"""Helpers for the dllama tests: kernel choice and an in-process worker.

A kernel library that cannot run the executor (a missing kernel, an import error) is an error
here, never a reason to skip: `default_kernels()` raises and the test fails."""
from __future__ import annotations

import logging
import socket
import threading

from oracles import dllama_kernels

KERNEL_PARAMS = ["ops", "numpy"]


def reference_platform() -> bool:
    """x86_64 with glibc: where the golden data was recorded. There the compiled kernels in exp mode
    "dllama" reproduce it bit for bit; elsewhere only the libm cosf/sinf behind the rope table may
    differ in a last bit (and then start Q80 rounding flips)."""
    import platform
    return platform.machine() in ("x86_64", "AMD64") and platform.libc_ver()[0] == "glibc"


def ops_kernels():
    """dairllm._ops, checked by the executor for every kernel it calls (raises if one is missing)."""
    from dairllm.dllama.executor import default_kernels
    return default_kernels()


def kernels_for(name: str):
    """'ops' = the compiled kernel library, 'numpy' = the float64 NumPy oracle in
    oracles/dllama_kernels.py (exercises the protocol layer independently)."""
    return dllama_kernels if name == "numpy" else ops_kernels()


class ThreadWorker:
    """`dairllm worker` in a thread on 127.0.0.1 (ephemeral port); serves sessions until stopped."""

    def __init__(self, kernels, model=None, setup_timeout: float = 10.0) -> None:
        from dairllm.dllama.worker import WorkerOptions
        from dairllm.sockets import listen as open_listener
        self.listener = open_listener("127.0.0.1", 0)
        self.port = self.listener.getsockname()[1]
        self.opts = WorkerOptions(kernels=kernels, model=model, setup_timeout=setup_timeout)
        self.sessions: list[bool] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from dairllm.dllama.worker import run_session_logged
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            self.sessions.append(run_session_logged(conn, self.listener, self.opts))
            self.listener.settimeout(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)
        self.listener.close()
        assert not self.thread.is_alive()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


logging.getLogger("dairllm").setLevel(logging.INFO)
