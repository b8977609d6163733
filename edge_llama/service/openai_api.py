"""OpenAI's chat completion API as this daemon reads it: request bodies checked into protocol requests, and the
error shape with its statuses. The HTTP transport is service/http.py; docs/http.md is the contract.

Unknown fields are ignored, as OpenAI does; a known field of the wrong type or range is refused with 400 naming
it in `param`; fields we cannot honour (tools, n > 1, logprobs, JSON mode) are refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edge_llama.errors import BadRequest, EdgeLlamaError
from edge_llama.protocol import ROLES, ChatRequest, Message, SummarizeRequest

MAX_STOP = 4  # stop strings per request, as OpenAI
STATUS = {"bad_json": 400, "bad_request": 400, "context_overflow": 400, "safety_blocked": 400, "too_large": 413,
          "forbidden": 403, "busy": 429, "unavailable": 503, "cancelled": 503, "internal": 500}
ERROR_TYPES = {403: "permission_error", 404: "not_found_error", 429: "rate_limit_error", 500: "server_error",
               503: "unavailable_error"}  # any other status: invalid_request_error (llama.cpp's server uses these)
FINISH = {"stop": "stop", "length": "length", "safety": "content_filter"}  # protocol v1 -> OpenAI


class Failure(Exception):
    """An error answer: its status, the typed error (whose wire code is the body's `code`), the field at fault."""

    def __init__(self, status: int, error: EdgeLlamaError, param: str | None = None, close: bool = False) -> None:
        super().__init__(error.message)
        self.status, self.error, self.param, self.close = status, error, param, close

    @classmethod
    def of(cls, error: EdgeLlamaError) -> Failure:
        return cls(STATUS.get(error.code, 500), error, "messages" if error.code == "context_overflow" else None)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.error.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.error.code}}


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


def unsupported(body: dict[str, Any]) -> None:
    """Fields we know and cannot honour: refused with the reason rather than silently ignored."""
    if body.get("tools") or body.get("functions"):
        raise invalid("tools / function calling is not supported: the served models (Llama-3.2-1B at INT4, "
                      "SmolLM2-135M) do not call tools reliably", "tools" if body.get("tools") else "functions")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise invalid("logprobs are not supported: the engines stream text, not token probabilities", "logprobs")
    if typed(body, "n", int, "an integer") not in (None, 1):
        raise invalid("'n' must be 1: one engine decodes one sequence at a time (ask again for another choice)",
                      "n")
    fmt = typed(body, "response_format", dict, "an object")
    if fmt is not None and fmt.get("type", "text") != "text":
        raise invalid("response_format other than text is not supported (no constrained decoding)",
                      "response_format")


def content_text(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of text parts (joined with newlines)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise invalid(f"messages[{i}].content must be a string or a list of text parts (images and audio are not "
                  "supported)", f"messages[{i}].content")


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
        if role in ("tool", "function"):
            raise invalid("tool messages are not supported (no tool calling)", f"messages[{i}].role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of system, developer, user, assistant",
                          f"messages[{i}].role")
        out.append(Message(role, content_text(m.get("content"), i)))
    if out[-1].role != "user":
        raise invalid("the last message must be the user's", "messages")
    return tuple(out)


def stops_of(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


@dataclass(frozen=True)
class ChatSpec:
    """A chat completion request, checked: what the handlers get plus what only the HTTP layer does."""

    request: ChatRequest
    stream: bool
    include_usage: bool
    stop: tuple[str, ...]


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
    request = ChatRequest(id=request_id, messages=messages_of(body, max_messages), max_tokens=max_tokens,
                          temperature=bounded(body, "temperature", 0, 2), top_p=bounded(body, "top_p", 0, 1, True),
                          seed=typed(body, "seed", int, "an integer"))
    return ChatSpec(request, stream, include_usage, stops_of(body))


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


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (kept until they are not)."""
    for n in range(min(len(text), max(map(len, stops)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0
