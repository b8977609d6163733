"""HTTP/1.1 on the daemon's own socket: the OpenAI-compatible API, our summarize extension, /health and /metrics.

server.py hands a connection here when it starts with an HTTP method (protocol v1 lines start with `{`).
h11 parses and frames; this module checks each request (Host, Origin, Content-Type, bearer token) and routes it.
Chat and summarize run through the same admission (`busy` -> 429), handlers (safety guard, context policy), stats
and logging as protocol v1: the handlers' protocol events reach a Reply (service/openai_reply.py) that renders them.

Requests on one connection are answered one at a time, in order (pipelining works; HTTP/1.1 allows nothing
else). While one runs, the connection is watched: a client that goes away cancels it within a token, and so does
one that stops reading for server.write_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

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
)
from edge_llama.service.access import Peer
from edge_llama.service.handlers import Send
from edge_llama.service.openai_api import STATUS, Failure, invalid
from edge_llama.service.openai_reply import Reply, sse
from edge_llama.service.scheduler import CancelToken
from edge_llama.service.transport import READ_CHUNK, ClientStalled, Hub, send_bounded

HEAD_LIMIT = 16 * 1024  # request line + headers, bytes (h11's max_incomplete_event_size); beyond: 431
HEADER_DEADLINE_S = 10.0  # a request head must be complete this long after its first byte (slowloris)
BODY_PAUSE_S = 10.0  # the longest pause inside a request body before 408
IDLE_S = 60.0  # a keep-alive connection without a new request for this long is closed (clients reuse for ~5 s)
LINGER_S = 2.0  # closing on a client that may still be sending: how long its input is read and dropped first
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # what clients of the Unix socket put in Host


@dataclass(frozen=True)
class Route:
    """An endpoint: its method ("*": any), the op it counts as (stats, metrics, the log: "chat" as on protocol v1), its
    handler (called with the connection, the path and the body) and its API's error shape (OpenAI's by default)."""

    method: str
    op: str
    handle: Callable[[HttpConnection, str, bytes], Awaitable[None]]
    error_body: Callable[[Failure], Any] = Failure.body


class HttpConnection:
    def __init__(self, hub: Hub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer,
                 log: logging.LoggerAdapter[logging.Logger], routes: dict[str, Route]) -> None:
        self.hub, self.reader, self.writer, self.peer, self.log = hub, reader, writer, peer, log
        self.routes = routes  # path -> Route; a path ending with "/" serves every path under it
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        self.loop = asyncio.get_running_loop()
        self.responding = False  # the current request's response head is sent
        self.reply: Reply | None = None  # the running chat or summarize, cancelled if the client goes away
        self.error_body: Callable[[Failure], Any] = Failure.body
        self.gone = False

    async def serve(self, head: bytes) -> None:
        """Answer requests until the client closes, an error ends the connection, or it idles for IDLE_S."""
        self.conn.receive_data(head)
        try:
            while not self.gone:
                request = await self.receive_head()
                if request is None:
                    break
                self.responding = False
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

    def lost(self, why: Cancelled | None = None) -> None:
        if not self.gone:
            self.gone = True
            if self.reply is not None:
                self.reply.cancel.cancel(why or Cancelled("client disconnected"))

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
        limit = self.hub.config.server.max_line_bytes
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
        limit = self.hub.config.server.max_line_bytes + HEAD_LIMIT
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
        """Part of a body; waits while the client reads slowly, at most server.write_timeout_s."""
        if self.gone:
            return
        try:
            await send_bounded(self.writer, self.conn.send(h11.Data(data=data)) or b"",
                               self.hub.config.server.write_timeout_s)
        except ClientStalled as exc:
            self.log.warning("%s: dropping the connection and cancelling its request", exc)
            self.lost(Cancelled(str(exc)))
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

    async def stream(self, data: bytes, end: bool = False, content_type: str = "text/event-stream") -> None:
        """A streamed body (server-sent events, or NDJSON). The response head goes out with the first piece, so
        that an error before it (busy, context overflow, an input block) is an ordinary error response."""
        if not self.responding:
            self.conn_send(h11.Response(status_code=200, headers=[
                ("content-type", content_type), ("cache-control", "no-cache"),
                ("server", f"edge-llama/{__version__}")]))
            self.responding = True
        await self.write(data)
        if end and not self.gone:
            self.conn_send(h11.EndOfMessage())

    async def fail(self, failure: Failure) -> None:
        """Answer an error: an error response in the route's API shape, or an error event if a stream started."""
        self.hub.handlers.stats.errors[failure.error.code] += 1
        if self.gone:
            return
        if not self.responding:
            headers = [("connection", "close")] if failure.close else []
            if failure.error.retry_after_ms is not None:
                ms = failure.error.retry_after_ms
                headers += [("retry-after", str(max(1, math.ceil(ms / 1000)))), ("retry-after-ms", str(ms))]
            if failure.status == 401:
                headers.append(("www-authenticate", 'Bearer realm="edge-llama"'))
            await self.respond(failure.status, self.error_body(failure), headers)
        elif self.conn.our_state is h11.SEND_BODY:
            body = self.error_body(failure)
            await self.stream(self.reply.stream_error(body) if self.reply is not None else sse(body), end=True)

    # --- checks and routing ----------------------------------------------------------------------------------
    def admit(self, request: h11.Request, method: str) -> None:
        """What every request must show before it is served (docs/http.md, "Who may call"): a local or configured
        Host (DNS rebinding), no foreign Origin (a web page), a JSON body (a form post is a CSRF "simple
        request"), and the bearer token when one is configured."""
        server = self.hub.config.server
        headers = {name.lower(): value for name, value in request.headers}
        host = headers.get(b"host")
        if host is not None and _host_name(host) not in {*LOCAL_HOSTS, *(h.lower() for h in server.http_hosts)}:
            raise Failure(421, Forbidden(f"Host {host.decode('latin-1')!r} is not served here (server.http_hosts)"),
                          "host", close=True)
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").rstrip("/") not in server.http_origins:
            raise Failure(403, Forbidden(f"requests from the web origin {origin.decode('latin-1')!r} are not "
                                         "allowed (server.http_origins)"), "origin", close=True)
        token = self.hub.http_token
        if token is not None:
            scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token):
                raise Failure(401, Forbidden("a valid bearer token is required (Authorization: Bearer ..., "
                                             "server.http_token_file)"), "authorization", close=True)
        if method == "POST":
            media = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
            if media != b"application/json":
                raise Failure(415, BadRequest("the request body must be sent as Content-Type: application/json"),
                              "content-type", close=True)

    async def exchange(self, request: h11.Request) -> None:
        target = request.target.decode("ascii", "replace").partition("?")[0]
        method = request.method.decode("ascii", "replace")
        started = time.monotonic()
        route = self.routes.get(target) or next((r for prefix, r in self.routes.items()
                                                 if prefix.endswith("/") and target.startswith(prefix)), None)
        self.error_body = route.error_body if route else Failure.body
        op: str | None = None  # known once routed
        outcome, status = "ok", 200
        try:
            self.admit(request, method)
            body = await self.receive_body(request)
            if route is None:
                raise invalid(f"no such endpoint: {target}", "url", 404)
            if route.method not in (method, "*"):
                raise invalid(f"{target} takes {route.method}, not {method}", "method", 405)
            op = route.op
            self.hub.handlers.stats.requests[op] += 1
            await route.handle(self, target, body)
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
            self.hub.handlers.stats.outcomes[op, outcome] += 1
        # Chats, summaries and errors at info, as protocol v1 logs its requests; scrapes and probes at debug.
        level = logging.INFO if op in ("chat", "summarize") or status >= 400 else logging.DEBUG
        self.log.log(level, "HTTP %s %s %d %s in %.0f ms", method, target, status, outcome,
                     (time.monotonic() - started) * 1000, extra={**extra, "OUTCOME": outcome})

    def json_body(self, body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise Failure(400, BadJson(f"the request body is not JSON: {exc}")) from None
        if not isinstance(obj, dict):
            raise Failure(400, BadJson("the request body must be a JSON object"))
        return obj

    async def run(self, reply: Reply, job: Callable[[CancelToken, float, Send], Awaitable[None]]) -> None:
        """One chat or summarize job, admitted and cancellable as on protocol v1 (shutdown cancels it too)."""
        admission = self.hub.handlers.scheduler.admit()
        self.reply = reply
        self.hub.cancels.add(reply.cancel)
        watcher = asyncio.create_task(self.watch())
        try:
            await job(reply.cancel, time.monotonic(), reply.send)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            admission.release()
            self.hub.cancels.discard(reply.cancel)

def _host_name(host: bytes) -> str:
    """The name in a Host header, without its port: "localhost:8080" -> "localhost", "[::1]:80" -> "[::1]"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1]
    return text.rpartition(":")[0] if ":" in text else text
