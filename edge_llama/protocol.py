"""Wire protocol v1: newline-delimited JSON over a Unix stream socket, as typed messages.

Requests are parsed into frozen dataclasses (or a typed `EdgeLlamaError` naming the problem); replies are built
by the `*_event` functions and framed by `encode`. Nothing else in the package writes protocol JSON by hand.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edge_llama.errors import BadJson, BadRequest, EdgeLlamaError, TooLarge

VERSION = 1
ROLES = ("system", "user", "assistant", "tool")
MAX_ID_CHARS = 128
MAX_SESSION_CHARS = 64
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's way to write half of a UTF-16 surrogate pair
SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: `arguments` is the parsed JSON object (OpenAI's wire form is its JSON text)."""

    id: str
    name: str
    arguments: Mapping[str, Any]

    def wire(self) -> dict[str, Any]:
        """Protocol v1's shape (a `done` event's `tool_calls`, a stored session's messages)."""
        return {"id": self.id, "name": self.name, "arguments": dict(self.arguments)}

    def as_dict(self) -> dict[str, Any]:
        """The shape chat templates read (Hugging Face's convention, which Meta's Llama 3.2 template follows)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: the calls it made (content may then be "")
    tool_call_id: str | None = None  # tool: the call this message answers

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates see it. `tool_calls` is present only when there are some: Meta's template
        tests `'tool_calls' in message`."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.as_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call: its JSON-schema `parameters` were checked when the request was read."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's tool shape, which chat templates render (Meta's dumps each with tojson)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ResponseFormat:
    """Structured content: any JSON object (`json_object`), or JSON valid against `schema` (`json_schema`)."""

    kind: Literal["json_object", "json_schema"]
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool = False


# "auto": free text or calls (a call constrained from its first character); "none": no call; "required": at least
# one call, constrained from the first token; any other string: a call to that tool, constrained likewise.
ToolChoice = str


@dataclass(frozen=True)
class ChatRequest:
    id: str
    messages: tuple[Message, ...]
    session: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = True
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None
    op: Literal["chat"] = "chat"


@dataclass(frozen=True)
class SummarizeRequest:
    id: str
    text: str
    max_tokens: int | None = None
    style: Literal["paragraph", "bullets"] = "paragraph"
    stream: bool = True
    op: Literal["summarize"] = "summarize"


@dataclass(frozen=True)
class CancelRequest:
    id: str
    target: str
    op: Literal["cancel"] = "cancel"


@dataclass(frozen=True)
class ForgetRequest:
    """Delete a session's stored conversation (after any request running on it)."""

    id: str
    session: str
    op: Literal["forget"] = "forget"


@dataclass(frozen=True)
class InfoRequest:
    """`health` or `stats`: answered at once by one `done` line."""

    id: str
    op: Literal["health", "stats"]


Request = ChatRequest | SummarizeRequest | CancelRequest | ForgetRequest | InfoRequest


# --- parsing ---------------------------------------------------------------------------------------------------
class RequestError(EdgeLlamaError):
    """A parse failure that still knows the request id (when it could be read), so the reply can carry it."""

    def __init__(self, cause: EdgeLlamaError, request_id: str | None) -> None:
        super().__init__(cause.message)
        self.cause = cause
        self.code = cause.code
        self.request_id = request_id


