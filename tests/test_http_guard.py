"""Who may call the HTTP API (service/http.py `admit`): the Host a request names (DNS rebinding), the Origin a
browser adds (a web page calling the API), the Content-Type of a POST (a form post is a CSRF "simple request" that
needs no preflight), and the bearer token of server.http_token_file. Checked with the official `openai` and
`ollama` clients, on the Unix socket and on TCP through the relay example (systemd-socket-proxyd)."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from conftest import Daemons, fake_config

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess

TOKEN = "s3cret-token-0123456789abcdef"
PROXYD = "/usr/lib/systemd/systemd-socket-proxyd"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def http(base: str | Path, **kwargs: Any) -> httpx.Client:
    if isinstance(base, Path):  # the Unix socket
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(base)), base_url="http://localhost", timeout=30,
                            **kwargs)
    return httpx.Client(base_url=base, timeout=30, trust_env=False, **kwargs)


def oai(base: str | Path, api_key: str, **kwargs: Any) -> openai.OpenAI:
    if isinstance(base, Path):
        return openai.OpenAI(base_url="http://localhost/v1", api_key=api_key, max_retries=0,
                             http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(base))), **kwargs)
    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0,
                         http_client=httpx.Client(trust_env=False), **kwargs)


def olla(base: str | Path, headers: dict[str, str] | None = None) -> ollama.Client:
    if isinstance(base, Path):
        return ollama.Client(host="http://localhost", headers=headers, transport=httpx.HTTPTransport(uds=str(base)))
    return ollama.Client(host=base, headers=headers, trust_env=False)


def with_token(workdir: Path, **server: Any) -> dict[str, Any]:
    token_file = workdir / "http-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    return {**fake_config(), "server": {"http_token_file": str(token_file), **server}}


@pytest.fixture
def relay(workdir: Path) -> Iterator[Any]:
    """Starts the TCP relay example (systemd-socket-activate + systemd-socket-proxyd, as the units do) on a free
    loopback port in front of a daemon's socket; returns its base URL."""
    started: list[subprocess.Popen[bytes]] = []

    def start(daemon: DaemonProcess) -> str:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        started.append(subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{port}", PROXYD,
                                         str(daemon.socket)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return f"http://127.0.0.1:{port}"
            assert time.monotonic() < deadline, "the relay did not listen"
            time.sleep(0.05)

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


# --- the bearer token --------------------------------------------------------------------------------------------
def test_token_lets_the_official_clients_in_and_keeps_others_out(daemons: Daemons, workdir: Path) -> None:
    d = daemons.start(with_token(workdir))
    answer = oai(d.socket, TOKEN).chat.completions.create(model="m", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "You said: hi"
    assert olla(d.socket, {"Authorization": f"Bearer {TOKEN}"}).chat(model="fake", messages=CHAT["messages"]) \
        .message.content == "You said: hi"
    for key in ("unused", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        with pytest.raises(openai.AuthenticationError) as refused:
            oai(d.socket, key).models.list()
        assert refused.value.response.headers["www-authenticate"] == 'Bearer realm="edge-llama"'
        assert refused.value.code == "forbidden" and "bearer token" in refused.value.message
    with pytest.raises(ollama.ResponseError) as missing:
        olla(d.socket).list()
    assert missing.value.status_code == 401 and "bearer token" in missing.value.error  # Ollama's error shape
    with http(d.socket) as c:
        assert c.get("/health").status_code == 401  # every HTTP path
        assert c.get("/health", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200  # scheme: any case
        assert c.get("/health", headers={"authorization": f"Basic {TOKEN}"}).status_code == 401
    with Client(d.socket) as v1:  # protocol v1 on the socket keeps its own check (the peer's uid)
        assert v1.call({"op": "health"})["state"] == "ready"
    assert "401 forbidden" in daemons.log(d)
    assert TOKEN not in daemons.log(d)  # neither the right token nor a wrong one is logged


def test_token_file_problems_stop_the_daemon_with_one_clear_line(daemons: Daemons, workdir: Path) -> None:
    short = workdir / "short-token"
    short.write_text("abc\n")
    for path, why in ((workdir / "absent", "cannot read"), (short, "shorter than 16 characters")):
        d = daemons.start({**fake_config(), "server": {"http_token_file": str(path)}}, wait=False)
        assert d.proc.wait(30) != 0
        assert "server.http_token_file: " in daemons.log(d) and why in daemons.log(d)
        assert "Traceback" not in daemons.log(d)


# --- Host, Origin, Content-Type ----------------------------------------------------------------------------------
def test_foreign_host_cross_site_origin_and_form_posts_are_refused(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(), "server": {"http_hosts": ["jetson.local"],
                                                   "http_origins": ["http://jetson.local:8123"]}})
    with http(d.socket) as c:
        # DNS rebinding: a page on evil.example whose name now resolves to this host still names its own Host.
        rebound = c.post("/v1/chat/completions", json=CHAT, headers={"host": "evil.example"})
        assert rebound.status_code == 421 and rebound.json()["error"]["param"] == "host"
        ollama_shaped = c.post("/api/chat", json={"model": "fake", **CHAT}, headers={"host": "evil.example:11434"})
        assert ollama_shaped.status_code == 421 and set(ollama_shaped.json()) == {"error"}
        for host in ("localhost", "localhost:8080", "127.0.0.1:80", "[::1]:8080", "JETSON.local:8080"):
            assert c.get("/health", headers={"host": host}).status_code == 200, host
        # A web page the operator opens: the browser names its origin.
        cross = c.post("/v1/chat/completions", json=CHAT, headers={"origin": "http://evil.example"})
        assert cross.status_code == 403 and "web origin" in cross.json()["error"]["message"]
        assert c.get("/v1/models", headers={"origin": "null"}).status_code == 403  # a sandboxed frame or file://
        allowed = c.post("/v1/chat/completions", json=CHAT, headers={"origin": "http://jetson.local:8123/"})
        assert allowed.status_code == 200
        # A form post needs no CORS preflight: only JSON bodies are read.
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            headers = {"content-type": kind} if kind else {}
            refused = c.post("/v1/chat/completions", content=json.dumps(CHAT), headers=headers)
            assert refused.status_code == 415 and refused.json()["error"]["param"] == "content-type", kind
        form = c.post("/api/generate", content=json.dumps({"model": "fake", "prompt": "hi"}),
                      headers={"content-type": "text/plain"})
        assert form.status_code == 415 and "Content-Type: application/json" in form.json()["error"]
        charset = c.post("/v1/chat/completions", content=json.dumps(CHAT),
                         headers={"content-type": "Application/JSON; charset=utf-8"})
        assert charset.status_code == 200
    # HTTP/1.0 without a Host header (curl -0, old scripts on the socket) is a local client.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(d.socket))
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert s.makefile("rb").readline().startswith(b"HTTP/1.1 200")
    log = daemons.log(d)
    assert "421 forbidden" in log and "403 forbidden" in log and "415 bad_request" in log


# --- on TCP, through the relay example ---------------------------------------------------------------------------
def test_tcp_relay_with_token_and_host(daemons: Daemons, workdir: Path, relay: Any) -> None:
    """Home Assistant on another host reaches the Jetson by a name (here jetson.local, sent as the Host header; the
    connection is to loopback): server.http_hosts lets that name in, the token decides who may call."""
    d = daemons.start(with_token(workdir, http_hosts=["jetson.local"]))
    base = relay(d)
    named = {"Host": "jetson.local:8080"}
    answer = oai(base, TOKEN, default_headers=named).chat.completions.create(model="m", messages=CHAT["messages"])
    assert answer.choices[0].message.content == "You said: hi"
    client = olla(base, {"Authorization": f"Bearer {TOKEN}", **named})
    assert [m.model for m in client.list().models] == ["fake:latest"]
    parts = list(client.chat(model="fake", messages=CHAT["messages"], stream=True, options={"num_ctx": 8192}))
    assert "".join(p.message.content or "" for p in parts) == "You said: hi" and parts[-1].done
    with pytest.raises(openai.AuthenticationError):
        oai(base, "wrong-token-0123456789", default_headers=named).models.list()
    with pytest.raises(ollama.ResponseError) as missing:
        olla(base, named).list()
    assert missing.value.status_code == 401
    with http(base) as c:  # the right token but a name the daemon was not told about
        misdirected = c.get("/v1/models", headers={"host": "nas.local:8080", "authorization": f"Bearer {TOKEN}"})
    assert misdirected.status_code == 421 and "server.http_hosts" in misdirected.json()["error"]["message"]
