"""HTTP/1.1 on the daemon's socket, with real clients: the official `openai` package (sync and async, through an
httpx transport bound to the socket), curl --unix-socket, raw sockets for the HTTP edge cases, and Prometheus'
own text parser for /metrics. The scripted engine drives the mechanics; the embedded model serves the openai
client."""

from __future__ import annotations

import asyncio
import json
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import openai
import pytest
from conftest import Daemons, OtherUser, chat, fake_config, guarded, wait_until
from prometheus_client.parser import text_string_to_metric_families

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess

CHAT = "/v1/chat/completions"
REPO = Path(__file__).resolve().parents[1]
CURL = shutil.which("curl")


# --- clients ---------------------------------------------------------------------------------------------------
def http(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=30)


def oai(sock: Path) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def stats_of(sock: Path) -> dict[str, Any]:
    with Client(sock) as c:
        return c.call({"op": "stats"})


def connect(sock: Path, timeout: float = 10) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(sock))
    return s


def post(path: str, body: dict[str, Any] | bytes, extra: str = "") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra}\r\n").encode() + data


def read_response(f: BinaryIO) -> tuple[int, dict[str, str], bytes]:
    """One response from a socket file: status, headers (lower-case names), body (Content-Length or chunked)."""
    status_line = f.readline()
    if not status_line:
        raise EOFError("the daemon closed the connection")
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()
        f.readline()
    else:
        body = f.read()
    return int(status_line.split()[1]), headers, body


