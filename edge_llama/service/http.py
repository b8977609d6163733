"""HTTP/1.1 on the daemon's own socket: an OpenAI-compatible API, our summarize extension, /health and /metrics.

server.py hands a connection here when it starts with an HTTP method (protocol v1 lines start with `{`).
h11 parses and frames; this module routes. Chat and summarize run through the same admission (`busy` -> 429),
handlers (safety guard, context policy), stats and logging as protocol v1: the handlers' protocol events
(token, progress, done) reach a `send` callback that turns them into SSE chunks or one JSON response.

Requests on one connection are answered one at a time, in order (pipelining works; HTTP/1.1 allows nothing
else). While one runs, the connection is watched: a client that goes away cancels it within a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11

from edge_llama import __version__
from edge_llama.errors import (
    BadJson,
    BadRequest,
    Cancelled,
    EdgeLlamaError,
    Forbidden,
    InternalError,
    TooLarge,
    Unavailable,
)
from edge_llama.protocol import InfoRequest
from edge_llama.service import metrics
from edge_llama.service.handlers import Send
from edge_llama.service.openai_api import (
    FINISH,
    STATUS,
    ChatSpec,
    Failure,
    held_back,
    invalid,
    parse_chat,
    parse_summarize,
)
from edge_llama.service.scheduler import CancelToken
from edge_llama.service.server import READ_CHUNK, WRITE_HIGH_WATER
from edge_llama.service.summarize import summarize

if TYPE_CHECKING:
    from edge_llama.service.access import Peer
    from edge_llama.service.server import Server

HEAD_LIMIT = 16 * 1024  # request line + headers, bytes (h11's max_incomplete_event_size); beyond: 431
HEADER_DEADLINE_S = 10.0  # a request head must be complete this long after its first byte (slowloris)
BODY_PAUSE_S = 10.0  # the longest pause inside a request body before 408
IDLE_S = 60.0  # a keep-alive connection without a new request for this long is closed (clients reuse for ~5 s)
LINGER_S = 2.0  # closing on a client that may still be sending: how long its input is read and dropped first


def sse(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


# --- replies: protocol events -> HTTP ----------------------------------------------------------------------------
class Reply:
    """The `send` callback one chat or summarize job gets, and what the job answered."""

    error_event: str | None = None  # the SSE event name of an error after the stream started (None: unnamed)

    def __init__(self, http: HttpConnection, request_id: str, stream: bool) -> None:
        self.http, self.id, self.stream = http, request_id, stream
        self.cancel = CancelToken()
        self.outcome = "cancelled"  # the finish reason or error code, for stats and the log
        self.created = int(time.time())
        self.model = http.server.handlers.engine.model_name

    async def send(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

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
    def __init__(self, http: HttpConnection, spec: ChatSpec) -> None:
        super().__init__(http, spec.request.id, spec.stream)
        self.spec = spec
        self.parts: list[str] = []  # the answer, when not streaming
        self.held = ""  # released text kept back while it could be the start of a stop string
        self.stopped = False  # a stop string was reached: the generation is being cancelled

    def chunk(self, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
        if self.spec.include_usage:
            body["usage"] = None  # as OpenAI: every chunk has it, null but on the last one
        return sse(body)

    def opening(self) -> bytes:
        """OpenAI's first chunk carries the role: sent with the first text (or the end)."""
        return b"" if self.http.responding else self.chunk({"role": "assistant", "content": ""})

    async def text(self, text: str) -> None:
        if text and not self.stream:
            self.parts.append(text)
        elif text:
            await self.http.stream(self.opening() + self.chunk({"content": text}))

    def cut(self, text: str) -> str:
        """What of `text` can go out now: up to the first stop string (which cancels the generation), less a tail
        that could still become one."""
        stops = self.spec.stop
        if not stops:
            return text
        pending = self.held + text
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            self.cancel.cancel(Cancelled("a stop string was reached"))
            return pending[:min(hits)]
        keep = held_back(pending, stops)
        self.held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    async def send(self, event: dict[str, Any]) -> None:
        if event["event"] == "token" and not self.stopped:
            await self.text(self.cut(event["text"]))
        elif event["event"] == "done":
            if self.stopped:
                event = {**event, "finish_reason": "stop"}
            await self.text(self.held)
            await self.done(event)

    async def done(self, event: dict[str, Any]) -> None:
        finish = self.finish_reason(event)
        refusal = (event.get("safety") or {}).get("refusal")
        extra = {"truncated": event["truncated"]} if "truncated" in event else {}  # old turns left out (ours)
        if not self.stream:
            message = {"role": "assistant", "content": "".join(self.parts), "refusal": refusal}
            await self.http.respond(200, {
                "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": self.usage(event), **extra})
            return
        tail = self.opening() + self.chunk({"refusal": refusal} if refusal else {}, finish, **extra)
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


