"""The real daemon on a real socket, with the scripted engine where timing and exact tokens matter."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from conftest import Daemons, chat, fake_config, wait_until

from edge_llama.client import Client
from edge_llama.errors import Busy, ContextOverflow, NotFound, Unavailable


def raw_lines(sock_path, payload: bytes, count: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """Send raw bytes on a fresh connection and read `count` reply lines."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(payload)
        buf = b""
        while buf.count(b"\n") < count:
            data = s.recv(65536)
            assert data, "daemon closed the connection"
            buf += data
    return [json.loads(line) for line in buf.splitlines()[:count]]


def test_streamed_tokens_never_split_a_character(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="héllo wörld ✓ 日本"))
    with Client(d.socket) as c:
        text, done, events = chat(c, "hi")
    assert text == "héllo wörld ✓ 日本"
    assert all("\ufffd" not in e["text"] for e in events if e["event"] == "token")
    assert done["finish_reason"] == "stop"
    assert done["usage"]["completion_tokens"] == len("héllo wörld ✓ 日本".encode())  # one byte = one fake token
    assert set(done["timings"]) == {"queue_ms", "ttft_ms", "decode_tok_s"}


def test_bad_lines_get_errors_and_the_connection_stays_usable(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(), "server": {"max_line_bytes": 4096}})
    big = b'{"id":"big","op":"chat","messages":[{"role":"user","content":"' + b"x" * 10000 + b'"}]}\n'
    lines = raw_lines(d.socket, b"{nope\n" + b'{"id":"u","op":"health","x":"\xff"}\n' + big
                      + b'{"id":"t","op":"chat","messages":"hi"}\n' + b'{"id":"o","op":"fly"}\n'
                      + b'{"id":"h","op":"health"}\n', 6)
    assert [(line["id"], line.get("code")) for line in lines] == [
        (None, "bad_json"), (None, "bad_json"), (None, "too_large"), ("t", "bad_request"), ("o", "bad_request"),
        ("h", None)]
    assert lines[5]["event"] == "done" and lines[5]["state"] == "ready"


def test_max_messages_and_max_tokens_ceiling(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(), "server": {"max_messages": 3}})
    lines = raw_lines(d.socket, json.dumps({"id": "m", "op": "chat", "messages": [
        {"role": "user", "content": "a"}] * 4}).encode() + b"\n" + json.dumps({
            "id": "c", "op": "chat", "messages": [{"role": "user", "content": "a"}], "max_tokens": 100000,
        }).encode() + b"\n", 2)
    assert lines[0]["code"] == "too_large" and "limit is 3" in lines[0]["message"]
    assert lines[1]["code"] == "bad_request" and "ceiling of 256" in lines[1]["message"]


def test_context_overflow_and_truncation_are_reported(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="ok"))
    with Client(d.socket) as c:
        with pytest.raises(ContextOverflow, match="KV budget is 512 tokens"):
            chat(c, "x" * 600)
        history = []
        for i in range(6):
            history += [{"role": "user", "content": f"{i} " + "q" * 60}, {"role": "assistant", "content": "a" * 40}]
        request = {"op": "chat", "messages": history + [{"role": "user", "content": "last"}], "max_tokens": 64}
        done = c.call(request)
    assert done["truncated"]["messages"] >= 2 and done["truncated"]["messages"] % 2 == 0
    assert done["usage"]["prompt_tokens"] + 64 <= 512


def test_busy_answers_at_once_with_retry_hint(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(reply="z" * 200, token_delay_ms=10), "server": {"max_queue": 0}})
    with Client(d.socket) as slow, Client(d.socket) as other:
        slow.send({"op": "chat", "messages": [{"role": "user", "content": "go"}]})
        assert next(slow.events(slow.send({"op": "health"})))["queue"]["admitted"] == 1
        started = time.monotonic()
        with pytest.raises(Busy) as info:
            chat(other, "me too")
        assert time.monotonic() - started < 1.0
        assert info.value.retry_after_ms and info.value.retry_after_ms >= 100
        health = other.call({"op": "health"})  # the connection is still usable
        assert health["queue"]["limit"] == 1


def test_queue_is_first_come_first_served(daemons: Daemons) -> None:
    d = daemons.start(fake_config(token_delay_ms=2))
    with Client(d.socket) as c:
        ids = [c.send({"op": "chat", "messages": [{"role": "user", "content": f"n{i}"}], "stream": False})
               for i in range(3)]
        order = []
        while len(order) < 3:
            e = c.read_event()
            if e["event"] == "done":
                order.append((e["id"], e["text"]))
    assert order == [(ids[i], f"You said: n{i}") for i in range(3)]


