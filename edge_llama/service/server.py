"""The Unix-socket server: binding (mode, stale-socket check), connections, line framing, request dispatch.

A connection carries any number of requests; each chat/summarize runs as its own task and replies in order for
its id. A bad line gets an `error` and the connection stays usable. Closing the connection cancels its requests
(the engine stops within one token). A connection that starts with an HTTP method is handed to service/http.py
instead (one socket, two protocols).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from edge_llama.config import Config
from edge_llama.errors import (
    BadRequest,
    Cancelled,
    EdgeLlamaError,
    Forbidden,
    InternalError,
    SocketInUse,
    Unavailable,
)
from edge_llama.protocol import (
    CancelRequest,
    ChatRequest,
    ForgetRequest,
    InfoRequest,
    RequestError,
    SummarizeRequest,
    done_event,
    encode,
    error_event,
    parse_request,
    too_large_line,
)
from edge_llama.service.access import AccessPolicy, Peer, peer_of
from edge_llama.service.handlers import Handlers
from edge_llama.service.scheduler import CancelToken
from edge_llama.service.summarize import summarize

log = logging.getLogger("edge_llama.server")
READ_CHUNK = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024  # bytes buffered for a slow reader before a stream waits for it
REFUSE_WAIT_S = 2.0  # how long a refused peer may take to send its first request line
SNIFF_BLANK_BYTES = 1024  # blank bytes (protocol v1 skips empty lines) looked past for a request's first byte
SNIFF_DEADLINE_S = 10.0  # from a request's first byte, how long the bytes that tell its protocol may take
HTTP_METHOD = re.compile(rb"[A-Z]{1,16} ")  # an HTTP request starts with its method (GET, POST...) and a space
DRAIN_AFTER_CANCEL_S = 5.0  # shutdown: how long cancelled requests and their connections get to end


def bind_unix_socket(path: Path, mode: int) -> socket.socket:
    """Bind a listening socket at `path`. A live daemon there -> SocketInUse; a stale socket file is replaced;
    any other kind of file is left alone."""
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()  # stale: its daemon died without cleaning up
        except OSError as exc:
            raise SocketInUse(f"{path} exists and cannot be checked: {exc.strerror}") from exc
        else:
            raise SocketInUse(f"another edge-llama daemon is already serving {path}")
        finally:
            probe.close()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Create it with the final mode: no window where the socket is more open than configured.
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENAMETOOLONG or len(str(path)) >= 108:
            raise SocketInUse(f"socket path {path} is too long for a Unix socket (max 107 bytes)") from exc
        raise SocketInUse(f"cannot listen on {path}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


async def sniff(reader: asyncio.StreamReader, timeout: float | None) -> bytes:
    """Read a new connection's first bytes until they tell its protocol (see `protocol_known`). The first byte is
    waited for `timeout` s (None: for ever: an interactive `edge-llama chat` connects long before its first
    request); the rest for at most SNIFF_DEADLINE_S. Returns what was read (all of it, on a timeout or EOF)."""
    loop = asyncio.get_running_loop()
    head = b""
    deadline: float | None = None
    with contextlib.suppress(asyncio.TimeoutError):
        while not protocol_known(head):
            data = await asyncio.wait_for(reader.read(READ_CHUNK),
                                          timeout if deadline is None else max(0.0, deadline - loop.time()))
            if not data:
                break
            head += data
            if deadline is None and head.strip():
                deadline = loop.time() + SNIFF_DEADLINE_S
    return head


def protocol_known(head: bytes) -> bool:
    """Protocol v1 lines start with `{`; HTTP with a method: up to 16 uppercase letters and a space. Known once a
    byte other than an uppercase letter is there (or more letters than a method has)."""
    body = head.lstrip()
    if not body:
        return len(head) > SNIFF_BLANK_BYTES
    letters = len(body) - len(body.lstrip(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    return letters < len(body) or letters > 16


def speaks_http(head: bytes) -> bool:
    return HTTP_METHOD.match(head.lstrip()) is not None


class Replay:
    """A connection's reader with the bytes `sniff` took put back in front (Connection only calls read())."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return await self._reader.read(n)
        cut = len(self._head) if n < 0 else n
        out, self._head = self._head[:cut], self._head[cut:]
        return out


