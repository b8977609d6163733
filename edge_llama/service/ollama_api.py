"""Ollama's API (github.com/ollama/ollama docs/api.md, api/types.go) on the daemon's socket: /api/chat and
/api/generate run through the same admission, handlers (safety, KV-budget context policy), stats and metrics as
the OpenAI endpoints; /api/tags, /api/show, /api/ps, /api/version and /api/pull describe the one served model.

Request bodies are read as Ollama's Go server reads them (api/types.go): unknown fields and unknown `options` are
ignored, a known field or option of the wrong type is refused with 400, an `int` option also takes a JSON float
(Go truncates it). Errors are Ollama's `{"error": "..."}` with Ollama's statuses; a full queue is 503, as
Ollama's ErrMaxQueue (server/sched.go, answered by handleScheduleError in server/routes.go). Rendering is
service/ollama_reply.py; docs/http.md is the contract.
"""

from __future__ import annotations

import math
import re
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from edge_llama import __version__
from edge_llama.engine.base import Engine
from edge_llama.errors import BadRequest, EdgeLlamaError, NotFound
from edge_llama.protocol import (
    ChatRequest,
    Message,
    ResponseFormat,
    ToolCall,
    check_last_message,
    check_seed,
    check_stops,
)
from edge_llama.service import openai_api
from edge_llama.service.ollama_reply import NDJSON, OllamaReply, iso_time, ndjson
from edge_llama.service.openai_api import Failure, invalid, tools_of, typed

if TYPE_CHECKING:
    from edge_llama.service.http import HttpConnection

STATUS = {**openai_api.STATUS, "busy": 503}
# api/types.go Options and Runner: each option Ollama knows, by the JSON type its FromMap accepts. Honoured here:
# temperature, top_p, seed, num_predict, stop, num_ctx (capped at the KV budget); the others are checked and
# ignored (the engines sample with temperature and top_p only; batch, threads and GPU layers are the daemon's
# config). Options Ollama does not know are ignored, as its FromMap does ("invalid option provided", a warning).
OPTION_TYPES: dict[str, type] = {
    **dict.fromkeys(("num_keep", "seed", "num_predict", "top_k", "repeat_last_n", "num_ctx", "num_batch", "num_gpu",
                     "main_gpu", "num_thread", "draft_num_predict"), int),
    **dict.fromkeys(("top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty",
                     "frequency_penalty"), float),
    "use_mmap": bool, "stop": list,
}
GO_DURATION = re.compile(r"-?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+)")  # time.ParseDuration's syntax
_capped_logged: set[tuple[int, int]] = set()  # (num_ctx asked for, KV budget) pairs already logged


def error_body(failure: Failure) -> dict[str, Any]:
    return {"error": failure.error.message}


def bad(message: str) -> Failure:
    return Failure(400, BadRequest(message))


# --- the model's name --------------------------------------------------------------------------------------------
def ollama_name(engine: Engine) -> str:
    """The served model as an Ollama `model:tag` name: the engine's name with every run of characters Ollama names
    cannot hold (spaces...) made a `-`, tagged `latest` ("Smollm2 135M 8k" -> "Smollm2-135M-8k:latest")."""
    return (re.sub(r"[^A-Za-z0-9_.-]+", "-", engine.model_name).strip("-.") or "model") + ":latest"


def model_field(body: dict[str, Any], engine: Engine, key: str = "model") -> str:
    """The model a request names (echoed in the answer, as Ollama does): the served one, as `name:latest`, `name`
    (Ollama's default tag) or the engine's own name, in any case. Another: 404; none: 400, as Ollama."""
    name = typed(body, key, str, "a string") or typed(body, "name", str, "a string")  # `name`: the deprecated key
    if not name:
        raise bad("model is required")
    served = ollama_name(engine)
    if name.lower() not in {served.lower(), served.lower().removesuffix(":latest"), engine.model_name.lower()}:
        raise Failure(404, NotFound(f"model '{name}' not found (this daemon serves {served})"))
    return name


# --- options, format, think ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    num_ctx: int | None = None  # asked for, when above the KV budget (the answer says so)


def option(options: dict[str, Any], key: str) -> Any:
    """One option checked as Ollama's Options.FromMap does: ints take a JSON float (truncated), floats an int."""
    value, kind = options.get(key), OPTION_TYPES[key]
    if value is None:
        return None
    if kind is int and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is list and isinstance(value, list):
        if not all(isinstance(s, str) for s in value):
            raise bad(f'option "{key}" must be of an array of strings')
        return value
    what = {int: "integer", float: "float32", bool: "boolean", list: "array"}[kind]
    raise bad(f'option "{key}" must be of type {what}')