def test_forget_waits_for_the_running_answer_then_deletes_the_session(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="y" * 200, token_delay_ms=5))
    stored = daemons.workdir / "state" / "sessions" / str(os.getuid()) / "s1.json"  # the peer's own namespace
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "hi"}], "session": "s1"})
        forget = c.send({"op": "forget", "session": "s1"})  # while the answer streams
        assert list(c.events(rid))[-1]["finish_reason"] in ("stop", "length")  # the answer was not cut short
        assert list(c.events(forget))[-1] == {"id": forget, "event": "done", "session": "s1", "found": True}
        assert not stored.exists() and stored.parent.is_dir()
        with pytest.raises(NotFound, match="no session 's1'"):
            c.call({"op": "forget", "session": "s1"})


def test_idle_sessions_and_crash_leftovers_are_deleted(daemons: Daemons) -> None:
    import os
    import time

    stored = daemons.workdir / "state" / "sessions" / "1000"  # another user's namespace
    stored.mkdir(parents=True)
    day_ago = time.time() - 86400
    for name, age in (("old.json", day_ago), ("fresh.json", None), (".old.x1.tmp", day_ago), (".new.x2.tmp", None)):
        (stored / name).write_text('{"schema": 1, "messages": []}')
        if age:
            os.utime(stored / name, (age, age))
    d = daemons.start({**fake_config(), "server": {"session_ttl_hours": 12}})
    assert sorted(p.name for p in stored.iterdir()) == [".new.x2.tmp", "fresh.json"]  # swept at start
    assert "deleted 1 session(s) idle for more than 12 h" in daemons.log(d)


def test_sessions_of_the_shared_namespace_of_earlier_versions_are_kept_for_the_daemons_uid(daemons: Daemons) -> None:
    """Before sessions had owners they were <state>/sessions/<name>.json, shared by every user: moved, not lost,
    into the daemon's own uid's namespace (nobody else may read them now)."""
    root = daemons.workdir / "state" / "sessions"
    root.mkdir(parents=True)
    (root / "old.json").write_text(json.dumps({"schema": 1, "messages": [
        {"role": "user", "content": "my name is Ada"}, {"role": "assistant", "content": "Hello Ada"}]}))
    d = daemons.start(fake_config(reply="ok"))
    assert not (root / "old.json").exists() and (root / str(os.getuid()) / "old.json").exists()
    assert "moved 1 session file(s) of the shared namespace" in daemons.log(d)
    with Client(d.socket) as c:  # the daemon's uid (this test's) continues it
        _, done, _ = chat(c, "and now?", session="old", stream=False)
    stored = json.loads((root / str(os.getuid()) / "old.json").read_text())
    assert [m["content"] for m in stored["messages"]] == ["my name is Ada", "Hello Ada", "and now?", "ok"]


def test_expiry_keeps_a_session_in_use(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from edge_llama.protocol import Message
    from edge_llama.service.sessions import SessionStore

    store = SessionStore(tmp_path, max_messages=8)
    store.prepare()
    store.save(7, "busy", [Message("user", "a")])
    store.save(7, "idle", [Message("user", "b")])
    store.save(8, "busy", [Message("user", "c")])  # another uid's session of the same name is not in use

    async def main() -> int:
        async with store.lock(7, "busy"):  # a request is between loading and saving it
            return store.expire(max_age_s=-1)

    assert asyncio.run(main()) == 2
    assert [p.name for p in (tmp_path / "sessions" / "7").iterdir()] == ["busy.json"]
    assert not list((tmp_path / "sessions" / "8").iterdir())


def test_session_locks_serialise_and_do_not_accumulate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from edge_llama.protocol import Message
    from edge_llama.service.sessions import SessionStore

    store = SessionStore(tmp_path, max_messages=8)
    store.prepare()
    order: list[str] = []

    async def turn(session: str, name: str) -> None:
        async with store.lock(0, session):
            order.append(f"{name} in")
            await asyncio.sleep(0.01)
            order.append(f"{name} out")
            store.save(0, session, [Message("user", name)])

    async def main() -> None:
        await asyncio.gather(turn("a", "first"), turn("a", "second"), *(turn(f"s{i}", f"s{i}") for i in range(50)))
        assert await store.forget(0, "a") and not await store.forget(0, "a")

    asyncio.run(main())
    assert order.index("first out") < order.index("second in")  # one session: one request at a time
    assert store._locks == {}  # nothing kept for the 51 sessions once their requests are done
    assert len(list((tmp_path / "sessions" / "0").glob("*.json"))) == 50


def test_cancel_request_stops_generation(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="y" * 2000, token_delay_ms=5))
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "long"}]})
        received = 0  # fake tokens are bytes: characters received so far
        for e in c.events(rid):
            if e["event"] == "token":
                received += len(e["text"])
                if received >= 10 and "at_cancel" not in locals():
                    at_cancel = received
                    c.send({"op": "cancel", "target": rid})
            if e["event"] == "done":
                done = e
    assert done["finish_reason"] == "cancelled"
    # Stopped within a few tokens: those made while the cancel travelled, plus at most one 20 ms stream batch.
    assert at_cancel <= done["usage"]["completion_tokens"] <= at_cancel + 8


