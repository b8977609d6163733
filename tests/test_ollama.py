"""Ollama's API on the daemon's socket, with the official `ollama` client (sync and async, through an httpx
transport bound to the socket), making the calls Home Assistant's Ollama integration makes
(home-assistant/core homeassistant/components/ollama/: config_flow.py lists the models and pulls the chosen one
when it is not listed; entity.py chats with tools, stream=True, keep_alive, options={"num_ctx": 8192} and an
optional format schema, and sends tool results back as role "tool" messages without ids).

The embedded model answers the client; the scripted engine makes tool calls, blocks and errors deterministic.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import ollama
import pytest
from conftest import Daemons, fake_config, guarded
from prometheus_client.parser import text_string_to_metric_families

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess
from edge_llama.service.ollama_api import messages_of
from edge_llama.service.openai_api import Failure

# Home Assistant's Assist tools as its Ollama integration sends them (entity.py _format_tool: name, parameters as
# OpenAPI, description), trimmed to the three a light needs.
NAME_AREA = {"type": "object", "properties": {"name": {"type": "string"}, "area": {"type": "string"},
                                              "domain": {"type": "array", "items": {"type": "string"}}}}
TOOLS = [{"type": "function", "function": {"name": "HassTurnOn", "parameters": NAME_AREA,
                                           "description": "Turns on/opens/presses a device or entity."}},
         {"type": "function", "function": {"name": "HassTurnOff", "parameters": NAME_AREA,
                                           "description": "Turns off/closes a device or entity."}},
         {"type": "function", "function": {"name": "GetLiveContext", "parameters": {"type": "object",
                                                                                    "properties": {}},
                                           "description": "Provides real-time information about the home."}}]
CALL = {"name": "HassTurnOn", "arguments": {"name": "kitchen light"}}
CALL_TEXT = f"<tool_call>\n{json.dumps(CALL)}\n</tool_call>"  # the fake engine's template asks for tagged calls
SYSTEM = "You are a voice assistant for Home Assistant. Answer in plain text. Keep it simple and to the point."


def client(sock: Path, **kwargs: Any) -> ollama.Client:
    return ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=str(sock)), **kwargs)


def aclient(sock: Path) -> ollama.AsyncClient:
    return ollama.AsyncClient(host="http://localhost", transport=httpx.AsyncHTTPTransport(uds=str(sock)))


def http(sock: Path) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=30)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.text.splitlines()]


def module_daemon(config: dict[str, Any]) -> Iterator[DaemonProcess]:
    workdir = Path(tempfile.mkdtemp(prefix="elo", dir="/tmp"))
    daemons = Daemons(workdir)
    try:
        yield daemons.start(config)
    finally:
        daemons.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def real() -> Iterator[DaemonProcess]:
    """The embedded model (SmolLM2-135M on llama.cpp) with a 2048-token KV budget."""
    yield from module_daemon({"engine": {"kv_tokens": 2048}})


@pytest.fixture(scope="module")
def fake() -> Iterator[DaemonProcess]:
    """The scripted engine echoing the last user turn (byte tokens: a budget for a prompt with tools)."""
    config = fake_config(token_delay_ms=1)
    config["engine"]["kv_tokens"] = 4096
    yield from module_daemon(config)


def served_name(d: DaemonProcess) -> str:
    with http(d.socket) as c:
        (model,) = c.get("/api/tags").json()["models"]
    return model["name"]


# --- Home Assistant's calls, on the embedded model ----------------------------------------------------------------
def test_home_assistant_setup_finds_the_served_model_and_pull_succeeds(real: DaemonProcess) -> None:
    c = client(real.socket)
    listed = c.list()  # config_flow.py: the server check and the "downloaded" models
    (model,) = listed.models
    name = model.model
    assert name == "Smollm2-135M-8k-Lc100K-Mix1-Ep2:latest"  # the engine's name, in Ollama's name:tag form
    assert model.details is not None and model.details.format == "gguf"
    assert c.pull(name).status == "success"  # nothing to download (HA pulls only when a model is not listed)
    statuses = [p.status for p in c.pull(name.removesuffix(":latest"), stream=True)]
    assert statuses[-1] == "success" and "nothing to pull" in statuses[0]
    with pytest.raises(ollama.ResponseError) as other:
        c.pull("llama3.2:latest")
    assert other.value.status_code == 404 and "never downloads" in other.value.error
    shown = c.show(name)
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None and shown.modelinfo["edge_llama.kv_tokens"] == 2048
    assert "num_ctx 2048" in (shown.parameters or "")
    (loaded,) = c.ps().models
    assert loaded.model == name and loaded.context_length == 2048
    with http(real.socket) as h:
        assert h.get("/api/version").json() == {"version": real.wait_ready()["version"]}


def test_chat_and_generate_stream_ndjson_and_report_ollama_metrics(real: DaemonProcess) -> None:
    c, name = client(real.socket), served_name(real)
    question = user("Name three colours of the rainbow.")
    whole = c.chat(model=name, messages=question, stream=False, options={"temperature": 0, "num_predict": 12})
    parts = list(c.chat(model=name, messages=question, stream=True, options={"temperature": 0, "num_predict": 12}))
    with Client(real.socket) as v1:
        last = v1.call({"op": "stats"})["last_timings"]
    final = parts[-1]
    assert whole.message.content and "".join(p.message.content or "" for p in parts) == whole.message.content
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and final.message.content == ""
    assert whole.done_reason == final.done_reason and whole.done_reason in ("stop", "length")
    assert final.eval_count == whole.eval_count and 0 < whole.eval_count <= 12  # greedy: the same tokens
    assert final.prompt_eval_count == whole.prompt_eval_count > 10
    # Nanoseconds, from the daemon's own timings: the first token's time is the prompt's evaluation.
    assert final.prompt_eval_duration == int(last["ttft_ms"] * 1e6)
    assert final.load_duration == int(last["queue_ms"] * 1e6)
    assert final.total_duration > final.prompt_eval_duration + final.eval_duration > 0

    short = c.chat(model=name, messages=user("Tell me a long story."), options={"num_predict": 4})
    assert short.done_reason == "length" and short.eval_count == 4

    generated = c.generate(model=name, prompt="Why is the sky blue?", system="Answer in one sentence.",
                           options={"temperature": 0, "num_predict": 10})
    streamed = list(c.generate(model=name, prompt="Why is the sky blue?", system="Answer in one sentence.",
                               options={"temperature": 0, "num_predict": 10}, stream=True))
    assert generated.response and "".join(p.response or "" for p in streamed) == generated.response
    assert generated.context is None  # not supported: /api/chat carries conversations

    with http(real.socket) as h:
        raw = h.post("/api/chat", json={"model": name, "messages": question, "options": {"num_predict": 2}})
        single = h.post("/api/chat", json={"model": name, "messages": question, "stream": False,
                                           "options": {"num_predict": 2}})
    assert raw.headers["content-type"] == "application/x-ndjson" and len(lines(raw)) >= 2
    assert single.headers["content-type"] == "application/json" and single.json()["done"] is True
    assert set(single.json()) >= {"model", "created_at", "message", "done", "done_reason", "total_duration",
                                  "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                                  "eval_duration"}


def test_num_ctx_above_the_kv_budget_is_capped_and_said(real: DaemonProcess) -> None:
    c, name = client(real.socket), served_name(real)
    answers = [c.chat(model=name, messages=user("Hi!"), options={"num_ctx": 8192, "num_predict": 3},
                      keep_alive=-1) for _ in range(2)]
    with http(real.socket) as h:
        final = h.post("/api/chat", json={"model": name, "messages": user("Hi!"), "stream": False,
                                          "options": {"num_ctx": 8192, "num_predict": 3}}).json()
        within = h.post("/api/chat", json={"model": name, "messages": user("Hi!"), "stream": False,
                                           "options": {"num_ctx": 1024, "num_predict": 3}}).json()
    assert all(a.done for a in answers)
    assert final["num_ctx"] == {"requested": 8192, "used": 2048} and "num_ctx" not in within
    log = Path(str(real.log_path)).read_text()
    assert log.count("asked for num_ctx 8192; the KV budget is 2048 tokens") == 1  # once, not every turn


def test_home_assistant_conversation_turn_with_tools_streams(real: DaemonProcess) -> None:
    """entity.py's chat call on the real model: whatever it answers (text or a call), the stream is Ollama's and a
    call's arguments are an object; a tool result without an id is accepted and answered."""
    name = served_name(real)

    async def turn(messages: list[dict[str, Any]]) -> list[ollama.ChatResponse]:
        stream = await aclient(real.socket).chat(model=name, messages=messages, tools=TOOLS, stream=True,
                                                 keep_alive=-1, options={"num_ctx": 8192, "num_predict": 32},
                                                 think=None, format=None)
        return [part async for part in stream]

    messages = [{"role": "system", "content": SYSTEM}, *user("Turn on the kitchen light.")]
    parts = asyncio.run(turn(messages))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    calls = [call for part in parts for call in part.message.tool_calls or []]
    for call in calls:
        assert call.function.name in {"HassTurnOn", "HassTurnOff", "GetLiveContext"}
        assert isinstance(call.function.arguments, dict)
    history = messages + [{"role": "assistant", "content": "",
                           "tool_calls": [{"function": {"name": "HassTurnOn",
                                                        "arguments": {"name": "kitchen light"}}}]},
                          {"role": "tool", "content": json.dumps({"data": {"success": [{"name": "Kitchen Light"}]},
                                                                  "error": None})}]
    after = asyncio.run(turn(history))
    assert after[-1].done


