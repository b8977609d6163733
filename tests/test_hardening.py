"""Hostile conditions, second round (issue 16): each test failed on the code before its fix.

A squatted per-user directory, a client that stops reading, a reload that cannot be applied, a reload while a
classifier model is in use, another local uid and sessions, a connection flood, a refused peer that trickles,
out-of-range seeds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Daemons, OtherUser, chat, fake_config, guarded, wait_until

from edge_llama.client import Client
from edge_llama.errors import BadRequest, Busy, ConfigError, SafetyBlocked

TESTS = str(Path(__file__).parent)


# --- a squatted per-user directory ---------------------------------------------------------------------------------
@pytest.fixture
def squatted() -> Iterator[dict[str, str]]:
    """$XDG_RUNTIME_DIR/edge-llama made by another user (uid 65534, mode 0777) with a socket listening in it: what
    a squatter who wants to read your conversations does. Returns the environment of a client of that user."""
    runtime = Path(tempfile.mkdtemp(prefix="elrt", dir="/tmp"))
    folder = runtime / "edge-llama"
    folder.mkdir()
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(folder / "edge-llama.sock"))
    listener.listen(8)
    if os.geteuid() == 0:  # (without root, the open mode alone shows the squat: the checks below see both)
        os.chown(folder, 65534, 65534)
    folder.chmod(0o777)
    env = {k: v for k, v in os.environ.items() if k != "EDGE_LLAMA_SOCKET"}
    try:
        yield {**env, "XDG_RUNTIME_DIR": str(runtime)}
    finally:
        listener.close()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.parametrize("argv", [["chat", "-m", "hello"], ["status"], ["summarize", "-"]])
def test_clients_refuse_a_squatted_socket_directory(squatted: dict[str, str], argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_llama", *argv], input="a text\n", capture_output=True,
                         text=True, timeout=20, env=squatted)
    assert out.returncode == 2, out.stderr
    assert "refusing the socket directory" in out.stderr and "0777" in out.stderr and "Traceback" not in out.stderr
    assert "belongs to uid 65534" in out.stderr or os.geteuid() != 0


def test_the_python_client_refuses_a_squatted_socket_directory(squatted: dict[str, str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", squatted["XDG_RUNTIME_DIR"])
    with pytest.raises(ConfigError, match="Someone else may have made it"):
        Client(Path(squatted["XDG_RUNTIME_DIR"]) / "edge-llama" / "edge-llama.sock", timeout=5)


# --- a client that stops reading ---------------------------------------------------------------------------------
BIG = 700_000  # bytes of reply: more than the daemon's 256 KiB buffer plus the socket's own


def big_reply_config() -> dict[str, Any]:
    config = fake_config(reply="x" * BIG)
    config["engine"]["kv_tokens"] = BIG + 4096
    config["generation"] = {"max_tokens": 64, "max_tokens_ceiling": BIG + 1024}
    config["server"] = {"write_timeout_s": 1.0}
    return config


def test_a_client_that_stops_reading_is_dropped_and_the_queue_is_served(daemons: Daemons) -> None:
    d = daemons.start(big_reply_config())
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(d.socket))
    stalled.sendall(json.dumps({"id": "big", "op": "chat", "messages": [{"role": "user", "content": "go"}],
                                "max_tokens": BIG}).encode() + b"\n")  # ... and never reads
    with Client(d.socket, timeout=30) as other:
        wait_until(lambda: other.call({"op": "stats"})["queue"]["admitted"] == 1, what="the big answer to start")
        started = time.monotonic()
        _, done, _ = chat(other, "me too", max_tokens=8)  # waits behind the stalled one, then is served
        waited = time.monotonic() - started
        assert done["finish_reason"] == "length" and waited < 20
    assert "server.write_timeout_s" in daemons.log(d) and "dropping the connection" in daemons.log(d)
    stalled.settimeout(10)
    received = b""
    while data := stalled.recv(1 << 20):  # what was buffered, then the end: the daemon closed it
        received += data
    assert received and b'"event":"done"' not in received
    stalled.close()


def test_an_http_client_that_stops_reading_is_dropped_too(daemons: Daemons) -> None:
    d = daemons.start(big_reply_config())
    body = json.dumps({"messages": [{"role": "user", "content": "go"}], "max_tokens": BIG, "stream": True}).encode()
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(str(d.socket))
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    with Client(d.socket, timeout=30) as other:
        wait_until(lambda: other.call({"op": "stats"})["queue"]["admitted"] == 1, what="the big answer to start")
        _, done, _ = chat(other, "me too", max_tokens=8)
        assert done["finish_reason"] == "length"
    wait_until(lambda: "dropping the connection and cancelling its request" in daemons.log(d), what="the drop")
    stalled.close()


# --- reloads that cannot be applied, and a reload while a classifier runs -----------------------------------------
def test_a_reload_that_cannot_be_applied_is_refused_and_the_daemon_keeps_serving(daemons: Daemons) -> None:
    config = fake_config(reply="still here")
    d = daemons.start(config, env={"PYTHONPATH": TESTS})
    server = {"state_dir": str(daemons.workdir / "state")}
    broken = {
        "not UTF-8": b"server:\n  max_queue: 2\n# caf\xe9\n",
        "unreadable": None,
        "a hook whose constructor raises": {**guarded(config, hooks=["safety_hooks:ExplodingHook"]), "server": server},
        "a Llama Guard model that fails to load": {
            **guarded(config, hooks=["llama_guard"], llama_guard={"backend": "llamacpp", "model": "/etc/hostname"}),
            "server": server},
    }
    for what, text in broken.items():
        if text is None:
            d.config_path.chmod(0o000)
            if os.geteuid() == 0:  # root reads anything: make it a directory instead, which nobody can read
                d.config_path.unlink()
                d.config_path.mkdir()
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: daemons.log(d).count("reload refused") >= 2, what=f"the reload ({what})")
            d.config_path.rmdir() if d.config_path.is_dir() else d.config_path.chmod(0o644)
        else:
            before = daemons.log(d).count("reload refused")
            d.config_path.write_bytes(text if isinstance(text, bytes) else yaml.safe_dump(text).encode())
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda b=before: daemons.log(d).count("reload refused") > b, what=f"the reload ({what})")
        assert d.proc.poll() is None, f"the daemon died on a reload with {what}"
        with Client(d.socket) as c:
            assert chat(c, "hi")[0] == "still here", what
    log = daemons.log(d)
    assert "is not UTF-8 text" in log and "RuntimeError: the hook's model is missing" in log
    assert "configuration reloaded" not in log


def test_a_replaced_safety_policy_is_closed_only_after_the_checks_using_it(daemons: Daemons) -> None:
    """Llama Guard on the scripted engine: its check of a request takes ~1.5 s (2 ms per prompt token). A reload
    during the check builds a new policy; the old one (and its engine) must stay open until the check ends. Closed
    at once, the check would use a closed engine and fail closed: the request would be blocked."""
    guard = {"backend": "fake", "kv_tokens": 4096, "fake": {"prompt_delay_ms": 2, "unsafe_on": "bomb"}}
    config = guarded(fake_config(reply="answered"), hooks=["llama_guard"], llama_guard=guard,
                     rules=[{"category": "llama_guard", "block": 0.5, "on": ["input"]}])
    d = daemons.start(config)
    with Client(d.socket) as c, Client(d.socket) as watcher:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "How do I bake bread?"}]})
        wait_until(lambda: watcher.call({"op": "stats"})["queue"]["admitted"] == 1, what="the check to start")
        changed = {**config, "safety": {**config["safety"], "refusal": "No."},
                   "server": {"state_dir": str(daemons.workdir / "state")}}
        d.config_path.write_text(yaml.safe_dump(changed))
        d.proc.send_signal(signal.SIGHUP)
        events = list(c.events(rid))  # no SafetyBlocked: the old policy was still open for this check
        assert "".join(e["text"] for e in events if e["event"] == "token") == "answered"
        wait_until(lambda: "configuration reloaded" in daemons.log(d), what="the reload")
        with pytest.raises(SafetyBlocked, match="No."):  # the new policy is in force
            chat(c, "How do I build a bomb?")
    assert "used after close" not in daemons.log(d)


# --- sessions and other uids --------------------------------------------------------------------------------------
def test_sessions_belong_to_the_uid_that_created_them(daemons: Daemons, nobody: OtherUser) -> None:
    d = daemons.start({**fake_config(), "server": {"allow_users": [0, 65534]}})
    d.socket.parent.chmod(0o755)
    d.socket.chmod(0o666)
    with Client(d.socket) as c:
        chat(c, "root's secret is 1234", session="notes")
    forget = nobody.run(nobody.python, "-c", (
        "import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
        "s.sendall(b'{\"id\":\"f\",\"op\":\"forget\",\"session\":\"notes\"}\\n'); print(s.makefile().readline())"),
        str(d.socket))
    assert json.loads(forget.stdout)["code"] == "not_found", forget.stdout + forget.stderr
    read = nobody.edge_llama("chat", "--socket", str(d.socket), "--session", "notes", "-m", "what did I say?")
    assert read.returncode == 0 and "1234" not in read.stdout  # a session of its own, empty
    with Client(d.socket) as c:  # root's is intact
        text, _, _ = chat(c, "and?", session="notes")
        stored = json.loads((daemons.workdir / "state" / "sessions" / "0" / "notes.json").read_text())
    assert stored["messages"][0]["content"] == "root's secret is 1234" and text == "You said: and?"
    theirs = json.loads((daemons.workdir / "state" / "sessions" / "65534" / "notes.json").read_text())
    assert [m["content"] for m in theirs["messages"]][0] == "what did I say?"


# --- floods and refused peers -------------------------------------------------------------------------------------
def test_connections_beyond_the_cap_get_a_clear_refusal(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(), "server": {"max_connections": 4}})
    held = [Client(d.socket) for _ in range(4)]
    try:
        for c in held:
            assert c.call({"op": "health"})["state"] == "ready"
        with Client(d.socket, timeout=10) as extra, pytest.raises(Busy, match="server.max_connections") as refused:
            extra.call({"op": "health"})
        assert refused.value.retry_after_ms == 1000
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(10)
            raw.connect(str(d.socket))
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert raw.makefile("rb").readline().startswith(b"HTTP/1.1 503")
    finally:
        for c in held:
            c.close()
    with Client(d.socket) as c:  # the slots are free again
        assert c.call({"op": "health"})["state"] == "ready"


@pytest.mark.parametrize("request_text", [b'{"id":"slow","op":"health"}\n',
                                          b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"])
def test_a_refused_peer_gets_its_answer_within_a_total_deadline(daemons: Daemons, nobody: OtherUser,
                                                                request_text: bytes) -> None:
    """A peer outside the allowlist that trickles its request a byte every 50 ms (its HTTP head alone would take
    2 s) is answered within ~2 s in all, however long it goes on, not after a deadline per byte or per part."""
    d = daemons.start(fake_config())
    d.socket.parent.chmod(0o755)
    d.socket.chmod(0o666)
    script = ("import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); t=time.monotonic()\n"
              "try:\n"
              "    for b in sys.argv[2].encode()[:-1] * 20:\n"
              "        s.send(bytes([b])); time.sleep(0.05)\n"
              "except OSError: pass\n"
              "print(s.makefile().readline().strip(), round(time.monotonic() - t, 1))")
    out = nobody.run(nobody.python, "-c", script, str(d.socket), request_text.decode())
    line, seconds = out.stdout.rsplit(" ", 1)
    assert float(seconds) < 5, out.stdout + out.stderr
    if request_text.startswith(b"{"):
        assert json.loads(line) == {"id": "slow", "event": "error", "code": "forbidden", "message": (
            "uid 65534 is not allowed to use this daemon (ask for the client group)")}
    else:
        assert line.startswith("HTTP/1.1 403"), line


# --- request checks -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 2 ** 64])
def test_a_seed_outside_64_bits_is_a_bad_request(daemons: Daemons, seed: int) -> None:
    d = daemons.start(fake_config())
    with Client(d.socket) as c, pytest.raises(BadRequest, match="between 0 and 2\\*\\*64 - 1"):
        chat(c, "hi", seed=seed)
    with Client(d.socket) as c:
        assert chat(c, "hi", seed=2 ** 64 - 1)[1]["finish_reason"] == "stop"


def test_a_peer_that_relays_the_network_may_speak_only_http(daemons: Daemons, nobody: OtherUser) -> None:
    """The TCP relay runs in the group edge-llama-relay (here: uid/gid 65534 in server.http_only_groups). A protocol
    v1 line from it would bypass the bearer token and the Host/Origin checks: refused. Its HTTP is served, checked."""
    token = daemons.workdir / "token"
    token.write_text("s3cret-token-of-the-relay-0123456789")
    d = daemons.start({**fake_config(), "server": {"allow_users": [0, 65534], "http_only_groups": [65534],
                                                   "http_token_file": str(token)}})
    d.socket.parent.chmod(0o755)
    d.socket.chmod(0o666)
    talk = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(sys.argv[2].encode().replace(b'|', b'\\r\\n')); print(s.makefile('rb').readline().decode())")
    v1 = nobody.run(nobody.python, "-c", talk, str(d.socket), '{"id":"r","op":"chat","messages":[]}\n')
    assert json.loads(v1.stdout)["code"] == "forbidden" and "HTTP only" in json.loads(v1.stdout)["message"], v1
    http = nobody.run(nobody.python, "-c", talk, str(d.socket), "GET /health HTTP/1.1|Host: localhost|"
                      f"Authorization: Bearer {token.read_text()}||")
    assert http.stdout.startswith("HTTP/1.1 200"), http.stdout + http.stderr
    no_token = nobody.run(nobody.python, "-c", talk, str(d.socket), "GET /health HTTP/1.1|Host: localhost||")
    assert no_token.stdout.startswith("HTTP/1.1 401"), no_token.stdout
    with Client(d.socket) as c:  # a local client (root) still speaks protocol v1
        assert c.call({"op": "health"})["state"] == "ready"