def test_cancel_while_queued_and_during_prompt(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="r" * 50, prompt_delay_ms=20))
    with Client(d.socket) as c:
        first = c.send({"op": "chat", "messages": [{"role": "user", "content": "p" * 200}]})  # ~4 s of prefill
        queued = c.send({"op": "chat", "messages": [{"role": "user", "content": "next"}]})
        with Client(d.socket) as watcher:  # both admitted: the first in its prefill, the second waiting
            wait_until(lambda: watcher.call({"op": "stats"})["queue"]["admitted"] == 2)
        started = time.monotonic()
        c.send({"op": "cancel", "target": queued})
        c.send({"op": "cancel", "target": first})
        results = {}
        while len(results) < 2:
            e = c.read_event()
            if e["id"] in (first, queued) and e["event"] in ("done", "error"):
                results[e["id"]] = e
        assert time.monotonic() - started < 1.0
    assert results[queued]["event"] == "error" and results[queued]["code"] == "cancelled"
    assert results[first]["finish_reason"] == "cancelled" and results[first]["usage"]["completion_tokens"] == 0


def test_disconnect_cancels_within_a_token(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="w" * 5000, token_delay_ms=5))
    c = Client(d.socket)
    rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "go"}]})
    for e in c.events(rid):
        if e["event"] == "token":
            break
    c.close()
    deadline = time.monotonic() + 2
    with Client(d.socket) as probe:
        while time.monotonic() < deadline:
            stats = probe.call({"op": "stats"})
            if stats["finish_reasons"].get("cancelled"):
                break
            time.sleep(0.02)
        assert stats["finish_reasons"] == {"cancelled": 1}
        assert stats["queue"]["admitted"] == 0
        assert stats["tokens"]["completion"] < 200  # not the whole 5000-token reply


def test_engine_error_is_reported_and_daemon_keeps_serving(daemons: Daemons) -> None:
    d = daemons.start(fake_config(fail_on="explode"))
    with Client(d.socket) as c:
        lines = raw_lines(d.socket, json.dumps({"id": "e", "op": "chat", "messages": [
            {"role": "user", "content": "please explode"}]}).encode() + b"\n", 1)
        assert lines[0]["code"] == "internal" and "explode" in lines[0]["message"]
        assert chat(c, "fine")[0] == "You said: fine"


def test_socket_mode_stale_socket_and_second_daemon(daemons: Daemons, workdir) -> None:  # type: ignore[no-untyped-def]
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(workdir / "d.sock"))  # a socket file nobody listens on: what a crashed daemon leaves
    stale.close()
    d = daemons.start(fake_config())
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    second = subprocess.run([sys.executable, "-m", "edge_llama", "serve", "--backend", "fake", "--socket",
                             str(d.socket)], capture_output=True, text=True, timeout=30)
    assert second.returncode == 2
    assert "already serving" in second.stderr
    with Client(d.socket) as c:  # the first daemon is unharmed
        assert c.call({"op": "health"})["state"] == "ready"


def test_sigterm_drains_running_stream_then_exits_zero(daemons: Daemons) -> None:
    d = daemons.start(fake_config(reply="d" * 40, token_delay_ms=10))
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "go"}]})
        next(c.events(rid))
        d.proc.terminate()
        events = list(c.events(rid))
    assert events[-1]["finish_reason"] == "stop"  # finished within the grace period
    assert d.proc.wait(10) == 0
    assert not d.socket.exists()
    with pytest.raises(Unavailable, match="not running"):
        Client(d.socket)


def test_sigterm_cancels_what_outlives_the_grace_period(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(reply="g" * 5000, token_delay_ms=5), "server": {"shutdown_grace_s": 0.3}})
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "go"}], "max_tokens": 250})
        queued = c.send({"op": "chat", "messages": [{"role": "user", "content": "later"}]})
        next(c.events(rid))
        d.proc.terminate()
        ends = {}
        while len(ends) < 2:
            e = c.read_event()
            if e["event"] in ("done", "error"):
                ends[e["id"]] = e
    assert ends[rid]["finish_reason"] == "cancelled"
    assert ends[queued]["code"] == "unavailable"
    assert d.proc.wait(10) == 0


def test_a_second_signal_cancels_at_once(daemons: Daemons) -> None:
    # 250 tokens x 40 ms = 10 s of answer, inside a 60 s grace period: only the second Ctrl-C ends it early.
    d = daemons.start({**fake_config(reply="h" * 2000, token_delay_ms=40), "server": {"shutdown_grace_s": 60}})
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "go"}], "max_tokens": 250})
        next(c.events(rid))
        d.proc.send_signal(signal.SIGINT)
        wait_until(lambda: "shutting down" in daemons.log(d))  # the first signal is being handled: drain started
        d.proc.send_signal(signal.SIGINT)
        events = list(c.events(rid))
    assert events[-1]["finish_reason"] == "cancelled"
    assert len("".join(e.get("text", "") for e in events if e["event"] == "token")) < 200
    assert d.proc.wait(10) == 0
    assert "(second signal)" in daemons.log(d)