def test_format_schema_and_json_mode_are_constrained(real: DaemonProcess) -> None:
    c, name = client(real.socket), served_name(real)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}, "available": {"type": "boolean"}},
              "required": ["age", "available"]}
    answer = c.chat(model=name, messages=user("Ollama is 22 years old and busy saving the world. Return a JSON "
                                              "object with the age and availability."),
                    format=schema, options={"temperature": 0, "num_predict": 64})
    jsonschema.validate(json.loads(answer.message.content or ""), schema)
    assert answer.done_reason == "stop"
    generated = c.generate(model=name, prompt="What colour is the sky? Respond using JSON.", format="json",
                           options={"temperature": 0, "num_predict": 64})
    assert isinstance(json.loads(generated.response or ""), dict)


# --- tool calls and results, deterministic ----------------------------------------------------------------------
def test_tool_calls_come_in_ollama_shape_and_results_find_their_call(daemons: Daemons, fake: DaemonProcess) -> None:
    config = {**fake_config(reply=CALL_TEXT), "generation": {"max_tokens": 200, "max_tokens_ceiling": 256}}
    config["engine"]["kv_tokens"] = 4096  # byte tokens: the call is 87 of them
    caller = daemons.start(config)
    c = client(caller.socket)
    messages = [{"role": "system", "content": SYSTEM}, *user("Turn on the kitchen light.")]
    parts = list(c.chat(model="fake", messages=messages, tools=TOOLS, stream=True, options={"num_ctx": 8192}))
    *calls_part, final = parts
    called = [call for part in calls_part for call in part.message.tool_calls or []]
    assert len(called) == 1 and called[0].function.name == "HassTurnOn"
    assert called[0].function.arguments == {"name": "kitchen light"}  # an object, not JSON text
    assert final.done and final.done_reason == "stop" and not final.message.tool_calls
    assert "<tool_call>" not in "".join(p.message.content or "" for p in parts)  # a call is never content
    whole = c.chat(model="fake", messages=messages, tools=TOOLS)
    assert [t.function.name for t in whole.message.tool_calls or []] == ["HassTurnOn"]
    with http(caller.socket) as h:
        raw = h.post("/api/chat", json={"model": "fake", "messages": messages, "tools": TOOLS, "stream": False})
    (call,) = raw.json()["message"]["tool_calls"]
    assert call["function"] == {"index": 0, **CALL} and call["id"]

    # The result comes back as Home Assistant sends it: role tool, JSON content, no id, no tool_name. The echoing
    # engine answers the last user turn of its prompt: the result, rendered as the answer to that call.
    result = json.dumps({"data": {"response_type": "action_done", "speech": {"plain": {"speech": "Turned on"}}},
                         "error": None})
    history = messages + [{"role": "assistant", "content": "", "tool_calls": [{"function": CALL}]},
                          {"role": "tool", "content": result}]
    answer = client(fake.socket).chat(model="fake", messages=history, tools=TOOLS, options={"num_predict": 256})
    assert answer.message.content == f"You said: <tool_response>\n{result}\n</tool_response>"


