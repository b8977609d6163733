"""Protocol v1 connections: line framing, request dispatch, one task per chat/summarize/forget.

A connection carries any number of requests; each chat/summarize runs as its own task and replies in order for
its id. A bad line gets an `error` and the connection stays usable. Closing the connection cancels its requests
(the engine stops within one token), and so does a client that stops reading for server.write_timeout_s.
docs/protocol.md is the contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from edge_llama.errors import BadRequest, Cancelled, EdgeLlamaError, InternalError, NotFound
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
from edge_llama.service.access import Peer
from edge_llama.service.scheduler import Admission, CancelToken
from edge_llama.service.summarize import summarize
from edge_llama.service.transport import READ_CHUNK, ClientStalled, Hub, send_bounded

log = logging.getLogger("edge_llama.server")


class Connection:
    def __init__(self, hub: Hub, reader: Any, writer: asyncio.StreamWriter, peer: Peer) -> None:
        self.hub = hub
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.jobs: dict[str, tuple[asyncio.Task[None], CancelToken]] = {}
        self.closed = False
        self.log = logging.LoggerAdapter(log, {"PEER_UID": peer.uid, "PEER_PID": peer.pid})  # every line names it

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await send_bounded(self.writer, encode(event), self.hub.config.server.write_timeout_s)
        except ClientStalled as exc:
            self.log.warning("%s: dropping the connection and cancelling its requests", exc)
            self.lost(Cancelled(str(exc)))
        except (ConnectionError, RuntimeError):
            self.lost()

    def lost(self, why: Cancelled | None = None) -> None:
        """The peer is gone (or stopped reading): cancel everything it asked for."""
        if not self.closed:
            self.closed = True
            for _task, cancel in self.jobs.values():
                cancel.cancel(why or Cancelled("client disconnected"))

    async def serve(self) -> None:
        limit = self.hub.config.server.max_line_bytes
        buf = bytearray()
        discarding = False  # inside an oversized line: drop bytes until its newline
        try:
            while not self.closed:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                buf += data
                while not self.closed:
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
        handlers = self.hub.handlers
        try:
            req = parse_request(line, self.hub.config.server.max_messages)
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
                admission = handlers.scheduler.admit()
            except EdgeLlamaError as exc:
                await self.reply_error(req.id, exc)
                return
            cancel = CancelToken()
            task = asyncio.create_task(self.run_job(req, cancel, admission))
            self.jobs[req.id] = (task, cancel)
            self.hub.cancels.add(cancel)

    async def run_job(self, req: ChatRequest | SummarizeRequest | ForgetRequest, cancel: CancelToken,
                      admission: Admission) -> None:
        received = time.monotonic()
        handlers = self.hub.handlers
        try:
            if isinstance(req, ChatRequest):
                await handlers.chat(req, cancel, received, self.send, owner=self.peer.uid)
            elif isinstance(req, SummarizeRequest):
                await summarize(handlers, req, cancel, received, self.send)
            else:
                if not await handlers.sessions.forget(self.peer.uid, req.session):
                    raise NotFound(f"you have no session '{req.session}'")
                await self.send(done_event(req.id, session=req.session, found=True))
        except EdgeLlamaError as exc:
            self.log.info("%s %s: %s", req.op, req.id, exc.code,
                          extra={"REQUEST_ID": req.id, "OP": req.op, "ERROR_CODE": exc.code})
            await self.reply_error(req.id, exc)
        except Exception as exc:  # a bug: answer it, log it, keep serving
            self.log.exception("request %s failed", req.id, extra={"REQUEST_ID": req.id, "OP": req.op})
            await self.reply_error(req.id, InternalError(f"internal error: {type(exc).__name__}"))
        else:
            t = handlers.stats.last_timings
            self.log.info("%s %s done in %.0f ms", req.op, req.id, (time.monotonic() - received) * 1000, extra={
                "REQUEST_ID": req.id, "OP": req.op, "QUEUE_MS": t.get("queue_ms"), "TTFT_MS": t.get("ttft_ms"),
                "DECODE_TOK_S": t.get("decode_tok_s")})
        finally:
            admission.release()
            self.jobs.pop(req.id, None)
            self.hub.cancels.discard(cancel)

    async def reply_error(self, request_id: str | None, exc: EdgeLlamaError) -> None:
        self.hub.handlers.stats.errors[exc.code] += 1
        await self.send(error_event(request_id, exc))