def sampling_of(body: dict[str, Any], ceiling: int, kv_tokens: int) -> Sampling:
    options = typed(body, "options", dict, "an object") or {}
    for key in OPTION_TYPES.keys() & options.keys():
        option(options, key)  # every known option is type-checked, used or not
    temperature, top_p = option(options, "temperature"), option(options, "top_p")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad("option \"temperature\" must be in [0, 2]")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad("option \"top_p\" must be in (0, 1]")
    seed = option(options, "seed")  # Ollama's default -1 (any negative): a random seed
    predict = option(options, "num_predict")  # -1 (Ollama's default: no limit), -2, 0: the daemon's reply budget
    if predict is not None and predict > ceiling:
        raise bad(f"option \"num_predict\" {predict} is above this daemon's ceiling of {ceiling} "
                  "(generation.max_tokens_ceiling)")
    try:
        stop = check_stops(option(options, "stop"), "options.stop")
        seed = check_seed(seed if seed is not None and seed >= 0 else None, "options.seed")
    except BadRequest as exc:
        raise bad(exc.message) from None
    num_ctx = option(options, "num_ctx")
    return Sampling(temperature, top_p, seed, predict if predict and predict > 0 else None, stop,
                    num_ctx if num_ctx is not None and num_ctx > kv_tokens else None)


def format_of(body: dict[str, Any]) -> ResponseFormat | None:
    """`format`: "json" (any JSON object) or a JSON schema (the reply is constrained to it); "" or null: text."""
    value = body.get("format")
    if value in (None, ""):
        return None
    if value == "json":
        return ResponseFormat("json_object")
    if isinstance(value, dict):
        return ResponseFormat("json_schema", value, None, True)
    raise bad(f'invalid format: {value!r}; expected "json" or a valid JSON Schema object')


def common(body: dict[str, Any], served: str) -> bool:
    """What /api/chat and /api/generate share: `stream` (true by default), `think`, `keep_alive`."""
    stream = typed(body, "stream", bool, "true or false")
    think = body.get("think")
    if think not in (None, False):
        if not isinstance(think, (bool, str)):
            raise bad("'think' must be true, false or a level (\"low\", \"medium\", \"high\")")
        raise bad(f'"{served}" does not support thinking')  # Ollama's answer for a model without the capability
    if typed(body, "logprobs", bool, "true or false") or typed(body, "top_logprobs", int, "an integer"):
        raise bad("logprobs are not supported: the engines stream text, not token probabilities")
    # keep_alive is accepted and ignored: the daemon loads its model once and keeps it while it runs.
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (int, float, str))
                                   or isinstance(keep_alive, str) and not GO_DURATION.fullmatch(keep_alive)):
        raise bad(f"'keep_alive' must be a number of seconds or a duration such as \"5m\", got {keep_alive!r}")
    return stream is not False


# --- messages ---------------------------------------------------------------------------------------------------
def calls_of(m: dict[str, Any], i: int) -> tuple[ToolCall, ...]:
    """An assistant message's calls, Ollama's shape: {"id"?, "function": {"index"?, "name", "arguments": {...}}}.
    A call without an id (Ollama's clients send none) gets one from its place in the conversation, so the same
    history gets the same ids on every turn (the prompt stays a prefix of the next one)."""
    raw = m.get("tool_calls")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise bad(f"messages[{i}].tool_calls must be a list")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments", {}), dict)):
            raise bad(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\": str, \"arguments\": "
                      "object}}")
        call_id = call.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) and call_id else f"call_{i}_{j}",
                              function["name"], function.get("arguments") or {}))
    return tuple(calls)


def answered_call(m: dict[str, Any], i: int, pending: list[ToolCall]) -> ToolCall:
    """The call a `tool` message answers. Ollama renders results in order and matches nothing; the daemon ties each
    result to a call (handlers check it), so: the call named by `tool_call_id` (newer clients), else the first
    unanswered call of the tool named by `tool_name`, else the first unanswered call of the last assistant turn."""
    call_id, tool_name = m.get("tool_call_id"), m.get("tool_name")
    for key, value in (("tool_call_id", call_id), ("tool_name", tool_name)):
        if value is not None and not isinstance(value, str):
            raise bad(f"messages[{i}].{key} must be a string")
    if call_id:
        found = next((c for c in pending if c.id == call_id), None)
        why = f"no unanswered call has the id {call_id!r}"
    elif tool_name:
        found = next((c for c in pending if c.name == tool_name), None)
        why = f"no unanswered call of {tool_name!r} precedes it"
    else:
        found = pending[0] if pending else None
        why = "every call of the last assistant message is already answered"
    if found is None:
        raise bad(f"messages[{i}] (role tool) answers no call: {why}")
    pending.remove(found)
    return found


