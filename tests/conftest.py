"""Shared fixtures: real daemons in child processes on short temporary socket paths."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="el", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemons:
    """Starts daemons with a given config; stops every one at the end of the test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[DaemonProcess] = []
        self.count = 0

    def start(self, config: dict[str, Any] | None = None, wait: bool = True, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, command: tuple[str, ...] = ()) -> DaemonProcess:
        self.count += 1
        config_path = self.workdir / f"config{self.count}.yaml"
        config = dict(config or {})
        server = {"state_dir": str(self.workdir / "state"), **config.pop("server", {})}
        config_path.write_text(yaml.safe_dump({"server": server, **config}))
        daemon = DaemonProcess(self.workdir / "d.sock", ["--config", str(config_path), *args],
                               log=self.workdir / f"daemon{self.count}.log", env=env, command=command)
        daemon.config_path = config_path  # type: ignore[attr-defined]
        self.running.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def log(self, daemon: DaemonProcess) -> str:
        assert daemon.log_path is not None
        return daemon.log_path.read_text()

    def stop_all(self) -> None:
        for daemon in self.running:
            daemon.stop(timeout=20)


@pytest.fixture
def daemons(workdir: Path) -> Iterator[Daemons]:
    d = Daemons(workdir)
    yield d
    d.stop_all()


# Protocol tests script exact token timing: the safety guard (which holds text back by design) is off here and
# on in tests/test_safety.py (`guarded`).
FAKE = {"engine": {"backend": "fake", "kv_tokens": 512}, "generation": {"max_tokens": 64, "max_tokens_ceiling": 256},
        "summarize": {"summary_tokens": 32}, "safety": {"enabled": False}}


def fake_config(**fake: Any) -> dict[str, Any]:
    """Config for the scripted engine; keyword arguments go to engine.fake (reply, token_delay_ms, ...)."""
    return {**FAKE, "engine": {**FAKE["engine"], "fake": fake}}


def guarded(config: dict[str, Any], **safety: Any) -> dict[str, Any]:
    """`config` with the safety hook on (defaults plus `safety` overrides)."""
    return {**config, "safety": dict(safety)}


def chat(client: Client, text: str, **fields: Any) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Send one chat message; returns (streamed text, done event, all events)."""
    events = list(client.events(client.send({"op": "chat", "messages": [{"role": "user", "content": text}],
                                             **fields})))
    text_out = "".join(e["text"] for e in events if e["event"] == "token")
    return text_out, events[-1], events
