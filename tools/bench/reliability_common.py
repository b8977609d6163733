"""Shared by the reliability bench's sections: daemons in a temporary lab directory, raw socket reading, figures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess

# The scripted engine, safety off: these sections test the daemon's own behaviour with exact timing (as the tests'
# conftest does). The sections on the real model run with the default configuration, safety included.
FAKE: dict[str, Any] = {"engine": {"backend": "fake", "kv_tokens": 512},
                        "generation": {"max_tokens": 64, "max_tokens_ceiling": 256},
                        "summarize": {"summary_tokens": 32}, "safety": {"enabled": False}}


def own_sessions(state: Path) -> Path:
    """Where the daemon keeps the sessions this process's chats create: one directory per client uid."""
    return state / "sessions" / str(os.getuid())


def fake(server: dict[str, Any] | None = None, kv_tokens: int = 512, **script: Any) -> dict[str, Any]:
    """Config for the scripted engine; `script` goes to engine.fake (reply, token_delay_ms, prompt_delay_ms...)."""
    return {**FAKE, "engine": {**FAKE["engine"], "kv_tokens": kv_tokens, "fake": script}, "server": server or {}}


class Lab:
    """A temporary directory (short: Unix socket paths are limited to 107 bytes) for daemons; every daemon started
    here is stopped by close()."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="el-rel-", dir="/tmp"))
        self.count = 0
        self.running: list[DaemonProcess] = []

    def start(self, config: dict[str, Any], name: str = "d", state_dir: Path | None = None, wait: bool = True,
              **launch: Any) -> DaemonProcess:
        """`edge-llama serve` on <root>/<name>.sock with `config`; state in <root>/<name>-state unless given.
        `launch` goes to DaemonProcess (command, env, program, cwd)."""
        self.count += 1
        config = dict(config)
        server = {"state_dir": str(state_dir or self.root / f"{name}-state"), **config.pop("server", {})}
        path = self.root / f"config{self.count}.yaml"
        path.write_text(yaml.safe_dump({"server": server, **config}))
        path.chmod(0o644)  # a daemon under another uid reads it
        daemon = DaemonProcess(self.root / f"{name}.sock", ["--config", str(path)],
                               log=self.root / f"{name}{self.count}.log", **launch)
        self.running.append(daemon)
        if wait:
            daemon.wait_ready(timeout=180)  # the real model loads in ~2 s, but in 15 s on a busy 2-core VM
        return daemon

    def log(self, daemon: DaemonProcess) -> str:
        assert daemon.log_path is not None
        return daemon.log_path.read_text(errors="replace")

    def close(self, keep: bool = False) -> None:
        """Stop every daemon; remove the directory unless `keep` (its logs show what went wrong)."""
        for daemon in self.running:
            daemon.stop(timeout=30)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def stats(sock: Path) -> dict[str, Any]:
    with Client(sock, timeout=30) as c:
        return c.call({"op": "stats"})


def wait_idle(sock: Path, timeout: float = 5.0) -> int:
    """Poll stats until no request is admitted; returns what is still admitted then (a leak when not 0)."""
    deadline = time.monotonic() + timeout
    while True:
        admitted = stats(sock)["queue"]["admitted"]
        if admitted == 0 or time.monotonic() > deadline:
            return admitted
        time.sleep(0.02)


def chat_request(text: str, **fields: Any) -> dict[str, Any]:
    return {"op": "chat", "messages": [{"role": "user", "content": text}], **fields}


class RawConnection:
    """A plain socket to the daemon that reads whole reply lines (and notices if the daemon closes it)."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, deadline: float) -> dict[str, Any] | None:
        """The next reply line as JSON (a non-JSON line is returned as {"raw": ...}); None at the deadline.
        Raises ConnectionError when the daemon closed the connection."""
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError("the daemon closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            event = json.loads(line)
        except ValueError:
            return {"raw": line[:200].decode("utf-8", "replace")}
        return event if isinstance(event, dict) else {"raw": repr(event)[:200]}

    def close(self) -> None:
        self.sock.close()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 2)


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MiB: now (VmRSS), its anonymous part (RssAnon: heap, KV cache), and the
    peak since it started (VmHWM)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "RssAnon", "VmHWM")}


def tracebacks(text: str) -> int:
    return text.count("Traceback (most recent call last)")
