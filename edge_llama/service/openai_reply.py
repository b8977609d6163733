"""OpenAI's answers, rendered from the daemon's protocol events: a chat completion (one JSON object, or SSE chunks
ending with `data: [DONE]`), with tool calls, and our summarize extension.

Each job (service/handlers.py) reports through a `send` callback the same events protocol v1 streams (token,
progress, done); a Reply turns them into HTTP through the connection's `Responder` methods. docs/http.md is the
contract.
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from edge_llama.service.openai_api import ChatSpec
from edge_llama.service.scheduler import CancelToken

FINISH = {"stop": "stop", "length": "length", "safety": "content_filter", "tool_calls": "tool_calls"}  # v1 -> OpenAI


class Responder(Protocol):
    """What a reply needs of its HTTP connection (service/http.py)."""

    responding: bool  # the response head is out

    async def respond(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None,
                      content_type: str = "application/json") -> None: ...

    async def stream(self, data: bytes, end: bool = False, content_type: str = "text/event-stream") -> None: ...


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


def openai_tool_calls(calls: list[dict[str, Any]], deltas: bool = False) -> list[dict[str, Any]]:
    """The done event's calls in OpenAI's shape: arguments as JSON text; as stream deltas, with their index."""
    out = []
    for index, call in enumerate(calls):
        item = {"id": call["id"], "type": "function",
                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}
        out.append({"index": index, **item} if deltas else item)
    return out


class Reply:
    """The `send` callback one chat or summarize job gets, and what the job answered."""

    error_event: str | None = None  # the SSE event name of an error after the stream started (None: unnamed)

    def __init__(self, http: Responder, request_id: str, stream: bool, model: str) -> None:
        self.http, self.id, self.stream, self.model = http, request_id, stream, model
        self.cancel = CancelToken()
        self.outcome = "cancelled"  # the finish reason or error code, for stats and the log
        self.created = int(time.time())

    async def send(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def stream_error(self, body: Any) -> bytes:
        """An error after the stream started: the last piece of the stream."""
        return sse(body, self.error_event)

    def finish_reason(self, done: dict[str, Any]) -> str:
        """The OpenAI finish reason of a `done`; a generation cancelled by shutdown is the error it was."""
        if done["finish_reason"] == "cancelled":
            raise self.cancel.error
        self.outcome = done["finish_reason"]
        return FINISH[done["finish_reason"]]

    def usage(self, done: dict[str, Any]) -> dict[str, int]:
        u = done["usage"]
        return {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}


class ChatReply(Reply):
    def __init__(self, http: Responder, spec: ChatSpec, model: str) -> None:
        super().__init__(http, spec.request.id, spec.stream, model)
        self.spec = spec
        self.parts: list[str] = []  # the answer, when not streaming

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if self.spec.include_usage:
            body["usage"] = None  # as OpenAI: every chunk has it, null but on the last one
        return sse(body)

    def opening(self) -> bytes:
        """OpenAI's first chunk carries the role: sent with the first text (or the end)."""
        return b"" if self.http.responding else self.chunk({"role": "assistant", "content": ""})

    async def send(self, event: dict[str, Any]) -> None:
        if event["event"] == "token":
            if not self.stream:
                self.parts.append(event["text"])
            elif event["text"]:
                await self.http.stream(self.opening() + self.chunk({"content": event["text"]}))
        elif event["event"] == "done":
            await self.done(event)

    async def done(self, event: dict[str, Any]) -> None:
        finish = self.finish_reason(event)
        refusal = (event.get("safety") or {}).get("refusal")
        calls = event.get("tool_calls") or []
        extra = {"truncated": event["truncated"]} if "truncated" in event else {}  # old turns left out (ours)
        if not self.stream:
            content = "".join(self.parts)
            message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None,
                                       "refusal": refusal}
            if calls:
                message["tool_calls"] = openai_tool_calls(calls)
            await self.http.respond(200, {
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(event), **extra})
            return
        tail = self.opening()
        if calls:  # each call is one delta: its id, name and whole arguments, grouped by index
            tail += self.chunk({"tool_calls": openai_tool_calls(calls, deltas=True)})
        tail += self.chunk({"refusal": refusal} if refusal else {}, finish, **extra)
        if self.spec.include_usage:
            tail += sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                         "model": self.model, "choices": [], "usage": self.usage(event)})
        await self.http.stream(tail + sse("[DONE]"), end=True)


class SummaryReply(Reply):
    """`POST /v1/summarize`: one JSON object, or SSE events progress / token / done (error after a start)."""

    error_event = "error"

    async def send(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "done":
            finish = self.finish_reason(event)
            result = {"id": self.id, "object": "summary", "created": self.created, "model": self.model,
                      "finish_reason": finish, "chunks": event["chunks"], "usage": self.usage(event)}
            if not self.stream:
                await self.http.respond(200, {**result, "summary": event["text"]})
            else:
                await self.http.stream(sse(result, "done"), end=True)
        elif self.stream:
            data = {"done": event["done"], "total": event["total"]} if kind == "progress" else {"text": event["text"]}
            await self.http.stream(sse(data, kind))