def messages_of(body: dict[str, Any], max_messages: int) -> tuple[Message, ...]:
    raw = typed(body, "messages", list, "a list") or []
    if len(raw) > max_messages:
        raise bad(f"{len(raw)} messages in one request; the limit is {max_messages} (server.max_messages)")
    out: list[Message] = []
    pending: list[ToolCall] = []  # the last assistant message's calls not yet answered
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a 'role'")
        role = m["role"].lower()  # as Ollama's Message.UnmarshalJSON
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string")
        if m.get("images"):
            raise bad(f"messages[{i}].images: images are not supported (the served model reads text only)")
        if role == "assistant":
            calls = calls_of(m, i)
            pending = list(calls)
            out.append(Message(role, content or "", calls))
        elif role == "tool":
            out.append(Message(role, content or "", (), answered_call(m, i, pending).id))
        elif role in ("system", "user"):
            out.append(Message(role, content or ""))
        else:
            raise bad(f"messages[{i}].role must be system, user, assistant or tool, not {m['role']!r}")
    if out:
        try:
            check_last_message(out)
        except BadRequest as exc:
            raise bad(exc.message) from None
    return tuple(out)


# --- requests ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OllamaSpec:
    """A checked /api/chat or /api/generate request: what the handlers get, plus what only the reply needs."""

    kind: Literal["chat", "generate"]
    model: str  # as the client named it (echoed, as Ollama does)
    request: ChatRequest | None  # None: a load request (no messages / an empty prompt): the model is loaded
    stream: bool
    num_ctx: int | None  # asked for above the KV budget
    kv_tokens: int


def spec_of(http: HttpConnection, body: dict[str, Any], kind: Literal["chat", "generate"]) -> OllamaSpec:
    config, engine = http.hub.config, http.hub.handlers.engine
    model = model_field(body, engine)
    stream = common(body, model)
    kv_tokens = engine.capacity.kv_tokens
    sampling = sampling_of(body, config.generation.max_tokens_ceiling, kv_tokens)
    response_format = format_of(body)
    if kind == "chat":
        messages, tools = messages_of(body, config.server.max_messages), tools_of(body)
    else:
        messages, tools = generate_messages(body), ()
    if sampling.num_ctx is not None and (sampling.num_ctx, kv_tokens) not in _capped_logged:
        _capped_logged.add((sampling.num_ctx, kv_tokens))
        http.log.warning("an Ollama client asked for num_ctx %d; the KV budget is %d tokens (engine.kv_tokens): "
                         "longer conversations lose their oldest turns (logged once per value)",
                         sampling.num_ctx, kv_tokens)
    request = ChatRequest(
        id=f"ollama-{secrets.token_hex(12)}", messages=messages, max_tokens=sampling.max_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, stop=sampling.stop, tools=tools,
        response_format=response_format) if messages else None
    return OllamaSpec(kind, model, request, stream, sampling.num_ctx, kv_tokens)


def generate_messages(body: dict[str, Any]) -> tuple[Message, ...]:
    """/api/generate's prompt (and system) as a conversation; the model's chat template applies, as in Ollama
    without `raw`. What would bypass the template or the conversation is refused with the reason."""
    prompt = typed(body, "prompt", str, "a string") or ""
    system = typed(body, "system", str, "a string")
    if typed(body, "raw", bool, "true or false"):
        raise bad("raw prompts are not supported: the daemon always applies the model's chat template (its safety "
                  "checks and KV-budget policy work on messages); send 'prompt' without 'raw'")
    if typed(body, "template", str, "a string"):
        raise bad("'template' is not supported: the daemon applies the model's own chat template")
    if typed(body, "suffix", str, "a string"):
        raise bad("'suffix' (fill-in-the-middle) is not supported by the served model")
    if typed(body, "context", list, "a list"):
        raise bad("'context' is not supported (this daemon returns none): send the conversation to /api/chat")
    if body.get("images"):
        raise bad("images are not supported (the served model reads text only)")
    if not prompt:
        return ()
    return ((Message("system", system),) if system else ()) + (Message("user", prompt),)


# --- endpoints ---------------------------------------------------------------------------------------------------
async def chat(http: HttpConnection, target: str, body: bytes) -> None:
    await converse(http, spec_of(http, http.json_body(body), "chat"))


async def generate(http: HttpConnection, target: str, body: bytes) -> None:
    await converse(http, spec_of(http, http.json_body(body), "generate"))