def parse_request(line: bytes, max_messages: int) -> Request:
    """Parse one request line (without its newline). Raises RequestError carrying the wire code and id."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(BadJson(f"request is not valid UTF-8 (byte {exc.start})"), None) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(BadJson(f"request is not valid JSON: {exc.msg} at column {exc.colno}"), None) from None
    # Valid JSON that Python's reader refuses: without these the connection died with a traceback.
    except RecursionError:
        raise RequestError(BadJson("request is nested too deeply (about 1000 levels)"), None) from None
    except ValueError:  # an integer past Python's conversion limit (4300 digits)
        raise RequestError(BadJson("request has a number with too many digits"), None) from None
    # "\ud800" alone is valid JSON but not a character: it can be neither tokenized, stored nor echoed as UTF-8.
    if SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(obj):
        raise RequestError(BadJson("request has a \\u escape of half a surrogate pair, which is not a character"),
                           None)
    if not isinstance(obj, dict):
        raise RequestError(BadRequest("a request must be a JSON object"), None)
    raw_id = obj.get("id")
    request_id = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID_CHARS else None
    try:
        return _parse_object(obj, max_messages)
    except EdgeLlamaError as exc:
        raise RequestError(exc, request_id) from None


def _has_lone_surrogate(obj: Any) -> bool:
    """Any string (key or value) holding half of a surrogate pair; iterative, as the object may nest ~1000 deep."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse_object(obj: dict[str, Any], max_messages: int) -> Request:
    request_id = _get(obj, "id", str, required=True)
    if not 0 < len(request_id) <= MAX_ID_CHARS:
        raise BadRequest(f"'id' must be 1 to {MAX_ID_CHARS} characters")
    op = _get(obj, "op", str, required=True)
    if op == "chat":
        _only(obj, {"id", "op", "messages", "session", "max_tokens", "temperature", "top_p", "seed", "stream",
                    "stop", "tools", "tool_choice", "parallel_tool_calls", "response_format"})
        return ChatRequest(
            id=request_id,
            messages=_messages(obj.get("messages"), max_messages),
            session=_session(obj.get("session")),
            max_tokens=_positive_int(obj, "max_tokens"),
            temperature=_number(obj, "temperature", 0.0, 2.0),
            top_p=_number(obj, "top_p", 0.0, 1.0, low_open=True),
            seed=check_seed(_get(obj, "seed", int), "seed"),
            stream=_get(obj, "stream", bool, default=True),
            stop=check_stops(obj.get("stop"), "stop"),
            tools=_tools(obj.get("tools")),
            tool_choice=_tool_choice(obj.get("tool_choice")),
            parallel_tool_calls=_get(obj, "parallel_tool_calls", bool, default=True),
            response_format=_response_format(obj.get("response_format")),
        )
    if op == "summarize":
        _only(obj, {"id", "op", "text", "max_tokens", "style", "stream"})
        text = _get(obj, "text", str, required=True)
        if not text.strip():
            raise BadRequest("'text' is empty")
        style = _get(obj, "style", str, default="paragraph")
        if style not in ("paragraph", "bullets"):
            raise BadRequest("'style' must be 'paragraph' or 'bullets'")
        return SummarizeRequest(id=request_id, text=text, max_tokens=_positive_int(obj, "max_tokens"),
                                style=style, stream=_get(obj, "stream", bool, default=True))
    if op == "cancel":
        _only(obj, {"id", "op", "target"})
        return CancelRequest(id=request_id, target=_get(obj, "target", str, required=True))
    if op == "forget":
        _only(obj, {"id", "op", "session"})
        session = _session(obj.get("session"))
        if session is None:
            raise BadRequest("'session' is required")
        return ForgetRequest(id=request_id, session=session)
    if op in ("health", "stats"):
        _only(obj, {"id", "op"})
        return InfoRequest(id=request_id, op=op)
    raise BadRequest(f"unknown op {op!r}: expected chat, summarize, cancel, forget, health or stats")


_TYPE_NAMES = {str: "a string", int: "a whole number", bool: "true or false", list: "a list", float: "a number"}


def _get(obj: dict[str, Any], key: str, kind: type, required: bool = False, default: Any = None) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return default
    value = obj[key]
    # bool is an int in Python: never accept true for a number or 1 for a flag.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise BadRequest(f"'{key}' must be {_TYPE_NAMES[kind]}, got {type(value).__name__}")
    return value


def _only(obj: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise BadRequest(f"unknown field '{extra[0]}' for op '{obj['op']}'")


def _positive_int(obj: dict[str, Any], key: str) -> int | None:
    value = _get(obj, key, int)
    if value is not None and value < 1:
        raise BadRequest(f"'{key}' must be at least 1")
    return value


def _number(obj: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{key}' must be a number")
    if value > high or value < low or (low_open and value == low):
        raise BadRequest(f"'{key}' must be in {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _session(value: Any) -> str | None:
    if value is None:
        return None
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_SESSION_CHARS
            or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in value) or value.startswith(".")):
        raise BadRequest(f"'session' must be 1 to {MAX_SESSION_CHARS} characters of A-Z a-z 0-9 - _ . "
                         "(not starting with '.')")
    return value


def _messages(value: Any, max_messages: int) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list")
    if len(value) > max_messages:
        raise TooLarge(f"{len(value)} messages in one request; the limit is {max_messages}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or set(m) - {"role", "content", "tool_calls", "tool_call_id"}:
            raise BadRequest(f"messages[{i}] must be an object with 'role' and 'content' (and 'tool_calls' for an "
                             "assistant, 'tool_call_id' for a tool result)")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        calls: tuple[ToolCall, ...] = ()
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise BadRequest(f"messages[{i}].tool_calls: only an assistant message has tool calls")
            raw = m["tool_calls"]
            if not isinstance(raw, list) or not all(isinstance(c, dict) and set(c) <= {"id", "name", "arguments"}
                                                    and isinstance(c.get("id"), str) and c["id"]
                                                    and isinstance(c.get("name"), str)
                                                    and isinstance(c.get("arguments"), dict) for c in raw):
                raise BadRequest(f"messages[{i}].tool_calls must be a list of {{'id': str, 'name': str, "
                                 "'arguments': object}")
            calls = tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in raw)
        call_id = m.get("tool_call_id")
        if (role == "tool") != (call_id is not None) or (call_id is not None and not isinstance(call_id, str)):
            raise BadRequest(f"messages[{i}].tool_call_id: a tool message needs the id (a string) of the call it "
                             "answers, and only a tool message has one")
        out.append(Message(role, content, calls, call_id))
    check_last_message(out)
    return tuple(out)


def check_last_message(messages: list[Message]) -> None:
    """A request ends with what the model answers next: a user message, or the results of its tool calls."""
    if messages[-1].role not in ("user", "tool"):
        raise BadRequest("the last message must be the user's (or a tool result)")


def check_seed(seed: int | None, field: str) -> int | None:
    """Engines take a 64-bit unsigned seed (llama.cpp's uint32 is derived from it)."""
    if seed is not None and not 0 <= seed < 1 << 64:
        raise BadRequest(f"'{field}' must be between 0 and 2**64 - 1")
    return seed


MAX_STOP = 4  # stop strings per request, as OpenAI


def check_stops(stop: Any, field: str) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"'{field}' must be a non-empty string or a list of at most {MAX_STOP} of them")
    return tuple(stops)


