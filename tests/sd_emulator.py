"""A small stand-in for systemd's side of sd_notify, for tests on machines where systemd is not PID 1.

It receives the daemon's notifications on a datagram socket (as $NOTIFY_SOCKET), and enforces what the service
manager would: the start timeout (extended by EXTEND_TIMEOUT_USEC) until READY=1, then WatchdogSec between
WATCHDOG=1 pings, answering a miss with SIGABRT the way systemd does.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path


class NotifyListener:
    """Collects sd_notify datagrams as (monotonic time, {field: value}) in arrival order."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def keys(self) -> list[str]:
        """The sequence of notification kinds, e.g. ["STATUS", "READY", "WATCHDOG", ...] (STATUS-only ones
        as "STATUS", others by their first non-STATUS field)."""
        with self._lock:
            out = []
            for _, fields in self.messages:
                main = [k for k in fields if k != "STATUS"]
                out.append(main[0] if main else "STATUS")
            return out

    def statuses(self) -> list[str]:
        with self._lock:
            return [f["STATUS"] for _, f in self.messages if "STATUS" in f]

    def wait_for(self, key: str, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.keys().count(key) >= count:
                return
            time.sleep(0.02)
        raise AssertionError(f"no {count} x {key} within {timeout} s; got {self.keys()}")

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class ServiceManager:
    """Enforces TimeoutStartSec (with EXTEND_TIMEOUT_USEC) and WatchdogSec for one already-started process."""

    def __init__(self, listener: NotifyListener, pid: int, start_timeout_s: float, watchdog_s: float) -> None:
        self.listener = listener
        self.pid = pid
        self.start_timeout_s = start_timeout_s
        self.watchdog_s = watchdog_s
        self.verdict: str | None = None  # "start-timeout" | "watchdog" once enforced

    def supervise(self, duration_s: float) -> str | None:
        """Watch for `duration_s`; on a missed deadline send SIGABRT (as systemd does) and return why."""
        started = time.monotonic()
        start_deadline = started + self.start_timeout_s
        seen = 0
        ready = False
        last_ping = started
        while time.monotonic() - started < duration_s:
            with self.listener._lock:
                new = self.listener.messages[seen:]
                seen += len(new)
            for at, fields in new:
                if "EXTEND_TIMEOUT_USEC" in fields:
                    start_deadline = max(start_deadline, at + int(fields["EXTEND_TIMEOUT_USEC"]) / 1e6)
                if fields.get("READY") == "1":
                    ready = True
                    last_ping = at
                if fields.get("WATCHDOG") == "1":
                    last_ping = at
            now = time.monotonic()
            if not ready and now > start_deadline:
                return self._abort("start-timeout")
            if ready and now - last_ping > self.watchdog_s:
                return self._abort("watchdog")
            time.sleep(0.01)
        return None

    def _abort(self, why: str) -> str:
        self.verdict = why
        try:
            os.kill(self.pid, signal.SIGABRT)
            os.kill(self.pid, signal.SIGCONT)  # a stopped process gets the SIGABRT as it resumes
        except ProcessLookupError:
            pass
        return why
