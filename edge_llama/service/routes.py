"""The HTTP endpoints: OpenAI's chat completions and models, our summarize extension, /health and /metrics, and
Ollama's API (service/ollama_api.py). service/http.py runs them; docs/http.md is the contract.

Each handler gets the connection, the request path and its body, and answers through the connection (`respond`,
or a Reply that renders the job's protocol events).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from edge_llama.errors import Unavailable
from edge_llama.protocol import InfoRequest
from edge_llama.service import metrics
from edge_llama.service import ollama_api as ollama
from edge_llama.service.http import HttpConnection, Route
from edge_llama.service.openai_api import Failure, invalid, parse_chat, parse_summarize
from edge_llama.service.openai_reply import ChatReply, SummaryReply
from edge_llama.service.summarize import summarize


async def chat(http: HttpConnection, target: str, body: bytes) -> None:
    handlers = http.hub.handlers
    spec = parse_chat(http.json_body(body), f"chatcmpl-{secrets.token_hex(12)}", http.hub.config.server.max_messages)
    reply = ChatReply(http, spec, handlers.engine.model_name)
    await http.run(reply, lambda cancel, received, send: handlers.chat(spec.request, cancel, received, send))


async def summarize_text(http: HttpConnection, target: str, body: bytes) -> None:
    handlers = http.hub.handlers
    request, stream = parse_summarize(http.json_body(body), f"summary-{secrets.token_hex(12)}")
    reply = SummaryReply(http, request.id, stream, handlers.engine.model_name)
    await http.run(reply, lambda cancel, received, send: summarize(handlers, request, cancel, received, send))


async def models(http: HttpConnection, target: str, body: bytes) -> None:
    await http.respond(200, {"object": "list", "data": [model_card(http)]})


async def model(http: HttpConnection, target: str, body: bytes) -> None:
    name, served = target.removeprefix("/v1/models/"), http.hub.handlers.engine.model_name
    if name != served:
        raise invalid(f"no such model: {name}; this daemon serves {served}", "model", 404)
    await http.respond(200, model_card(http))


def model_card(http: HttpConnection) -> dict[str, Any]:
    h = http.hub.handlers
    started = time.time() - (time.monotonic() - h.stats.started)
    return {"id": h.engine.model_name, "object": "model", "created": int(started), "owned_by": "edge-llama",
            "backend": h.engine.name, "kv_tokens": h.engine.capacity.kv_tokens}


async def health(http: HttpConnection, target: str, body: bytes) -> None:
    info = http.hub.handlers.info(InfoRequest(id="health", op="health"))
    info = {k: v for k, v in info.items() if k not in ("id", "event")}
    if info["state"] != "ready":
        raise Failure(503, Unavailable(f"the daemon is {info['state']}" + (f": {info['fault']}"
                                                                         if "fault" in info else "")))
    await http.respond(200, info)


async def scrape(http: HttpConnection, target: str, body: bytes) -> None:
    h = http.hub.handlers
    snap = metrics.snapshot(h.stats, h.scheduler, h.engine, h.state)  # on the loop, where the counters change
    text, content_type = await asyncio.to_thread(
        lambda: metrics.render(snap, metrics.sessions_on_disk(h.sessions.root)))
    await http.respond(200, text, content_type=content_type)

ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route("POST", "chat", chat),
    "/v1/summarize": Route("POST", "summarize", summarize_text),
    "/v1/models": Route("GET", "models", models),
    "/v1/models/": Route("GET", "model", model),
    "/health": Route("GET", "health", health),
    "/metrics": Route("GET", "metrics", scrape),
    # Ollama's API (docs/http.md): its error shape ({"error": "..."}) and statuses
    "/api/chat": Route("POST", "chat", ollama.chat, ollama.error_body),
    "/api/generate": Route("POST", "chat", ollama.generate, ollama.error_body),
    "/api/tags": Route("GET", "models", ollama.tags, ollama.error_body),
    "/api/show": Route("POST", "model", ollama.show, ollama.error_body),
    "/api/ps": Route("GET", "models", ollama.ps, ollama.error_body),
    "/api/version": Route("GET", "version", ollama.version, ollama.error_body),
    "/api/pull": Route("POST", "pull", ollama.pull, ollama.error_body),
    "/api/": Route("*", "unknown", ollama.not_served, ollama.error_body),  # the rest of Ollama's API: its 404
}