def test_tool_results_are_matched_by_id_then_tool_name_then_order() -> None:
    def call(name: str, call_id: str | None = None) -> dict[str, Any]:
        return {**({"id": call_id} if call_id else {}), "function": {"name": name, "arguments": {}}}

    conversation = [*user("lights"), {"role": "assistant", "content": "", "tool_calls": [call("A"), call("B"),
                                                                                         call("C", "c-1")]}]
    by_name = messages_of({"messages": conversation + [{"role": "tool", "content": "b", "tool_name": "B"},
                                                       {"role": "tool", "content": "rest"},
                                                       {"role": "tool", "content": "c", "tool_call_id": "c-1"}]}, 64)
    assert [(m.content, m.tool_call_id) for m in by_name[2:]] == [("b", "call_1_1"), ("rest", "call_1_0"),
                                                                  ("c", "c-1")]
    assert [c.id for c in by_name[1].tool_calls] == ["call_1_0", "call_1_1", "c-1"]  # by place: stable per turn
    for extra, why in (([{"role": "tool", "content": "x", "tool_name": "Z"}], "no unanswered call of 'Z'"),
                       ([{"role": "tool", "content": "x"}] * 4, "already answered"),
                       ([{"role": "tool", "content": "x", "tool_call_id": "nope"}], "no unanswered call has")):
        with pytest.raises(Failure) as refused:
            messages_of({"messages": conversation + extra}, 64)
        assert refused.value.status == 400 and why in refused.value.error.message