async def converse(http: HttpConnection, spec: OllamaSpec) -> None:
    reply = OllamaReply(http, spec.kind, spec.request.id if spec.request else "load", spec.stream, spec.model,
                        spec.num_ctx, spec.kv_tokens)
    request = spec.request
    if request is None:
        await reply.loaded()
        return
    handlers = http.hub.handlers
    try:
        await http.run(reply, lambda cancel, received, send: handlers.chat(request, cancel, received, send))
    except EdgeLlamaError as exc:  # Ollama's status for it (a full queue is 503 there)
        raise Failure(STATUS.get(exc.code, 500), exc) from None


def details(engine: Engine) -> dict[str, Any]:
    """Ollama's ModelDetails. The daemon knows its backend, not the model's family or size: those stay empty."""
    return {"parent_model": "", "format": "gguf" if engine.name == "llamacpp" else engine.name, "family": "",
            "families": None, "parameter_size": "", "quantization_level": ""}


def started_at(http: HttpConnection) -> str:
    stats = http.hub.handlers.stats
    return iso_time(time.time() - (time.monotonic() - stats.started))


async def tags(http: HttpConnection, target: str, body: bytes) -> None:
    engine = http.hub.handlers.engine
    name = ollama_name(engine)
    # size and digest: the daemon neither measures nor hashes the weights it serves (0 and "").
    await http.respond(200, {"models": [{"name": name, "model": name, "modified_at": started_at(http), "size": 0,
                                         "digest": "", "details": details(engine)}]})


async def ps(http: HttpConnection, target: str, body: bytes) -> None:
    engine = http.hub.handlers.engine
    name = ollama_name(engine)
    await http.respond(200, {"models": [{
        "name": name, "model": name, "size": 0, "digest": "", "details": details(engine),
        "expires_at": "9999-12-31T23:59:59Z",  # loaded for as long as the daemon runs (keep_alive has no effect)
        "size_vram": 0, "context_length": engine.capacity.kv_tokens}]})


async def show(http: HttpConnection, target: str, body: bytes) -> None:
    handlers = http.hub.handlers
    engine, gen = handlers.engine, http.hub.config.generation
    model_field(http.json_body(body), engine)
    capabilities = ["completion"]
    if type(engine).vocabulary is not Engine.vocabulary:  # the backend can constrain its output: tools, JSON
        capabilities.append("tools")
    kv_tokens = engine.capacity.kv_tokens
    await http.respond(200, {
        "modelfile": f"# {engine.model_name} is served by edge-llama ({engine.name}); it has no Modelfile\n",
        "parameters": f"num_ctx {kv_tokens}\nnum_predict {min(gen.max_tokens, kv_tokens // 4)}\n"  # the defaults
                      f"temperature {gen.temperature:g}\ntop_p {gen.top_p:g}",
        "template": "", "details": details(engine),
        "model_info": {"general.name": engine.model_name, "edge_llama.backend": engine.name,
                       "edge_llama.kv_tokens": engine.capacity.kv_tokens,
                       "edge_llama.max_seq_len": engine.capacity.max_seq_len},
        "capabilities": capabilities, "modified_at": started_at(http)})


async def version(http: HttpConnection, target: str, body: bytes) -> None:
    await http.respond(200, {"version": __version__})  # edge-llama's own version, not an Ollama release


async def pull(http: HttpConnection, target: str, body: bytes) -> None:
    """The served model is already here: success without downloading (streamed as Ollama's status lines unless
    `stream` is false). The daemon never downloads: any other model is 404."""
    request = http.json_body(body)
    engine = http.hub.handlers.engine
    name = typed(request, "model", str, "a string") or typed(request, "name", str, "a string")
    try:
        model_field(request, engine)
    except Failure as failure:
        if failure.status != 404:
            raise
        raise Failure(404, NotFound(f"model '{name}' cannot be pulled: this daemon serves only {ollama_name(engine)} "
                                    "and never downloads models (the model is the daemon's engine.model)")) from None
    if typed(request, "stream", bool, "true or false") is False:
        await http.respond(200, {"status": "success"})
        return
    await http.stream(ndjson({"status": f"{ollama_name(engine)} is the model this daemon serves: nothing to pull"}),
                      content_type=NDJSON)
    await http.stream(ndjson({"status": "success"}), end=True, content_type=NDJSON)


async def not_served(http: HttpConnection, target: str, body: bytes) -> None:
    """The parts of Ollama's API this daemon does not serve (embeddings, create, push, copy, delete, blobs)."""
    raise invalid(f"{target} is not served: this daemon answers /api/chat, /api/generate, /api/tags, /api/show, "
                  "/api/ps, /api/version and /api/pull (see docs/http.md)", "url", 404)
