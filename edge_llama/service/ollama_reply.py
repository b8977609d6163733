"""Ollama's answers to /api/chat and /api/generate, rendered from the daemon's protocol events: NDJSON lines
(application/x-ndjson) ending with the `done: true` object, or one JSON object with `"stream": false`.

The final object carries Ollama's counts and durations (api/types.go Metrics, nanoseconds) from the `done` event's
usage and timings: load_duration is the time the request waited for the engine (the model itself is always
loaded), prompt_eval_duration the engine's time to the first token, eval_duration its time from the first to the
last token. docs/http.md is the contract; the request side is service/ollama_api.py.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Literal

from edge_llama.service.openai_reply import Reply, Responder

NDJSON = "application/x-ndjson"
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "safety": "safety"}  # v1 -> Ollama


def iso_time(at: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama's created_at ("2024-07-22T20:33:28.123648Z")."""
    moment = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ndjson(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def ollama_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The done event's calls in Ollama's shape (api/types.go ToolCall): arguments stay an object."""
    return [{"id": call["id"], "function": {"index": index, "name": call["name"], "arguments": call["arguments"]}}
            for index, call in enumerate(calls)]


class OllamaReply(Reply):
    def __init__(self, http: Responder, kind: Literal["chat", "generate"], request_id: str, stream: bool, model: str,
                 num_ctx: int | None, kv_tokens: int) -> None:
        super().__init__(http, request_id, stream, model)
        self.kind = kind
        self.num_ctx, self.kv_tokens = num_ctx, kv_tokens
        self.started = time.monotonic()
        self.parts: list[str] = []  # the answer, when not streaming

    def stream_error(self, body: Any) -> bytes:
        return ndjson(body)  # Ollama's streamResponse: one {"error"} line, then the stream ends

    def piece(self, text: str, done: bool, calls: list[dict[str, Any]] | None = None, **final: Any) -> dict[str, Any]:
        head: dict[str, Any] = {"model": self.model, "created_at": iso_time()}
        if self.kind == "generate":
            return {**head, "response": text, "done": done, **final}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = ollama_tool_calls(calls)
        return {**head, "message": message, "done": done, **final}

    async def loaded(self) -> None:
        """No messages (chat) or an empty prompt (generate): Ollama loads the model and says so. It is loaded."""
        self.outcome = "ok"
        await self.http.respond(200, self.piece("", True, done_reason="load"))

    async def send(self, event: dict[str, Any]) -> None:
        if event["event"] == "token":
            if not self.stream:
                self.parts.append(event["text"])
            elif event["text"]:
                await self.http.stream(ndjson(self.piece(event["text"], False)), content_type=NDJSON)
        elif event["event"] == "done":
            await self.done(event)

    async def done(self, event: dict[str, Any]) -> None:
        if event["finish_reason"] == "cancelled":  # by shutdown: the error it was
            raise self.cancel.error
        self.outcome = event["finish_reason"]
        calls = event.get("tool_calls") or []
        final = {"done_reason": DONE_REASONS[event["finish_reason"]], **self.metrics(event), **self.notes(event)}
        # An answer the output guard blocked ends with the refusal text, as content: Ollama has no refusal field,
        # and a voice assistant should say why it stopped.
        refusal = (event.get("safety") or {}).get("refusal") if event["finish_reason"] == "safety" else None
        if not self.stream:
            text = "".join(self.parts)
            if refusal:
                text += ("\n" if text else "") + refusal
            await self.http.respond(200, self.piece(text, True, calls, **final))
            return
        tail = b""
        if refusal:
            tail += ndjson(self.piece(("\n" if self.http.responding else "") + refusal, False))
        if calls:  # as Ollama: the calls in a line of their own, then the final object
            tail += ndjson(self.piece("", False, calls))
        tail += ndjson(self.piece("", True, **final))
        await self.http.stream(tail, end=True, content_type=NDJSON)

    def metrics(self, done: dict[str, Any]) -> dict[str, int]:
        timings, usage = done.get("timings") or {}, done["usage"]
        tokens, rate = usage["completion_tokens"], timings.get("decode_tok_s") or 0.0
        return {"total_duration": int((time.monotonic() - self.started) * 1e9),
                "load_duration": int((timings.get("queue_ms") or 0.0) * 1e6),
                "prompt_eval_count": usage["prompt_tokens"],
                "prompt_eval_duration": int((timings.get("ttft_ms") or 0.0) * 1e6),
                "eval_count": tokens,
                "eval_duration": int((tokens - 1) / rate * 1e9) if rate and tokens > 1 else 0}

    def notes(self, done: dict[str, Any]) -> dict[str, Any]:
        """Ours, beside Ollama's fields: old turns left out of the KV budget (`truncated`, as on the OpenAI API),
        and a num_ctx above the budget (Ollama would give it; the daemon's KV cache is allocated once)."""
        out: dict[str, Any] = {}
        if "truncated" in done:
            out["truncated"] = done["truncated"]
        if self.num_ctx is not None:
            out["num_ctx"] = {"requested": self.num_ctx, "used": self.kv_tokens}
        return out