class Connection:
    def __init__(self, server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 peer: Peer | None) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.jobs: dict[str, tuple[asyncio.Task[None], CancelToken]] = {}
        self.closed = False
        fields = {"PEER_UID": peer.uid, "PEER_PID": peer.pid} if peer else {}
        self.log = logging.LoggerAdapter(log, fields)  # every line of this connection names its peer

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.writer.write(encode(event))
            if self.writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await self.writer.drain()
        except (ConnectionError, RuntimeError):
            self.lost()

    def lost(self) -> None:
        """The peer is gone: cancel everything it asked for."""
        if not self.closed:
            self.closed = True
            for _task, cancel in self.jobs.values():
                cancel.cancel(Cancelled("client disconnected"))

    async def serve(self) -> None:
        limit = self.server.config.server.max_line_bytes
        buf = bytearray()
        discarding = False  # inside an oversized line: drop bytes until its newline
        try:
            while not self.closed:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                buf += data
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) >= limit:
                            buf.clear()
                            discarding = True
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if discarding or nl + 1 > limit:
                        discarding = False
                        await self.send(error_event(None, too_large_line(limit)))
                        continue
                    if line.strip():
                        await self.dispatch(line)
        except (ConnectionError, OSError):
            pass
        finally:
            self.lost()
            if self.jobs:
                await asyncio.gather(*(task for task, _ in self.jobs.values()), return_exceptions=True)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def dispatch(self, line: bytes) -> None:
        handlers = self.server.handlers
        try:
            req = parse_request(line, self.server.config.server.max_messages)
        except RequestError as exc:
            handlers.stats.errors[exc.code] += 1
            await self.send(error_event(exc.request_id, exc))
            return
        handlers.stats.requests[req.op] += 1
        if isinstance(req, InfoRequest):
            await self.send(handlers.info(req))
        elif isinstance(req, CancelRequest):
            job = self.jobs.get(req.target)
            if job is not None:
                job[1].cancel(Cancelled(f"cancelled by request {req.id}"))
            await self.send(done_event(req.id, target=req.target, found=job is not None))
        elif req.id in self.jobs:
            await self.reply_error(req.id, BadRequest(f"id {req.id!r} is already in use on this connection"))
        else:
            # Every job that can wait (on the engine, or on a session's running chat for `forget`) takes a place
            # in the bounded work set: a flood of them gets `busy`, never unbounded tasks.
            try:
                admission = self.server.handlers.scheduler.admit()
            except EdgeLlamaError as exc:
                await self.reply_error(req.id, exc)
                return
            cancel = CancelToken()
            task = asyncio.create_task(self.run_job(req, cancel, admission))
            self.jobs[req.id] = (task, cancel)
            self.server.cancels.add(cancel)

    async def run_job(self, req: ChatRequest | SummarizeRequest | ForgetRequest, cancel: CancelToken,
                      admission: Any) -> None:
        received = time.monotonic()
        try:
            if isinstance(req, ChatRequest):
                await self.server.handlers.chat(req, cancel, received, self.send)
            elif isinstance(req, SummarizeRequest):
                await summarize(self.server.handlers, req, cancel, received, self.send)
            else:
                await self.forget(req)
        except EdgeLlamaError as exc:
            self.log.info("%s %s: %s", req.op, req.id, exc.code,
                          extra={"REQUEST_ID": req.id, "OP": req.op, "ERROR_CODE": exc.code})
            await self.reply_error(req.id, exc)
        except Exception as exc:  # a bug: answer it, log it, keep serving
            self.log.exception("request %s failed", req.id, extra={"REQUEST_ID": req.id, "OP": req.op})
            await self.reply_error(req.id, InternalError(f"internal error: {type(exc).__name__}"))
        else:
            t = self.server.handlers.stats.last_timings
            self.log.info("%s %s done in %.0f ms", req.op, req.id, (time.monotonic() - received) * 1000, extra={
                "REQUEST_ID": req.id, "OP": req.op, "QUEUE_MS": t.get("queue_ms"), "TTFT_MS": t.get("ttft_ms"),
                "DECODE_TOK_S": t.get("decode_tok_s")})
        finally:
            admission.release()
            self.jobs.pop(req.id, None)
            self.server.cancels.discard(cancel)

    async def forget(self, req: ForgetRequest) -> None:
        found = await self.server.handlers.sessions.forget(req.session)
        await self.send(done_event(req.id, session=req.session, found=found))

    async def reply_error(self, request_id: str | None, exc: EdgeLlamaError) -> None:
        self.server.handlers.stats.errors[exc.code] += 1
        await self.send(error_event(request_id, exc))


class Server:
    def __init__(self, config: Config, handlers: Handlers) -> None:
        self.config = config
        self.handlers = handlers
        self.cancels: set[CancelToken] = set()  # of every running or waiting request
        self.connections: set[asyncio.Task[None]] = set()
        self.policy: AccessPolicy | None = None  # None: no peer check
        self.socket_file = Path()  # where clients connect (its group is the default client group)
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
            policy = self.policy
            allowed = policy is None or policy.allows(peer)
            with contextlib.suppress(asyncio.CancelledError):  # drain() cancels what outlives shutdown
                # One socket, two protocols: the first request byte tells them apart (see docs/http.md).
                head = await sniff(reader, None if allowed else REFUSE_WAIT_S)
                conn = Connection(self, Replay(head, reader), writer, peer)
                if policy is not None and not allowed:
                    conn.log.warning("refused uid %d gid %d (allowed: %s)", peer.uid, peer.gid, policy.describe())
                if speaks_http(head):
                    from edge_llama.service.http import HttpConnection  # h11 is loaded by the first HTTP client

                    await HttpConnection(self, reader, writer, peer, conn.log).serve(head.lstrip(), allowed)
                elif allowed:
                    await conn.serve()
                else:
                    await self._refuse(conn, peer)
        finally:
            writer.close()  # a connection cancelled before it said anything has no other owner to close it
            self.connections.discard(task)

    async def _refuse(self, conn: Connection, peer: Peer) -> None:
        """Answer a peer outside the allowlist with `forbidden`, then close. Its first request line is read first
        (for at most REFUSE_WAIT_S and server.max_line_bytes): closing a Unix socket with unread input resets the
        connection, and the peer would then see ECONNRESET instead of the reason. The error carries that
        request's id."""
        self.handlers.stats.errors["forbidden"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSE_WAIT_S
        head = bytearray()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            while b"\n" not in head and len(head) < self.config.server.max_line_bytes:
                data = await asyncio.wait_for(conn.reader.read(READ_CHUNK), max(0.0, deadline - loop.time()))
                if not data:
                    break
                head += data
        line, newline, _ = bytes(head).partition(b"\n")
        request_id = None
        if newline:
            try:
                request_id = parse_request(line, self.config.server.max_messages).id
            except RequestError as exc:
                request_id = exc.request_id
        await conn.send(error_event(request_id, Forbidden(
            f"uid {peer.uid} is not allowed to use this daemon (ask for the client group)")))
        conn.writer.close()
        with contextlib.suppress(Exception):
            await conn.writer.wait_closed()

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