# --- errors: Ollama's shape and statuses --------------------------------------------------------------------------
CHAT_OK = {"model": "fake", "messages": user("hi"), "stream": False}


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/api/chat", b"not json", 400, "not JSON"),
    ("/api/chat", {"messages": user("hi")}, 400, "model is required"),
    ("/api/chat", {**CHAT_OK, "model": "llama3.2"}, 404, "model 'llama3.2' not found"),
    ("/api/generate", {"model": "fake:7b", "prompt": "hi"}, 404, "model 'fake:7b' not found"),
    ("/api/show", {"model": "nomic-embed-text"}, 404, "not found"),
    ("/api/chat", {**CHAT_OK, "options": {"temperature": "hot"}}, 400, 'option "temperature" must be of type float32'),
    ("/api/chat", {**CHAT_OK, "options": {"num_ctx": "big"}}, 400, 'option "num_ctx" must be of type integer'),
    ("/api/chat", {**CHAT_OK, "options": {"stop": [1]}}, 400, "array of strings"),
    ("/api/chat", {**CHAT_OK, "options": {"temperature": 5}}, 400, "[0, 2]"),
    ("/api/chat", {**CHAT_OK, "options": {"num_predict": 100000}}, 400, "ceiling of 256"),
    ("/api/chat", {**CHAT_OK, "options": "hot"}, 400, "'options' must be an object"),
    ("/api/chat", {**CHAT_OK, "stream": "yes"}, 400, "'stream' must be true or false"),
    ("/api/chat", {**CHAT_OK, "think": True}, 400, '"fake" does not support thinking'),
    ("/api/chat", {**CHAT_OK, "format": "xml"}, 400, "invalid format"),
    ("/api/chat", {**CHAT_OK, "logprobs": True}, 400, "logprobs are not supported"),
    ("/api/chat", {**CHAT_OK, "keep_alive": "soon"}, 400, "'keep_alive' must be"),
    ("/api/chat", {**CHAT_OK, "messages": [{"role": "user", "content": "look", "images": ["iVBOR"]}]}, 400,
     "images are not supported"),
    ("/api/chat", {**CHAT_OK, "messages": [{"role": "function", "content": "x"}]}, 400, "role must be"),
    ("/api/chat", {**CHAT_OK, "messages": [*user("hi"), {"role": "assistant", "content": "Hel"}]}, 400,
     "the last message must be the user's"),
    ("/api/chat", {**CHAT_OK, "messages": [*user("hi"), {"role": "tool", "content": "42"}]}, 400,
     "answers no call"),
    ("/api/generate", {"model": "fake", "prompt": "[INST] hi [/INST]", "raw": True}, 400, "raw prompts"),
    ("/api/generate", {"model": "fake", "prompt": "def f():", "suffix": "return x"}, 400, "suffix"),
    ("/api/pull", {"model": "llama3.2"}, 404, "cannot be pulled"),
])
def test_bad_requests_get_ollama_errors(fake: DaemonProcess, path: str, body: Any, status: int,
                                        message: str) -> None:
    with http(fake.socket) as c:
        response = c.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    assert set(response.json()) == {"error"} and message in response.json()["error"]


