"""OpenAI's chat completion API as this daemon reads it: request bodies checked into protocol requests, and the
error shape with its statuses. The HTTP transport is service/http.py; docs/http.md is the contract.

Unknown fields are ignored, as OpenAI does; a known field of the wrong type or range is refused with 400 naming
it in `param`; fields we cannot honour (n > 1, logprobs, the legacy functions API) are refused with the reason.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_llama.errors import BadRequest, EdgeLlamaError
from edge_llama.protocol import (
    ROLES,
    TOOL_NAME,
    ChatRequest,
    Message,
    ResponseFormat,
    SummarizeRequest,
    ToolCall,
    ToolSpec,
    check_last_message,
    check_seed,
    check_stops,
)

T = TypeVar("T")
STATUS = {"bad_json": 400, "bad_request": 400, "context_overflow": 400, "safety_blocked": 400, "too_large": 413,
          "not_found": 404,
          "forbidden": 403, "busy": 429, "unavailable": 503, "cancelled": 503, "internal": 500}
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 421: "permission_error",
               429: "rate_limit_error", 500: "server_error", 503: "unavailable_error"}
# (any other status: invalid_request_error; llama.cpp's server uses these)


class Failure(Exception):
    """An error answer: its status, the typed error (whose wire code is the body's `code`), the field at fault."""

    def __init__(self, status: int, error: EdgeLlamaError, param: str | None = None, close: bool = False) -> None:
        super().__init__(error.message)
        self.status, self.error, self.param, self.close = status, error, param, close

    @classmethod
    def of(cls, error: EdgeLlamaError) -> Failure:
        return cls(STATUS.get(error.code, 500), error, error.field or ("messages" if error.code == "context_overflow"
                                                                     else None))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.error.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": openai_field(self.param), "code": self.error.code}}


def openai_field(field: str | None) -> str | None:
    """A request field as OpenAI names it: checks shared with protocol v1 name fields the v1 way."""
    if field is None:
        return None
    field = V1_TOOL_FIELD.sub(r"tools[\1].function.\2", field)
    return field.replace("response_format.schema", "response_format.json_schema.schema")


V1_TOOL_FIELD = re.compile(r"^tools\[(\d+)\]\.(name|description|parameters)")


def invalid(message: str, param: str, status: int = 400) -> Failure:
    return Failure(status, BadRequest(message), param)


# --- request bodies --------------------------------------------------------------------------------------------
def typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """body[key] (None when absent or null), refused unless of `kind` (a bool is never a number)."""
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise invalid(f"'{key}' must be {what}, got {type(value).__name__}", key)
    return value


def bounded(body: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = typed(body, key, (int, float), "a number")
    if value is not None and not (math.isfinite(value) and (low < value or not low_open and low == value)
                                  and value <= high):
        raise invalid(f"'{key}' must be in {'(' if low_open else '['}{low:g}, {high:g}]", key)
    return value


def at_least_one(body: dict[str, Any], key: str) -> int | None:
    value = typed(body, key, int, "an integer")
    if value is not None and value < 1:
        raise invalid(f"'{key}' must be at least 1", key)
    return value


def checked(check: Callable[[Any, str], T], value: Any, field: str) -> T:
    """A protocol check (shared with protocol v1) whose BadRequest becomes a 400 naming `field`."""
    try:
        return check(value, field)
    except BadRequest as exc:
        raise invalid(exc.message, field) from None


def unsupported(body: dict[str, Any]) -> None:
    """Fields we know and cannot honour: refused with the reason rather than silently ignored."""
    if body.get("functions") or body.get("function_call"):
        raise invalid("the legacy 'functions' / 'function_call' fields are not supported: use 'tools' and "
                      "'tool_choice'", "functions" if body.get("functions") else "function_call")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("logprobs are not supported: the engines stream text, not token probabilities", "logprobs")
    if typed(body, "n", int, "an integer") not in (None, 1):
        raise invalid("'n' must be 1: one engine decodes one sequence at a time (ask again for another choice)",
                      "n")


def content_text(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined with newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts (images and audio are not "
                  "supported)", f"messages[{i}].content")


def tool_calls_of(m: dict[str, Any], i: int) -> tuple[ToolCall, ...]:
    """An assistant message's `tool_calls`: OpenAI gives each call's arguments as JSON text; it must be an object."""
    raw = m.get("tool_calls")
    if raw is None:
        return ()
    where = f"messages[{i}].tool_calls"
    if not isinstance(raw, list):
        raise invalid(f"{where} must be a list", where)
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(call.get("id"), str) or not call["id"]
                or call.get("type", "function") != "function" or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str)):
            raise invalid(f"{where}[{j}] must be {{'id': str, 'type': 'function', 'function': {{'name': str, "
                          "'arguments': JSON text}}}}", f"{where}[{j}]")
        try:
            arguments = json.loads(function["arguments"] or "{}")
        except ValueError:
            arguments = None
        if not isinstance(arguments, dict):
            raise invalid(f"{where}[{j}].function.arguments must be the JSON text of an object",
                          f"{where}[{j}].function.arguments")
        calls.append(ToolCall(call["id"], function["name"], arguments))
    return tuple(calls)


def messages_of(body: dict[str, Any], max_messages: int) -> tuple[Message, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty list", "messages")
    if len(raw) > max_messages:
        raise invalid(f"{len(raw)} messages in one request; the limit is {max_messages} (server.max_messages)",
                      "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}] must be an object", f"messages[{i}]")
        role = {"developer": "system"}.get(m.get("role"), m.get("role"))  # OpenAI's newer name for system
        if role == "function":
            raise invalid("'function' messages (the legacy API) are not supported: use 'tool' messages",
                          f"messages[{i}].role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of system, developer, user, assistant, tool",
                          f"messages[{i}].role")
        calls = tool_calls_of(m, i) if role == "assistant" else ()
        content = m.get("content")
        text = "" if content is None and calls else content_text(content, i)
        call_id = m.get("tool_call_id")
        if role == "tool" and (not isinstance(call_id, str) or not call_id):
            raise invalid(f"messages[{i}].tool_call_id must name the call this tool result answers",
                          f"messages[{i}].tool_call_id")
        out.append(Message(role, text, calls, call_id if role == "tool" else None))
    try:
        check_last_message(out)
    except BadRequest as exc:
        raise invalid(exc.message, "messages") from None
    return tuple(out)


def tools_of(body: dict[str, Any]) -> tuple[ToolSpec, ...]:
    raw = typed(body, "tools", list, "a list")
    out = []
    for i, tool in enumerate(raw or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise invalid(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'description', "
                          "'parameters'}}}}", f"tools[{i}]")
        name, description = function.get("name"), function.get("description") or ""
        parameters = function.get("parameters") or {}
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"tools[{i}].function.name must be 1 to 64 characters of A-Z a-z 0-9 _ -",
                          f"tools[{i}].function.name")
        if not isinstance(description, str):
            raise invalid(f"tools[{i}].function.description must be a string", f"tools[{i}].function.description")
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters must be a JSON schema object",
                          f"tools[{i}].function.parameters")
        out.append(ToolSpec(name, description, parameters))
    return tuple(out)


def tool_choice_of(body: dict[str, Any]) -> str:
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return choice or "auto"
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    raise invalid("'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                  "\"function\": {\"name\": ...}}", "tool_choice")


def response_format_of(body: dict[str, Any]) -> ResponseFormat | None:
    fmt = typed(body, "response_format", dict, "an object")
    kind = (fmt or {}).get("type", "text")
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise invalid("response_format.json_schema must be {'name', 'schema': {...}, 'strict'?}",
                          "response_format.json_schema")
        strict = typed(spec, "strict", bool, "true or false")
        name = typed(spec, "name", str, "a string")
        return ResponseFormat("json_schema", spec.get("schema", {}), name, bool(strict))
    raise invalid("response_format.type must be text, json_object or json_schema", "response_format.type")


@dataclass(frozen=True)
class ChatSpec:
    """A chat completion request, checked: what the handlers get plus what only the HTTP layer does."""

    request: ChatRequest
    stream: bool
    include_usage: bool


def parse_chat(body: dict[str, Any], request_id: str, max_messages: int) -> ChatSpec:
    """OpenAI's chat completion body. Unknown fields are ignored, as OpenAI does; wrong types are refused."""
    unsupported(body)
    typed(body, "model", str, "a string")  # one model is served, whatever the client names
    typed(body, "user", str, "a string")
    stream = bool(typed(body, "stream", bool, "true or false"))
    options = typed(body, "stream_options", dict, "an object")
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool(typed(options or {}, "include_usage", bool, "true or false"))
    max_tokens = at_least_one(body, "max_completion_tokens") or at_least_one(body, "max_tokens")
    stop = checked(check_stops, body.get("stop"), "stop")
    seed = checked(check_seed, typed(body, "seed", int, "an integer"), "seed")
    request = ChatRequest(id=request_id, messages=messages_of(body, max_messages), max_tokens=max_tokens,
                          temperature=bounded(body, "temperature", 0, 2), top_p=bounded(body, "top_p", 0, 1, True),
                          seed=seed, stop=stop, tools=tools_of(body), tool_choice=tool_choice_of(body),
                          parallel_tool_calls=typed(body, "parallel_tool_calls", bool, "true or false") is not False,
                          response_format=response_format_of(body))
    return ChatSpec(request, stream, include_usage)


def parse_summarize(body: dict[str, Any], request_id: str) -> tuple[SummarizeRequest, bool]:
    text = typed(body, "text", str, "a string")
    if not text or not text.strip():
        raise invalid("'text' is required and must not be empty", "text")
    style = typed(body, "style", str, "a string") or "paragraph"
    if style not in ("paragraph", "bullets"):
        raise invalid("'style' must be 'paragraph' or 'bullets'", "style")
    stream = bool(typed(body, "stream", bool, "true or false"))
    return SummarizeRequest(id=request_id, text=text, max_tokens=at_least_one(body, "max_tokens"), style=style,
                            stream=stream), stream  # type: ignore[arg-type]
