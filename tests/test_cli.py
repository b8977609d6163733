"""The `edge-llama` command as a user runs it: real subprocesses against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Daemons, fake_config


def cli(*args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_llama", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_help_teaches() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for word in ("serve", "chat", "summarize", "status", "examples:", "EDGE_LLAMA_SOCKET"):
        assert word in result.stdout


def test_daemon_not_running_is_one_clear_line(workdir: Path) -> None:
    for args in (("chat", "-m", "hi"), ("status",), ("summarize", "-")):
        result = cli(*args, "--socket", str(workdir / "none.sock"), stdin="text")
        assert result.returncode == 3
        assert result.stderr.strip().splitlines() == [
            f"edge-llama: the edge-llama daemon is not running at {workdir / 'none.sock'}; "
            "start it with: edge-llama serve"]


def test_bad_config_is_one_clear_line(workdir: Path) -> None:
    (workdir / "c.yaml").write_text("engine:\n  kv_tokenz: 5\n")
    result = cli("serve", "--config", str(workdir / "c.yaml"), "--socket", str(workdir / "x.sock"))
    assert result.returncode == 2
    assert "unknown key 'engine.kv_tokenz'" in result.stderr and "Traceback" not in result.stderr


def test_missing_model_is_one_clear_line(workdir: Path) -> None:
    result = cli("serve", "--model", str(workdir / "missing.gguf"), "--socket", str(workdir / "x.sock"))
    assert result.returncode == 2
    assert "cannot open model" in result.stderr and "Traceback" not in result.stderr


def test_document_over_the_line_limit_is_one_clear_line(daemons: Daemons, workdir: Path) -> None:
    d = daemons.start(fake_config())  # the daemon's line limit is 1 MiB by default
    (workdir / "big.txt").write_text("word " * 250_000)
    result = cli("summarize", "--socket", str(d.socket), str(workdir / "big.txt"), timeout=30)
    assert result.returncode != 0
    assert result.stderr == ("edge-llama: request line longer than 1048576 bytes (the daemon's server.max_line_bytes)"
                             "; it was discarded\n")


def test_chat_one_shot_stdin_summarize_and_status(daemons: Daemons, workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    d = daemons.start({"engine": {"kv_tokens": 1024}})
    sock = str(d.socket)
    one = cli("chat", "--socket", sock, "-m", "Say hello to Bob.", "--max-tokens", "20", "--temperature", "0")
    assert one.returncode == 0 and one.stdout.strip()
    piped = cli("chat", "--socket", sock, "--max-tokens", "20", "--temperature", "0", stdin="Say hello to Bob.")
    assert piped.returncode == 0 and piped.stdout == one.stdout
    (workdir / "doc.txt").write_text("The meeting moved to Tuesday at 10:00 in room 4. Bring the budget report.")
    summary = cli("summarize", "--socket", sock, str(workdir / "doc.txt"), "--max-tokens", "40")
    assert summary.returncode == 0 and summary.stdout.strip()
    status = cli("status", "--socket", sock)
    assert status.returncode == 0
    assert "ready" in status.stdout and "KV budget  1024 tokens" in status.stdout
    assert cli("summarize", "--socket", sock, str(workdir / "missing.txt")).stderr.startswith(
        "edge-llama: cannot read")


def test_interactive_chat_streams_cancels_and_resets(daemons: Daemons) -> None:
    pexpect = pytest.importorskip("pexpect")
    config = fake_config(token_delay_ms=3)
    config["engine"]["kv_tokens"] = 8192
    d = daemons.start({**config, "generation": {"max_tokens": 2000, "max_tokens_ceiling": 3000}})
    child = pexpect.spawn(sys.executable, ["-m", "edge_llama", "chat", "--socket", str(d.socket)],
                          env={**os.environ, "XDG_STATE_HOME": str(daemons.workdir)}, encoding="utf-8",
                          timeout=15)
    child.expect("/help for commands")
    child.expect(">>> ")
    child.sendline("first line \\")
    child.expect(r"\.\.\. ")
    child.sendline("second line")
    child.expect("You said: first line \r\nsecond line")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect("requests")
    child.expect(">>> ")
    # Ctrl-C while an answer streams stops that answer, not the program.
    child.sendline("x" * 1500)  # the fake echoes it: ~5 s of streaming
    child.expect("You said: x")
    child.sendintr()
    child.expect(r"\[answer stopped\]")
    child.expect(">>> ")
    sessions = daemons.workdir / "state" / "sessions" / str(os.getuid())  # this uid's namespace
    assert len(list(sessions.glob("*.json"))) == 1
    child.sendline("/reset")
    child.expect(r"\[conversation forgotten; new conversation\]")
    assert not list(sessions.glob("*.json"))
    child.sendline("hello again")
    child.expect("You said: hello again")
    child.expect(">>> ")
    assert len(list(sessions.glob("*.json"))) == 1
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert not list(sessions.glob("*.json"))  # no --session: nothing left behind
    assert daemons.workdir.joinpath("edge-llama", "chat_history").exists()  # input history kept for next time


def test_interactive_chat_goes_on_after_the_daemon_restarts(daemons: Daemons) -> None:
    pexpect = pytest.importorskip("pexpect")
    d = daemons.start(fake_config())
    child = pexpect.spawn(sys.executable, ["-m", "edge_llama", "chat", "--socket", str(d.socket), "--session", "s"],
                          env={**os.environ, "XDG_STATE_HOME": str(daemons.workdir)}, encoding="utf-8",
                          timeout=15)
    child.expect(">>> ")
    child.sendline("one")
    child.expect("You said: one")
    child.expect(">>> ")
    d.stop()  # e.g. `systemctl restart edge-llama` while the user reads the answer
    daemons.start(fake_config())
    child.sendline("two")
    child.expect(r"\[the daemon closed the connection; reconnecting\]")
    child.expect("You said: two")  # the message was resent, not lost
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    stored = json.loads((daemons.workdir / "state" / "sessions" / str(os.getuid()) / "s.json").read_text())
    assert [m["content"] for m in stored["messages"]] == ["one", "You said: one", "two", "You said: two"]


def test_leaving_the_chat_does_not_wait_for_a_stopped_daemon(daemons: Daemons) -> None:
    pexpect = pytest.importorskip("pexpect")
    d = daemons.start(fake_config())
    child = pexpect.spawn(sys.executable, ["-m", "edge_llama", "chat", "--socket", str(d.socket)],
                          env={**os.environ, "XDG_STATE_HOME": str(daemons.workdir)}, encoding="utf-8",
                          timeout=15)
    child.expect(">>> ")
    d.stop()
    child.sendline("/exit")  # the exit `forget` tries once, without the 30 s reconnect wait
    child.expect(pexpect.EOF, timeout=5)
    child.close()
    assert child.exitstatus == 0