def test_what_ollama_ignores_is_ignored(fake: DaemonProcess) -> None:
    c = client(fake.socket)
    # Options Ollama knows but the engines do not use, options Ollama does not know, keep_alive (the model stays
    # loaded), and an int option given as a float (Go truncates it).
    answer = c.chat(model="FAKE:latest", messages=user("hi"), keep_alive="5m",
                    options={"top_k": 20, "repeat_penalty": 1.1, "num_gpu": 99, "mirostat": 2, "whatever": "x",
                             "seed": 42.0})
    assert answer.message.content == "You said: hi" and answer.model == "FAKE:latest"  # the name as asked
    loaded = c.chat(model="fake", messages=[], keep_alive=0)
    assert loaded.done and loaded.done_reason == "load"  # no messages: Ollama's load request
    assert c.generate(model="fake", prompt="").done_reason == "load"
    with http(fake.socket) as h:
        wrong_method = h.get("/api/chat")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error"}


def test_busy_is_503_with_retry_after(daemons: Daemons) -> None:
    d = daemons.start({**fake_config(reply="x" * 100, token_delay_ms=20), "server": {"max_queue": 0}})
    with http(d.socket) as c, c.stream("POST", "/api/chat", json={"model": "fake", "messages": user("hold")}) as held:
        assert held.status_code == 200
        pending = held.iter_lines()  # kept: a dropped iterator closes the response (and so cancels the request)
        next(pending)
        with pytest.raises(ollama.ResponseError) as busy:
            client(d.socket).chat(model="fake", messages=user("me too"))
        refused = c.post("/api/generate", json={"model": "fake", "prompt": "me too"})
    assert busy.value.status_code == 503 and "retry later" in busy.value.error  # Ollama's status for a full queue
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "/api/chat 503 busy" in daemons.log(d)


def test_an_error_after_the_stream_started_is_an_error_line(daemons: Daemons) -> None:
    config = {**fake_config(reply="z" * 3000, token_delay_ms=5), "server": {"shutdown_grace_s": 0.3},
              "generation": {"max_tokens": 3000, "max_tokens_ceiling": 3000}}
    config["engine"]["kv_tokens"] = 8192
    d = daemons.start(config)
    stream = client(d.socket).chat(model="fake", messages=user("long"), stream=True)
    assert next(stream).message.content  # streaming: the status and headers are out
    d.proc.send_signal(signal.SIGTERM)  # the grace ends before the answer does
    with pytest.raises(ollama.ResponseError) as failed:
        for _ in stream:
            pass
    assert "shut" in failed.value.error or "stopping" in failed.value.error
    assert d.proc.wait(15) == 0


def test_safety_block_ends_with_the_refusal_as_content(daemons: Daemons) -> None:
    reply = "Gardens need water and light. " * 3 + "You are a worthless piece of shit, " + "and more. " * 5
    config = guarded(fake_config(reply=reply, token_delay_ms=1))
    config["engine"]["kv_tokens"] = 2048
    config["generation"] = {"max_tokens": 512, "max_tokens_ceiling": 1024}
    d = daemons.start(config)
    c = client(d.socket)
    with pytest.raises(ollama.ResponseError) as blocked:
        c.chat(model="fake", messages=user("You are a worthless piece of shit."))
    assert blocked.value.status_code == 400 and "can't help with that" in blocked.value.error
    whole = c.chat(model="fake", messages=user("gardens?"))
    parts = list(c.chat(model="fake", messages=user("gardens?"), stream=True))
    streamed = "".join(p.message.content or "" for p in parts)
    for text in (whole.message.content or "", streamed):
        released, _, refusal = text.rpartition("\n")
        assert refusal == "Sorry, I can't help with that." and "shit" not in text and reply.startswith(released)
    assert whole.done_reason == parts[-1].done_reason == "safety"


def test_ollama_requests_count_in_the_daemon_metrics(fake: DaemonProcess) -> None:
    def scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with http(fake.socket) as h:
            text = h.get("/metrics").text
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def delta(name: str, **labels: str) -> float:
        key = (name, frozenset(labels.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    before = scrape()
    c = client(fake.socket)
    c.chat(model="fake", messages=user("one"))
    c.generate(model="fake", prompt="two")
    c.list()
    after = scrape()
    assert delta("edge_llama_requests_total", op="chat") == 2
    assert delta("edge_llama_request_outcomes_total", op="chat", outcome="stop") == 2
    assert delta("edge_llama_requests_total", op="models") == 1
    assert delta("edge_llama_tokens_total", kind="completion") == len("You said: one") + len("You said: two")