# --- the connection ---------------------------------------------------------------------------------------------
class HttpConnection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                 log: logging.LoggerAdapter[logging.Logger]) -> None:
        self.server, self.reader, self.writer, self.peer, self.log = server, reader, writer, peer, log
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.loop = asyncio.get_running_loop()
        self.responding = False  # the current request's response head is sent
        self.reply: Reply | None = None  # the running chat or summarize, cancelled if the client goes away
        self.gone = False

    async def serve(self, head: bytes, allowed: bool) -> None:
        """Answer requests until the client closes, an error ends the connection, or it idles for IDLE_S."""
        self.conn.receive_data(head)
        try:
            while not self.gone:
                request = await self.receive_head()
                if request is None:
                    break
                self.responding = False
                if not allowed:
                    await self.fail(Failure(403, Forbidden(f"uid {self.peer.uid} is not allowed to use this daemon "
                                                           "(ask for the client group)"), close=True))
                    break
                await self.exchange(request)
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    break  # closing (asked for, or the body was not read)
                self.conn.start_next_cycle()
        except (ConnectionError, OSError):
            self.lost()
        except asyncio.CancelledError:  # shutdown: no lingering
            self.lost()
            raise
        finally:
            if not self.gone and self.conn.their_state is not h11.CLOSED:
                await self.linger()
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def linger(self) -> None:
        """We close first, and the client may still be sending (a refused body, say): closing a socket with unread
        input resets it, and the client would read ECONNRESET instead of our answer. So: end our side, then read
        and drop its input until it closes or LINGER_S pass."""
        deadline = self.loop.time() + LINGER_S
        with contextlib.suppress(ConnectionError, OSError, RuntimeError, asyncio.TimeoutError):
            self.writer.write_eof()
            while await asyncio.wait_for(self.reader.read(READ_CHUNK), max(0.0, deadline - self.loop.time())):
                pass

    def lost(self) -> None:
        if not self.gone:
            self.gone = True
            if self.reply is not None:
                self.reply.cancel.cancel(Cancelled("client disconnected"))

    # --- reading ---------------------------------------------------------------------------------------------
    async def read_into(self, timeout: float) -> None:
        """Read what arrives within `timeout` s into h11 (raises asyncio.TimeoutError)."""
        data = await asyncio.wait_for(self.reader.read(READ_CHUNK), max(0.0, timeout))
        self.conn.receive_data(data)

    async def receive_head(self) -> h11.Request | None:
        """The next request's head; None when the client closed or idled. Answers 400/408/431 itself."""
        idle_until = self.loop.time() + IDLE_S
        started = self.loop.time() if self.conn.trailing_data[0] else None  # first byte of this head seen
        try:
            while True:
                event = self.conn.next_event()
                if isinstance(event, h11.Request):
                    # h11 limits a head still arriving; one that came whole in a read is measured here.
                    size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
                    if size > HEAD_LIMIT:
                        raise h11.RemoteProtocolError(f"request head over {HEAD_LIMIT} bytes", 431)
                    return event
                if event is not h11.NEED_DATA:  # ConnectionClosed
                    return None
                deadline = started + HEADER_DEADLINE_S if started is not None else idle_until
                await self.read_into(deadline - self.loop.time())
                if started is None and self.conn.trailing_data[0]:
                    started = self.loop.time()
        except h11.RemoteProtocolError as exc:
            await self.fail(Failure(exc.error_status_hint, BadRequest(f"malformed HTTP request: {exc}"), close=True))
        except asyncio.TimeoutError:
            if started is not None:
                await self.fail(Failure(408, BadRequest(f"the request head was not complete within "
                                                        f"{HEADER_DEADLINE_S:g} s"), close=True))
        return None

    async def receive_body(self, request: h11.Request) -> bytes:
        """The whole body, refused with 413 before it is read when Content-Length is over the limit (chunked: as
        soon as it is)."""
        limit = self.server.config.server.max_line_bytes
        headers = dict(request.headers)
        too_large = Failure(413, TooLarge(f"request body over {limit} bytes (server.max_line_bytes)"), close=True)
        length = headers.get(b"content-length")
        if length is not None and int(length) > limit:
            raise too_large
        if request.method == b"POST" and length is None and b"transfer-encoding" not in headers:
            raise Failure(411, BadRequest("a POST needs a Content-Length or a chunked body"), close=True)
        if self.conn.they_are_waiting_for_100_continue:
            self.conn_send(h11.InformationalResponse(status_code=100, headers=[]))
        body = bytearray()
        try:
            while True:
                event = self.conn.next_event()
                if isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > limit:
                        raise too_large
                elif isinstance(event, h11.EndOfMessage):
                    return bytes(body)
                elif event is h11.NEED_DATA:
                    await self.read_into(BODY_PAUSE_S)
                else:
                    raise Failure(400, BadRequest("the connection closed inside the request body"), close=True)
        except h11.RemoteProtocolError as exc:
            raise Failure(exc.error_status_hint, BadRequest(f"malformed request body: {exc}"), close=True) from None
        except asyncio.TimeoutError:
            raise Failure(408, BadRequest(f"the request body paused for more than {BODY_PAUSE_S:g} s"),
                          close=True) from None

    async def watch(self) -> None:
        """While a request runs: read ahead (a pipelined request, kept for later), notice the client leaving."""
        limit = self.server.config.server.max_line_bytes + HEAD_LIMIT
        try:
            while len(self.conn.trailing_data[0]) <= limit:  # beyond: stop reading, the kernel pushes back
                data = await self.reader.read(READ_CHUNK)
                self.conn.receive_data(data)
                if not data:
                    self.lost()
                    return
        except (ConnectionError, OSError):
            self.lost()

    # --- writing ---------------------------------------------------------------------------------------------
    def conn_send(self, event: Any) -> None:
        data = self.conn.send(event)  # h11 frames it (chunked when streaming to an HTTP/1.1 client)
        if data and not self.gone:
            self.writer.write(data)

    async def write(self, data: bytes) -> None:
        """Part of a streamed body; waits while the client reads slowly (as protocol v1 does)."""
        if self.gone:
            return
        try:
            self.conn_send(h11.Data(data=data))
            if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.lost()

    async def respond(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None,
                      content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
        self.conn_send(h11.Response(status_code=status, reason=HTTPStatus(status).phrase, headers=[
            ("content-type", content_type), ("content-length", str(len(data))), ("server", f"edge-llama/{__version__}"),
            *(headers or [])]))
        self.responding = True
        await self.write(data)
        self.conn_send(h11.EndOfMessage())

    async def stream(self, data: bytes, end: bool = False) -> None:
        """Server-sent events. The response head goes out with the first one, so that an error before it (busy,
        context overflow, an input block) is an ordinary error response with its own status."""
        if not self.responding:
            self.conn_send(h11.Response(status_code=200, headers=[
                ("content-type", "text/event-stream"), ("cache-control", "no-cache"),
                ("server", f"edge-llama/{__version__}")]))
            self.responding = True
        await self.write(data)
        if end and not self.gone:
            self.conn_send(h11.EndOfMessage())

    async def fail(self, failure: Failure) -> None:
        """Answer an error: a JSON error response, or an error event if a stream already started."""
        self.server.handlers.stats.errors[failure.error.code] += 1
        if self.gone:
            return
        if not self.responding:
            headers = [("connection", "close")] if failure.close else []
            if failure.error.retry_after_ms is not None:
                ms = failure.error.retry_after_ms
                headers += [("retry-after", str(max(1, math.ceil(ms / 1000)))), ("retry-after-ms", str(ms))]
            await self.respond(failure.status, failure.body(), headers)
        elif self.conn.our_state is h11.SEND_BODY:
            await self.stream(sse(failure.body(), self.reply.error_event if self.reply else None), end=True)

    # --- routing ---------------------------------------------------------------------------------------------
    async def exchange(self, request: h11.Request) -> None:
        target = request.target.decode("ascii", "replace").partition("?")[0]
        method = request.method.decode("ascii", "replace")
        started = time.monotonic()
        route = ROUTES.get(target) or (("GET", HttpConnection.model) if target.startswith("/v1/models/") else None)
        op: str | None = None  # known once routed
        outcome, status = "ok", 200
        try:
            body = await self.receive_body(request)
            if route is None:
                raise invalid(f"no such endpoint: {target}", "url", 404)
            if method != route[0]:
                raise invalid(f"{target} takes {route[0]}, not {method}", "method", 405)
            op = route[1].__name__
            self.server.handlers.stats.requests[op] += 1
            await route[1](self, target, body)
        except Failure as failure:
            outcome, status = failure.error.code, failure.status
            await self.fail(failure)
        except EdgeLlamaError as exc:
            outcome, status = exc.code, STATUS.get(exc.code, 500)
            await self.fail(Failure.of(exc))
        except Exception as exc:  # a bug: answer it, log it, keep serving
            self.log.exception("%s %s failed", method, target)
            outcome, status = "internal", 500
            await self.fail(Failure(500, InternalError(f"internal error: {type(exc).__name__}")))
        extra: dict[str, Any] = {"OP": op, "HTTP_STATUS": status}
        if self.reply is not None:
            outcome = self.reply.outcome if status == 200 else outcome
            extra["REQUEST_ID"] = self.reply.id
            self.reply = None
        if op is not None:
            self.server.handlers.stats.outcomes[op, outcome] += 1
        # Chats, summaries and errors at info, as protocol v1 logs its requests; scrapes and probes at debug.
        level = logging.INFO if op in ("chat", "summarize") or status >= 400 else logging.DEBUG
        self.log.log(level, "HTTP %s %s %d %s in %.0f ms", method, target, status, outcome,
                     (time.monotonic() - started) * 1000, extra={**extra, "OUTCOME": outcome})

    def json_body(self, body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Failure(400, BadJson(f"the request body is not JSON: {exc}")) from None
        if not isinstance(obj, dict):
            raise Failure(400, BadJson("the request body must be a JSON object"))
        return obj

    async def run(self, reply: Reply, job: Callable[[CancelToken, float, Send], Awaitable[None]]) -> None:
        """One chat or summarize job, admitted and cancellable as on protocol v1 (shutdown cancels it too)."""
        admission = self.server.handlers.scheduler.admit()
        self.reply = reply
        self.server.cancels.add(reply.cancel)
        watcher = asyncio.create_task(self.watch())
        try:
            await job(reply.cancel, time.monotonic(), reply.send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            admission.release()
            self.server.cancels.discard(reply.cancel)

    async def chat(self, target: str, body: bytes) -> None:
        handlers = self.server.handlers
        spec = parse_chat(self.json_body(body), f"chatcmpl-{secrets.token_hex(12)}",
                          self.server.config.server.max_messages)
        reply = ChatReply(self, spec)
        await self.run(reply, lambda cancel, received, send: handlers.chat(spec.request, cancel, received, send))

    async def summarize(self, target: str, body: bytes) -> None:
        request, stream = parse_summarize(self.json_body(body), f"summary-{secrets.token_hex(12)}")
        reply = SummaryReply(self, request.id, stream)
        await self.run(reply, lambda cancel, received, send: summarize(self.server.handlers, request, cancel,
                                                                       received, send))

    async def models(self, target: str, body: bytes) -> None:
        await self.respond(200, {"object": "list", "data": [self.model_card()]})

    async def model(self, target: str, body: bytes) -> None:
        name = target.removeprefix("/v1/models/")
        if name != self.server.handlers.engine.model_name:
            raise invalid(f"no such model: {name}; this daemon serves {self.server.handlers.engine.model_name}",
                          "model", 404)
        await self.respond(200, self.model_card())

    def model_card(self) -> dict[str, Any]:
        h = self.server.handlers
        started = time.time() - (time.monotonic() - h.stats.started)
        return {"id": h.engine.model_name, "object": "model", "created": int(started), "owned_by": "edge-llama",
                "backend": h.engine.name, "kv_tokens": h.engine.capacity.kv_tokens}

    async def health(self, target: str, body: bytes) -> None:
        info = self.server.handlers.info(InfoRequest(id="health", op="health"))
        info = {k: v for k, v in info.items() if k not in ("id", "event")}
        if info["state"] != "ready":
            raise Failure(503, Unavailable(f"the daemon is {info['state']}" + (f": {info['fault']}"
                                                                             if "fault" in info else "")))
        await self.respond(200, info)

    async def metrics(self, target: str, body: bytes) -> None:
        h = self.server.handlers
        snap = metrics.snapshot(h)  # on the loop, where the counters change; the rest off it (disk, import)
        text, content_type = await asyncio.to_thread(
            lambda: metrics.render(snap, metrics.sessions_on_disk(h.sessions.root)))
        await self.respond(200, text, content_type=content_type)


ROUTES: dict[str, tuple[str, Callable[[HttpConnection, str, bytes], Awaitable[None]]]] = {
    "/v1/chat/completions": ("POST", HttpConnection.chat),
    "/v1/summarize": ("POST", HttpConnection.summarize),
    "/v1/models": ("GET", HttpConnection.models),
    "/health": ("GET", HttpConnection.health),
    "/metrics": ("GET", HttpConnection.metrics),
}