def exchange(sock: Path, data: bytes, count: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    with connect(sock) as s, s.makefile("rb") as f:
        s.sendall(data)
        return [read_response(f) for _ in range(count)]


def closed_by_daemon(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def error_of(response: tuple[int, dict[str, str], bytes] | httpx.Response) -> dict[str, Any]:
    body = response.json() if isinstance(response, httpx.Response) else json.loads(response[2])
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def sse_data(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded (the final [DONE] as the string)."""
    out = []
    for line in body.splitlines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def scrape(sock: Path) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with http(sock) as c:
        response = c.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def fake() -> Iterator[DaemonProcess]:
    """One scripted-engine daemon (echo replies, 1 ms per token) shared by the mechanics tests."""
    workdir = Path(tempfile.mkdtemp(prefix="elh", dir="/tmp"))
    daemons = Daemons(workdir)
    try:
        # 128 connections: test_100_concurrent_connections opens 100 at once (the default cap is 64).
        yield daemons.start({**fake_config(token_delay_ms=1), "server": {"max_connections": 128}})
    finally:
        daemons.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the real model through the official client ------------------------------------------------------------------
def test_openai_client_sync_and_async_on_the_embedded_model(daemons: Daemons) -> None:
    d = daemons.start({"engine": {"kv_tokens": 1024}})
    question = user("Name three colours of the rainbow.")
    client = oai(d.socket)
    assert [m.id for m in client.models.list()] == [d.wait_ready()["model"]]

    whole = client.chat.completions.create(model="any", messages=question, temperature=0, max_tokens=12)
    stream = client.chat.completions.create(model="any", messages=question, temperature=0, max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content  # greedy: the same answer either way
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # include_usage: a last chunk with usage
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert 0 < whole.usage.completion_tokens <= 12
    with Client(d.socket) as c:  # protocol v1 on the same socket runs the same chat
        assert chat(c, question[0]["content"], temperature=0, max_tokens=12)[0] == streamed

    short = client.chat.completions.create(model="any", messages=user("Tell me a long story."), max_tokens=4)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4

    with pytest.raises(openai.BadRequestError) as overflow:
        client.chat.completions.create(model="any", messages=user("word " * 3000), max_tokens=16)
    assert overflow.value.status_code == 400 and overflow.value.code == "context_overflow"
    assert "KV budget is 1024 tokens" in overflow.value.message and "prompt tokens" in overflow.value.message

    async def async_client() -> tuple[str, str]:
        aclient = openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                                     http_client=httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(
                                         uds=str(d.socket))))
        async with aclient:
            one = await aclient.chat.completions.create(model="any", messages=question, temperature=0,
                                                        max_tokens=12)
            pieces = [c.choices[0].delta.content or "" async for c in await aclient.chat.completions.create(
                model="any", messages=question, temperature=0, max_tokens=12, stream=True)]
        return one.choices[0].message.content or "", "".join(pieces)

    assert asyncio.run(async_client()) == (streamed, streamed)


# --- curl ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CURL is None, reason="curl not installed (Debian package curl)")
def test_curl_unix_socket(fake: DaemonProcess) -> None:
    def curl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CURL, "-sS", "--unix-socket", str(fake.socket), *args], capture_output=True,  # type: ignore[list-item]
                              text=True, timeout=30)

    models = json.loads(curl("http://localhost/v1/models").stdout)
    assert models["object"] == "list" and models["data"][0]["id"] == "fake"
    answer = json.loads(curl("http://localhost/v1/chat/completions", "-H", "Content-Type: application/json",
                             "-d", json.dumps({"model": "m", "messages": user("curl here")})).stdout)
    assert answer["choices"][0]["message"]["content"] == "You said: curl here"
    streamed = sse_data(curl("-N", "http://localhost/v1/chat/completions", "-H", "Content-Type: application/json",
                             "-d", json.dumps({"messages": user("streaming"), "stream": True})).stdout)
    assert streamed[-1] == "[DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1]) == "You said: streaming"
    # Two URLs in one curl run: the second reuses the first's connection (keep-alive).
    both = curl("-v", "http://localhost/health", "http://localhost/v1/models")
    assert both.stdout.count('"state": "ready"') == 1 and "Re-using existing connection" in both.stderr
    refused = curl("-w", "\n%{http_code}", "http://localhost/v1/chat/completions", "-H",
                   "Content-Type: application/json", "-d", json.dumps({"messages": user("x"), "n": 3}))
    body, status = refused.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(body)["error"]["param"] == "n"


# --- the OpenAI request contract ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "status", "param", "words"), [
    ({"messages": user("hi"), "temperature": "hot"}, 400, "temperature", "must be a number, got str"),
    ({"messages": user("hi"), "temperature": 2.5}, 400, "temperature", "[0, 2]"),
    ({"messages": user("hi"), "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"messages": user("hi"), "max_tokens": True}, 400, "max_tokens", "must be an integer"),
    ({"messages": user("hi"), "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
    ({"messages": user("hi"), "max_tokens": 100000}, 400, "max_tokens", "ceiling of 256"),
    ({"messages": user("hi"), "stream": "yes"}, 400, "stream", "true or false"),
    ({"messages": user("hi"), "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"messages": user("hi"), "n": 2}, 400, "n", "must be 1"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f b"}}]}, 400,
     "tools[0].function.name", "A-Z a-z 0-9"),
    ({"messages": user("hi"), "functions": [{"name": "f"}]}, 400, "functions", "use 'tools'"),
    ({"messages": user("hi"), "logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": user("hi"), "response_format": {"type": "xml"}}, 400, "response_format.type",
     "text, json_object or json_schema"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string or a list of text parts"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content", "images"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].tool_call_id", "must name the call"),
    ({"messages": [{"role": "function", "content": "x"}]}, 400, "messages[0].role", "use 'tool' messages"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", "last message must be the user's"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": user("hi " * 600)}, 400, "messages", "KV budget is 512 tokens"),
])
def test_bad_requests_get_400_in_openai_shape(fake: DaemonProcess, body: dict[str, Any], status: int,
                                              param: str | None, words: str) -> None:
    with http(fake.socket) as c:
        response = c.post(CHAT, json=body)
    error = error_of(response)
    assert response.status_code == status and error["param"] == param and words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == ("context_overflow" if "KV budget" in words else "bad_request")


def test_openai_fields_unknown_ones_ignored(fake: DaemonProcess) -> None:
    body = {"model": "gpt-4o", "messages": [
        {"role": "developer", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
        "user": "u-1", "seed": 7, "temperature": 0, "top_p": 1, "n": 1, "stop": None, "presence_penalty": 0,
        "some_future_field": {"x": 1}, "max_completion_tokens": 64}
    with http(fake.socket) as c:
        response = c.post(CHAT, json=body)
        short = c.post(CHAT, json={"messages": user("cut me short"), "max_tokens": 5}).json()
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion" and answer["model"] == "fake" and answer["id"].startswith("chatcmpl-")
    assert answer["choices"][0]["message"]["content"] == "You said: part one\npart two"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert short["choices"][0]["message"]["content"] == "You s" and short["choices"][0]["finish_reason"] == "length"
    assert short["usage"] == {"prompt_tokens": 16, "completion_tokens": 5, "total_tokens": 21}


def test_old_turns_left_out_are_reported(fake: DaemonProcess) -> None:
    old = [{"role": role, "content": f"{role} turn {i} " + "x" * 120} for i in range(4)
           for role in ("user", "assistant")]
    with http(fake.socket) as c:
        answer = c.post(CHAT, json={"messages": [*old, *user("and now?")]}).json()
    assert answer["choices"][0]["message"]["content"] == "You said: and now?"
    assert answer["truncated"]["messages"] >= 2 and answer["truncated"]["tokens"] > 200  # the KV budget is 512


def test_stop_strings_cut_the_answer(fake: DaemonProcess) -> None:
    with http(fake.socket) as c:
        whole = c.post(CHAT, json={"messages": user("alpha beta gamma"), "stop": ["gam", "zzz"]}).json()
        streamed = sse_data(c.post(CHAT, json={"messages": user("alpha beta gamma"), "stop": "beta",
                                               "stream": True}).text)
        missed = c.post(CHAT, json={"messages": user("alpha"), "stop": ["alphabet"]}).json()
    assert whole["choices"][0]["message"]["content"] == "You said: alpha beta "
    assert whole["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1])
    assert text == "You said: alpha " and streamed[-2]["choices"][0]["finish_reason"] == "stop"
    # A held-back partial match that never completes is released at the end.
    assert missed["choices"][0]["message"]["content"] == "You said: alpha"


# --- one socket, one daemon -------------------------------------------------------------------------------------
def test_protocol_v1_and_http_share_the_socket_and_the_counters(fake: DaemonProcess) -> None:
    before = scrape(fake.socket)
    with Client(fake.socket) as v1, http(fake.socket) as c:
        assert chat(v1, "over ndjson")[0] == "You said: over ndjson"
        assert c.post(CHAT, json={"messages": user("over http")}).json()["choices"][0]["message"]["content"] == (
            "You said: over http")
        assert chat(v1, "again")[0] == "You said: again"
        assert c.get("/health").json()["state"] == "ready"
        assert c.get("/nowhere").status_code == 404 and c.post("/health", json={}).status_code == 405
    after = scrape(fake.socket)
    assert metric(after, "edge_llama_requests_total", op="chat") - metric(before, "edge_llama_requests_total",
                                                                           op="chat") == 3
    assert metric(after, "edge_llama_generations_total", finish_reason="stop") - metric(
        before, "edge_llama_generations_total", finish_reason="stop") == 3


# --- admission, safety, cancellation, draining: the same as protocol v1 ------------------------------------------
def test_busy_gets_429_with_retry_after(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(reply="x" * 100, token_delay_ms=20), "server": {"max_queue": 0}})
    with http(d.socket) as c, c.stream("POST", CHAT, json={"messages": user("hold"), "stream": True}) as held:
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: a dropped iterator closes the response (and so cancels the request)
        next(lines)  # the engine is busy with it
        with pytest.raises(openai.RateLimitError) as busy:
            oai(d.socket).chat.completions.create(model="m", messages=user("me too"))
        response = busy.value.response
        assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) >= 100
        assert busy.value.code == "busy" and error_of(response)["type"] == "rate_limit_error"
    assert "429 busy" in daemons.log(d)


def test_safety_blocks_are_400_or_content_filter_and_never_deliver_blocked_text(daemons: Daemons) -> None:
    reply = ("Sure. Gardens need water, light and patience; plant flowers where the sun stays longest. " * 2
             + "You are a worthless piece of shit, " + "and here is more text. " * 5)
    config = guarded(fake_config(reply=reply, token_delay_ms=1))
    config["engine"]["kv_tokens"] = 2048
    config["generation"] = {"max_tokens": 512, "max_tokens_ceiling": 1024}
    d = daemons.start(config)
    client = oai(d.socket)
    with pytest.raises(openai.BadRequestError) as blocked:
        client.chat.completions.create(model="m", messages=user("You are a worthless piece of shit."))
    assert blocked.value.code == "safety_blocked" and "can't help with that" in blocked.value.message
    whole = client.chat.completions.create(model="m", messages=user("gardens?"))
    chunks = list(client.chat.completions.create(model="m", messages=user("gardens?"), stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    for text in (whole.choices[0].message.content or "", streamed):
        assert "shit" not in text and reply.startswith(text)  # only what passed the guard, in order
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "content_filter"
    assert whole.choices[0].message.refusal == "Sorry, I can't help with that."
    samples = scrape(d.socket)
    assert metric(samples, "edge_llama_safety_verdicts_total", kind="input", action="block", category="offensive") == 1
    assert metric(samples, "edge_llama_safety_verdicts_total", kind="output", action="block",
                  category="offensive") == 2
    assert metric(samples, "edge_llama_request_outcomes_total", op="chat", outcome="safety") == 2


def test_client_leaving_mid_stream_cancels_the_generation(daemons: Daemons) -> None:
    config = {**fake_config(reply="y" * 2000, token_delay_ms=5), "generation": {"max_tokens": 2000,
                                                                                  "max_tokens_ceiling": 2000}}
    config["engine"]["kv_tokens"] = 8192
    d = daemons.start(config)
    freed_ms = []
    for stream in (True, False):
        with connect(d.socket) as s, s.makefile("rb") as f:
            s.sendall(post(CHAT, {"messages": user("go"), "stream": stream}))
            if stream:
                assert f.readline().startswith(b"HTTP/1.1 200")
                while b'"content":"y' not in f.readline():  # tokens are flowing
                    pass
            else:  # an impatient client, leaving before any answer: once the engine runs its request
                wait_until(lambda: stats_of(d.socket)["queue"]["admitted"] == 1)
        left = time.monotonic()
        with Client(d.socket) as c:
            while c.call({"op": "health"})["queue"]["admitted"]:
                time.sleep(0.005)
            freed_ms.append((time.monotonic() - left) * 1000)
            stats = c.call({"op": "stats"})
    assert stats["finish_reasons"] == {"cancelled": 2}
    # Each would run 10 s (2000 tokens at 5 ms); cancelled, each stops within a token of the disconnect (the bounds
    # leave room for a loaded 2-core machine).
    assert stats["tokens"]["completion"] < 400
    assert max(freed_ms) < 2000


def test_draining_daemon_answers_503_and_finishes_running_streams(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(reply="z" * 300, token_delay_ms=5), "server": {"shutdown_grace_s": 10}})
    with http(d.socket) as running, http(d.socket) as other:
        assert other.get("/health").status_code == 200  # this connection stays open through the shutdown
        with running.stream("POST", CHAT, json={"messages": user("long"), "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            d.proc.send_signal(signal.SIGTERM)
            health = wait_until(lambda: (r := other.get("/health")).status_code == 503 and r)
            assert health.status_code == 503 and "stopping" in error_of(health)["message"]
            refused = other.post(CHAT, json={"messages": user("late")})
            assert refused.status_code == 503 and error_of(refused)["code"] == "unavailable"
            rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert d.proc.wait(15) == 0


# --- raw HTTP edge cases ------------------------------------------------------------------------------------------
def test_pipelined_requests_are_answered_in_order_on_one_connection(fake: DaemonProcess) -> None:
    data = (b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n" + post(CHAT, {"messages": user("first")})
            + post(CHAT, {"messages": user("second"), "stream": True})
            + b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
    responses = exchange(fake.socket, data, 4)
    assert [status for status, _, _ in responses] == [200, 200, 200, 200]
    assert json.loads(responses[0][2])["state"] == "ready"
    assert json.loads(responses[1][2])["choices"][0]["message"]["content"] == "You said: first"
    assert sse_data(responses[2][2].decode())[-1] == "[DONE]"
    assert json.loads(responses[3][2])["object"] == "list"


def test_a_request_trickling_in_byte_by_byte_is_still_http(fake: DaemonProcess) -> None:
    with connect(fake.socket) as s, s.makefile("rb") as f:
        for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n":  # the method arrives a letter at a time
            s.sendall(bytes([byte]))
            time.sleep(0.002)
        status, _, body = read_response(f)
    assert status == 200 and json.loads(body)["state"] == "ready"


def test_malformed_request_line_gets_400_and_the_connection_closes(fake: DaemonProcess) -> None:
    with connect(fake.socket) as s, s.makefile("rb") as f:
        s.sendall(b"GET /health HTTP/1.1 and more\r\nHost: localhost\r\n\r\n")
        status, headers, body = read_response(f)
        assert status == 400 and headers["connection"] == "close"
        assert "malformed" in error_of((status, headers, body))["message"]
        assert closed_by_daemon(s)
    # Not a method: a protocol v1 line (a bad one), answered as such on a connection that stays usable.
    with connect(fake.socket) as s, s.makefile("rb") as f:
        s.sendall(b'Hello daemon\n{"id": "h", "op": "health"}\n')
        assert json.loads(f.readline())["code"] == "bad_json"
        assert json.loads(f.readline())["state"] == "ready"


def test_post_without_content_length_gets_411(fake: DaemonProcess) -> None:
    with connect(fake.socket) as s, s.makefile("rb") as f:
        s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\r\n'
                  b'{"messages": []}')
        status, headers, body = read_response(f)
        assert status == 411 and "Content-Length" in error_of((status, headers, body))["message"]
        assert closed_by_daemon(s)


def test_chunked_request_body(fake: DaemonProcess) -> None:
    body = json.dumps({"messages": user("in chunks")}).encode()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    ((status, _, answer),) = exchange(fake.socket, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                      b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                                      + chunked + b"0\r\n\r\n")
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["content"] == "You said: in chunks"


def test_oversized_bodies_get_413_before_they_are_read(fake: DaemonProcess) -> None:
    with connect(fake.socket) as s, s.makefile("rb") as f:  # only the head is sent: the answer comes anyway
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000000\r\n\r\n")
        status, headers, body = read_response(f)
        assert status == 413 and error_of((status, headers, body))["code"] == "too_large"
        assert closed_by_daemon(s)
    with connect(fake.socket) as s, s.makefile("rb") as f:  # chunked: refused once the limit (1 MiB) is passed
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
        for _ in range(32):  # 2 MiB offered: the daemon answers after 1 MiB and drops the rest
            s.sendall(chunk)
        assert read_response(f)[0] == 413
        assert closed_by_daemon(s)


def test_oversized_headers_get_431(fake: DaemonProcess) -> None:
    ((status, headers, _),) = exchange(fake.socket, b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: "
                                       + b"a" * 20000 + b"\r\n\r\n")
    assert status == 431 and headers["connection"] == "close"


def test_slowloris_headers_time_out(fake: DaemonProcess) -> None:
    """A head trickling in a byte a second is cut off at the header deadline (10 s) from its first byte."""
    with connect(fake.socket, timeout=20) as s, s.makefile("rb") as f:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(20):
            if select.select([s], [], [], 1.0)[0]:  # the answer is there
                break
            s.sendall(b"X")
        answered_s = time.monotonic() - started
        # Not before the deadline (the upper bound is the loop above: 20 s of trickling were not waited for).
        assert read_response(f)[0] == 408 and answered_s >= 9.5


def test_100_concurrent_connections(fake: DaemonProcess) -> None:
    sockets = [connect(fake.socket, timeout=30) for _ in range(100)]  # all open at once
    results: list[tuple[int, dict[str, str], bytes]] = [None] * 100  # type: ignore[list-item]

    def talk(i: int) -> None:
        with sockets[i].makefile("rb") as f:
            sockets[i].sendall(post(CHAT, {"messages": user(f"n{i}")}))
            chat_answer = read_response(f)
            sockets[i].sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            results[i] = (chat_answer[0], chat_answer[1], read_response(f)[2])

    started = time.monotonic()
    threads = [threading.Thread(target=talk, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in sockets:
        s.close()
    assert time.monotonic() - started < 30
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 5  # 1 running + max_queue 4 at any moment
    assert all("retry-after" in r[1] for r in results if r[0] == 429)
    assert all(json.loads(r[2])["state"] == "ready" for r in results)  # each connection stayed usable


# --- /metrics ----------------------------------------------------------------------------------------------------
def test_metrics_parse_with_prometheus_parser(fake: DaemonProcess) -> None:
    before = scrape(fake.socket)
    with Client(fake.socket) as v1, http(fake.socket) as c:
        chat(v1, "remember me", session="metrics-session")
        for _ in range(3):
            c.post(CHAT, json={"messages": user("measure"), "stream": True})
        c.post(CHAT, json={"messages": user("x"), "n": 2})
        samples = scrape(fake.socket)
        v1.call({"op": "forget", "session": "metrics-session"})
    forgotten = scrape(fake.socket)

    def delta(name: str, **labels: str) -> float:
        return metric(samples, name, **labels) - metric(before, name, **labels)

    assert delta("edge_llama_requests_total", op="chat") == 5
    assert delta("edge_llama_request_outcomes_total", op="chat", outcome="stop") == 3
    assert delta("edge_llama_request_outcomes_total", op="chat", outcome="bad_request") == 1
    assert delta("edge_llama_errors_total", code="bad_request") == 1
    assert delta("edge_llama_ttft_seconds_count") == delta("edge_llama_decode_tokens_per_second_count") == 4
    count = metric(samples, "edge_llama_ttft_seconds_count")
    assert metric(samples, "edge_llama_ttft_seconds_bucket", le="+Inf") == count
    assert 0 < metric(samples, "edge_llama_ttft_seconds_sum") < count  # seconds: each well under one
    assert delta("edge_llama_tokens_total", kind="completion") == len("You said: remember me") + 3 * len(
        "You said: measure")
    assert metric(samples, "edge_llama_kv_budget_tokens") == 512
    assert metric(samples, "edge_llama_kv_tokens_in_use") == 0  # idle
    assert metric(samples, "edge_llama_queue_requests", state="waiting") == 0
    assert metric(samples, "edge_llama_queue_limit_requests") == 5
    assert metric(samples, "edge_llama_ready") == 1 and metric(samples, "edge_llama_engine_faulted") == 0
    assert metric(samples, "edge_llama_engine_stall_seconds") == 0
    assert metric(samples, "edge_llama_info", version="0.1.0", backend="fake", model="fake") == 1
    assert metric(samples, "edge_llama_sessions_on_disk") == 1
    assert metric(forgotten, "edge_llama_sessions_on_disk") == 0


# --- on TCP, through systemd-socket-proxyd (README) ------------------------------------------------------------
PROXYD = Path("/usr/lib/systemd/systemd-socket-proxyd")
ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(ACTIVATE is None or not PROXYD.exists(), reason="systemd's socket tools not installed")
def test_tcp_relay_through_systemd_socket_proxyd(fake: DaemonProcess, workdir: Path) -> None:
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = subprocess.Popen([ACTIVATE, "-l", f"127.0.0.1:{port}", str(PROXYD), str(fake.socket)],  # type: ignore[list-item]
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "the relay did not listen"
            time.sleep(0.05)
        tcp = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                            http_client=httpx.Client(trust_env=False))
        answer = tcp.chat.completions.create(model="m", messages=user("over tcp"))
        assert answer.choices[0].message.content == "You said: over tcp"
    finally:
        relay.terminate()
        relay.wait(10)
    # The example units of the README verify cleanly.
    for name in ("edge-llama-http-proxy.socket", "edge-llama-http-proxy.service", "edge-llama.socket"):
        shutil.copy(REPO / "systemd" / name, workdir)
    out = subprocess.run(["systemd-analyze", "verify", "edge-llama-http-proxy.socket", "edge-llama-http-proxy.service"],
                         cwd=workdir, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


# --- access -------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(CURL is None, reason="curl not installed (Debian package curl)")
def test_forbidden_peer_gets_403(daemons: Daemons, nobody: OtherUser) -> None:
    d = daemons.start({**fake_config(), "server": {"socket_mode": 0o666}})
    out = nobody.run(CURL, "-s", "-w", "\n%{http_code}", "--unix-socket", str(d.socket),  # type: ignore[arg-type]
                     "http://localhost/v1/chat/completions", "-d", json.dumps({"messages": user("hi")}))
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "403", out.stderr
    assert json.loads(body)["error"] == {
        "message": "uid 65534 is not allowed to use this daemon (ask for the client group)",
        "type": "permission_error", "param": None, "code": "forbidden"}
    assert "refused uid 65534" in daemons.log(d)
    with Client(d.socket) as c:
        assert c.call({"op": "stats"})["errors"] == {"forbidden": 1}