def _tools(value: Any) -> tuple[ToolSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise BadRequest("'tools' must be a list of {'name', 'description', 'parameters'}")
    out = []
    for i, t in enumerate(value):
        if not isinstance(t, dict) or set(t) - {"name", "description", "parameters"}:
            raise BadRequest(f"tools[{i}] must be an object with 'name', 'description' and 'parameters'")
        name, description, parameters = t.get("name"), t.get("description", ""), t.get("parameters", {})
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise BadRequest(f"tools[{i}].name must be 1 to 64 characters of A-Z a-z 0-9 _ -")
        if not isinstance(description, str):
            raise BadRequest(f"tools[{i}].description must be a string")
        if not isinstance(parameters, dict):
            raise BadRequest(f"tools[{i}].parameters must be a JSON schema object")
        out.append(ToolSpec(name, description, parameters))
    return tuple(out)


def _tool_choice(value: Any) -> ToolChoice:
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and set(value) == {"name"} and isinstance(value["name"], str):
        return value["name"]
    raise BadRequest("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"name\": <a tool's name>}")


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text" and set(value) == {"type"}:
        return None
    if kind == "json_object" and set(value) == {"type"}:
        return ResponseFormat("json_object")
    if kind == "json_schema" and set(value) <= {"type", "schema", "name", "strict"}:
        schema, name, strict = value.get("schema"), value.get("name"), value.get("strict", False)
        if not isinstance(schema, dict):
            raise BadRequest("response_format.schema must be a JSON schema object")
        if name is not None and not isinstance(name, str) or not isinstance(strict, bool):
            raise BadRequest("response_format.name must be a string and response_format.strict true or false")
        return ResponseFormat("json_schema", schema, name, strict)
    raise BadRequest("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                     "{\"type\": \"json_schema\", \"schema\": {...}, \"name\"?: str, \"strict\"?: bool}")


# --- replies ---------------------------------------------------------------------------------------------------
def encode(event: dict[str, Any]) -> bytes:
    """One reply line. ensure_ascii=False keeps non-ASCII text compact; the line is valid UTF-8."""
    return (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def token_event(request_id: str, text: str) -> dict[str, Any]:
    return {"id": request_id, "event": "token", "text": text}


def progress_event(request_id: str, done: int, total: int) -> dict[str, Any]:
    return {"id": request_id, "event": "progress", "done": done, "total": total}


def done_event(request_id: str, **fields: Any) -> dict[str, Any]:
    """`done`: finish_reason, usage, timings, and optionally text / truncated / safety / info fields."""
    return {"id": request_id, "event": "done", **{k: v for k, v in fields.items() if v is not None}}


def error_event(request_id: str | None, error: EdgeLlamaError) -> dict[str, Any]:
    event: dict[str, Any] = {"id": request_id, "event": "error", "code": error.code, "message": error.message}
    if error.retry_after_ms is not None:
        event["retry_after_ms"] = error.retry_after_ms
    if error.field is not None:
        event["field"] = error.field
    return event


def too_large_line(max_line_bytes: int) -> TooLarge:
    return TooLarge(f"request line longer than {max_line_bytes} bytes (the daemon's server.max_line_bytes); "
                    "it was discarded")
