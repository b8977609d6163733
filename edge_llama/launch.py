"""Start a daemon as a child process and wait until it answers: for the demo, the benchmarks and the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from edge_llama.client import Client
from edge_llama.errors import Unavailable


class DaemonProcess:
    """`edge-llama serve` in a child process on `socket`; stop() sends SIGTERM and returns the exit status."""

    def __init__(self, socket: Path, args: Sequence[str] = (), log: Path | None = None,
                 env: dict[str, str] | None = None, command: Sequence[str] = (),
                 program: Sequence[str] = (sys.executable, "-m", "edge_llama"), cwd: Path | None = None) -> None:
        self.socket = socket
        self.log_path = log
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        self._log = out
        # `command` prefixes the daemon (e.g. systemd-socket-activate ...), `env` adds to the environment,
        # `program` is how edge-llama is run (an installed `edge-llama` script, say).
        self.proc = subprocess.Popen(
            [*command, *program, "serve", "--socket", str(socket), *args],
            stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd,
        )

    def wait_ready(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"daemon exited with status {self.proc.returncode} before it was ready"
                                  + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                with Client(self.socket, timeout=5) as client:
                    return client.call({"op": "health"})
            except (Unavailable, OSError):
                time.sleep(0.05)
        raise Unavailable(f"daemon not ready on {self.socket} after {timeout:.0f} s")

    def stop(self, timeout: float = 30.0, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self._log is not subprocess.DEVNULL:
                self._log.close()

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
