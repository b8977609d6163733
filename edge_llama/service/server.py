"""The server: accepts connections on the daemon's socket, checks who the peer is, hands each connection to its
protocol (service/v1.py or service/http.py), and at shutdown drains and cancels what is left.

Hostile peers are bounded: at most `server.max_connections` connections are served at once (more get one clear
refusal and are closed; a few more beyond that are closed at once); a peer outside the allowlist gets one
`forbidden` answer within REFUSE_WAIT_S in all, from at most REFUSE_KEEP_BYTES kept of what it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sys
import time
from pathlib import Path

from edge_llama.config import Config
from edge_llama.errors import Busy, EdgeLlamaError, Forbidden, Unavailable
from edge_llama.protocol import RequestError, encode, error_event, parse_request
from edge_llama.service.access import AccessPolicy, peer_of
from edge_llama.service.handlers import Handlers
from edge_llama.service.scheduler import CancelToken
from edge_llama.service.transport import READ_CHUNK, Replay, sniff, speaks_http
from edge_llama.service.v1 import Connection

log = logging.getLogger("edge_llama.server")
REFUSE_WAIT_S = 2.0  # a refused peer's whole first request (line or HTTP head) must arrive within this
REFUSE_KEEP_BYTES = 64 * 1024  # of a refused peer's first line, what is kept to find its id (the rest is dropped)
OVER_CAP_SLACK = 16  # connections beyond max_connections that still get a refusal; past that, closed at once
DRAIN_AFTER_CANCEL_S = 5.0  # shutdown: how long cancelled requests and their connections get to end
REQUEST_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,128})"')  # a request's id, read from a line too long to keep


class Server:
    def __init__(self, config: Config, handlers: Handlers) -> None:
        self.config = config
        self.handlers = handlers
        self.cancels: set[CancelToken] = set()  # of every running or waiting request
        self.connections: set[asyncio.Task[None]] = set()
        self.policy: AccessPolicy | None = None  # None: no peer check
        self.socket_file = Path()  # where clients connect (its group is the default client group)
        self.http_token: bytes | None = None  # server.http_token_file's, read by the daemon at start and reload
        self._server: asyncio.AbstractServer | None = None

    async def start(self, sock: socket.socket) -> None:
        # cleanup_socket=False (Python >= 3.13): never unlink the path on close; a socket-activated one belongs
        # to systemd, and our own is removed by the daemon itself.
        extra = {"cleanup_socket": False} if sys.version_info >= (3, 13) else {}
        self._server = await asyncio.start_unix_server(self._on_connect, sock=sock, limit=READ_CHUNK, **extra)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            peer = peer_of(writer.get_extra_info("socket"))
            conn_log = logging.LoggerAdapter(log, {"PEER_UID": peer.uid, "PEER_PID": peer.pid})
            cap = self.config.server.max_connections
            with contextlib.suppress(asyncio.CancelledError):  # drain() cancels what outlives shutdown
                if len(self.connections) > cap + OVER_CAP_SLACK:
                    return  # a flood: no answer costs less than one
                if len(self.connections) > cap:
                    conn_log.warning("refused a connection: %d open (server.max_connections=%d)",
                                     len(self.connections) - 1, cap)
                    await self._refuse(reader, writer, Busy(
                        f"too many connections: {cap} are open (server.max_connections); retry later",
                        retry_after_ms=1000), 503)
                    return
                policy = self.policy
                if policy is not None and not policy.allows(peer):
                    conn_log.warning("refused uid %d gid %d (allowed: %s)", peer.uid, peer.gid, policy.describe())
                    await self._refuse(reader, writer, Forbidden(
                        f"uid {peer.uid} is not allowed to use this daemon (ask for the client group)"), 403)
                    return
                # One socket, two protocols: the first request byte tells them apart (see docs/http.md).
                head = await sniff(reader, None)
                if policy is not None and not speaks_http(head) and head.strip() and policy.http_only(peer):
                    conn_log.warning("refused protocol v1 from uid %d: it relays the network (HTTP only)", peer.uid)
                    await self._refuse(Replay(head, reader), writer, Forbidden(  # type: ignore[arg-type]
                        "this peer relays the network: it may speak HTTP only (server.http_only_groups)"), 403)
                    return
                if speaks_http(head):
                    from edge_llama.service.http import HttpConnection  # h11 is loaded by the first HTTP client
                    from edge_llama.service.routes import ROUTES

                    await HttpConnection(self, reader, writer, peer, conn_log, ROUTES).serve(head.lstrip())
                else:
                    await Connection(self, Replay(head, reader), writer, peer).serve()
        finally:
            writer.close()  # a connection cancelled before it said anything has no other owner to close it
            self.connections.discard(task)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, error: EdgeLlamaError,
                      status: int) -> None:
        """Answer a connection we will not serve with `error` in its own protocol, then close. Its first request
        is read first, within REFUSE_WAIT_S in all: closing a Unix socket with unread input resets it, and the
        peer would then see ECONNRESET instead of the reason. A protocol v1 answer carries that request's id."""
        self.handlers.stats.errors[error.code] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSE_WAIT_S
        head = await sniff(reader, REFUSE_WAIT_S, REFUSE_WAIT_S)
        kept = bytearray(head[:REFUSE_KEEP_BYTES])
        seen, end = len(head), b"\r\n\r\n" if speaks_http(head) else b"\n"
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while end not in kept and seen < self.config.server.max_line_bytes:
                data = await asyncio.wait_for(reader.read(READ_CHUNK), max(0.0, deadline - loop.time()))
                if not data:
                    break
                seen += len(data)
                kept += data[:max(0, REFUSE_KEEP_BYTES - len(kept))]
        with contextlib.suppress(ConnectionError, RuntimeError, OSError, asyncio.TimeoutError):
            if speaks_http(head):
                body = json.dumps({"error": {"message": error.message, "type": "permission_error" if status == 403
                                             else "unavailable_error", "param": None, "code": error.code}}).encode()
                writer.write(f"HTTP/1.1 {status} {'Forbidden' if status == 403 else 'Service Unavailable'}\r\n"
                             f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                             "connection: close\r\n\r\n".encode() + body)
            else:
                writer.write(encode(error_event(_request_id(bytes(kept), self.config.server.max_messages), error)))
            # The rest of what it sends (an HTTP body, say) is read and dropped until it closes, so that our answer
            # is not lost to a reset; within the same deadline, plus a second for the answer to be read.
            writer.write_eof()
            while await asyncio.wait_for(reader.read(READ_CHUNK), max(0.0, deadline + 1.0 - loop.time())):
                pass
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()  # closes the listener only; open connections go on
        self.handlers.scheduler.accepting = False

    def cancel_all(self, error: EdgeLlamaError) -> None:
        for cancel in list(self.cancels):
            cancel.cancel(error)

    async def drain(self, grace_s: float, cancel_now: asyncio.Event) -> None:
        """Let admitted requests finish within `grace_s` (or until `cancel_now` is set), then cancel what is left:
        a running one ends with finish_reason "cancelled", a still-waiting one gets `unavailable`."""
        sched = self.handlers.scheduler
        started = time.monotonic()
        while sched.admitted and time.monotonic() < started + grace_s and not cancel_now.is_set():
            await asyncio.sleep(0.02)
        if sched.admitted:
            log.warning("shutdown: cancelling %d request(s) still running after %.1f s%s", sched.admitted,
                        time.monotonic() - started, " (second signal)" if cancel_now.is_set() else "")
            self.cancel_all(Unavailable("the daemon is shutting down"))
        # Cancelled requests end within a token; an engine that is lost never ends its call. Bounded either way.
        deadline = time.monotonic() + DRAIN_AFTER_CANCEL_S
        while sched.admitted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if sched.admitted:
            log.error("shutdown: %d request(s) did not end within %.0f s of being cancelled; closing their "
                      "connections", sched.admitted, DRAIN_AFTER_CANCEL_S)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=DRAIN_AFTER_CANCEL_S)


def _request_id(kept: bytes, max_messages: int) -> str | None:
    """The id of a refused peer's first request: parsed when its whole line was kept, else found by pattern."""
    line, newline, _ = kept.partition(b"\n")
    if newline:
        try:
            return parse_request(line, max_messages).id
        except RequestError as exc:
            return exc.request_id
    match = REQUEST_ID.search(kept)
    return match.group(1).decode("utf-8", "replace") if match else None

