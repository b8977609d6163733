"""Admission control and first-come access to the one engine, and the thread bridge that streams from it.

- `admit()` is called as a request arrives: beyond one running job and `max_queue` waiting ones it raises `busy`
  at once with a retry estimate, so a client never hangs on an overloaded device.
- `turn()` waits, first come first served, until the engine is free. A summarization job takes one turn per
  engine call, so chats interleave with a long summary instead of waiting for all of it.
- `generate()` runs the engine's blocking generator on the single engine thread and hands its chunks to the
  event loop: the first two tokens at once, then at most one wake-up per server.stream_interval_ms.
- No engine behaviour hangs a request: a generator that raises or ends without its finish chunk ends the request
  with `internal`; one that produces nothing for `stall_s` (server.engine_stall_s) loses the engine thread. The
  scheduler is then faulted: that request and every later one get `unavailable`, `health` says why, and the
  daemon stops pinging the systemd watchdog (or exits non-zero without one) so the service restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from edge_llama.engine.base import Chunk, Engine, GenParams
from edge_llama.errors import Busy, Cancelled, EdgeLlamaError, InternalError, Unavailable

T = TypeVar("T")
STALL_CHECK_S = 1.0  # while a generation waits for its next chunk, how often the engine's liveness is looked at
RETRY_FLOOR_MS = 100  # the shortest retry hint given to a `busy` client


@dataclass
class Outcome:
    """One finished engine call, with its timings (ms, tokens per second) measured on the event loop."""

    text: str
    finish: str
    completion_tokens: int
    ttft_ms: float  # engine start -> first token
    decode_tok_s: float  # tokens after the first / time from first to last token


class _Bridge:
    """Hands chunks from the engine thread to the event loop, waking the loop at most once per `interval_s`
    (the first two tokens, the end and errors at once). On a small device every loop wake-up, JSON line and socket
    write competes with the engine's own threads for the same cores; 50 updates a second read as smooth."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval_s: float) -> None:
        self._loop = loop
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._pending: list[Chunk | BaseException] = []
        self._wake_pending = False
        self._last_wake = 0.0
        self._ready = asyncio.Event()

    def put(self, item: Chunk | BaseException, urgent: bool) -> None:
        """Engine thread."""
        with self._lock:
            self._pending.append(item)
            now = time.monotonic()
            if self._wake_pending or (not urgent and now - self._last_wake < self._interval_s):
                return
            self._wake_pending = True
            self._last_wake = now
        self._loop.call_soon_threadsafe(self._ready.set)

    async def take(self) -> list[Chunk | BaseException]:
        """Event loop: everything handed over since the last take (possibly nothing after a stale wake-up)."""
        await self._ready.wait()
        with self._lock:
            items, self._pending = self._pending, []
            self._wake_pending = False
            self._ready.clear()
        return items


class CancelToken:
    """Cancellation of one request: a threading.Event for the engine thread, an asyncio.Event for waits.

    `cancel()` is called on the event loop only; the first call's error is what a still-waiting request
    answers (a running one ends with finish_reason "cancelled").
    """

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._event = asyncio.Event()
        self.error: EdgeLlamaError = Cancelled("cancelled")

    def cancel(self, error: EdgeLlamaError) -> None:
        if not self.flag.is_set():
            self.error = error
            self.flag.set()
            self._event.set()

    def is_set(self) -> bool:
        return self.flag.is_set()

    async def wait(self) -> None:
        await self._event.wait()


class Admission:
    """A place in the daemon's bounded work set; released exactly once when the request ends."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._scheduler._finished()


class Scheduler:
    def __init__(self, engine: Engine, max_queue: int, stream_interval_ms: float = 0.0, stall_s: float = 60.0
                 ) -> None:
        self.engine = engine
        self.stream_interval_s = stream_interval_ms / 1000
        self.stall_s = stall_s
        self.lost: str | None = None  # why the engine thread is lost (stuck in a call that will not return)
        self.max_queue = max_queue
        self.accepting = True
        self.admitted = 0  # requests admitted and not finished (running or waiting)
        self.running = 0  # engine turns in progress (0 or 1)
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # How often a place frees up while every place is taken (an exponential moving average, s): the wait a
        # refused client is told (retry_after_ms). Whole request times would overstate it by the queue's length.
        self._free_every_s = 0.5
        self._last_release = time.monotonic()
        self._engine_calls = 0  # engine calls in progress on the engine thread (0 or 1)
        self._progress_at = time.monotonic()  # last sign of life from the engine thread

    # --- admission -----------------------------------------------------------------------------------------
    def admit(self) -> Admission:
        if not self.accepting:
            raise Unavailable("the daemon is shutting down")
        if self.admitted >= self.max_queue + 1:
            raise Busy(
                f"{self.admitted} requests are running or queued (limit {self.max_queue + 1}); retry later",
                retry_after_ms=max(RETRY_FLOOR_MS, int(1000 * self._free_every_s)),
            )
        self.admitted += 1
        return Admission(self)

    def _finished(self) -> None:
        now = time.monotonic()
        if self.admitted >= self.max_queue + 1:  # it was full: this is how long a refused client had to wait
            self._free_every_s = 0.8 * self._free_every_s + 0.2 * (now - self._last_release)
        self._last_release = now
        self.admitted -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- engine turns ------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def turn(self, cancel: CancelToken) -> AsyncIterator[None]:
        """Hold the engine for the body. Raises the token's error if it is cancelled while waiting."""
        if self.running or self._waiters:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            cancelled = asyncio.ensure_future(cancel.wait())
            try:
                await asyncio.wait({waiter, cancelled}, return_when=asyncio.FIRST_COMPLETED)
                if cancel.is_set():
                    raise cancel.error
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._hand_over()  # given the turn as it was cancelled: pass it on
                else:
                    self._waiters.remove(waiter)
                    waiter.cancel()
                raise
            finally:
                cancelled.cancel()
        else:
            self.running = 1
        try:
            yield
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # `running` stays 1: the turn passes straight to the next waiter
                return
        self.running = 0

    def stalled_for(self) -> float:
        """Seconds the engine has been inside a call without producing anything (0 when idle). Prompt evaluation
        counts as progress (the backend stamps engine.progress_at per batch): a long prompt is not a stall."""
        if not self._engine_calls:
            return 0.0
        return time.monotonic() - max(self._progress_at, self.engine.progress_at)

    def fault(self) -> str | None:
        """Why the engine cannot serve any more (its thread is lost, or the backend says so), else None."""
        return self.lost or self.engine.fault()

    def _check_usable(self) -> None:
        fault = self.fault()
        if fault:
            raise Unavailable(f"the engine is out of service: {fault}")

    def _tracked(self, fn: Callable[..., T], *args: Any) -> T:
        """Engine thread: run `fn`, recording that the engine is busy and when it last made progress."""
        self._engine_calls += 1
        self._progress_at = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._engine_calls -= 1
            self._progress_at = time.monotonic()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking engine call (load, warm-up, tokenizing a long text) on the engine thread."""
        self._check_usable()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._tracked, fn, *args)

    async def generate(
        self,
        prompt_ids: Sequence[int],
        params: GenParams,
        cancel: CancelToken,
        on_token: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Run one generation (inside a `turn()`); `on_token(text, tokens)` gets the text made since its last
        call and how many tokens it is."""
        loop = asyncio.get_running_loop()
        bridge = _Bridge(loop, self.stream_interval_s)
        clock = {"start": time.monotonic(), "first": 0.0, "last": 0.0}  # written by the engine thread

        def produce() -> None:
            tokens = 0
            finished = False
            try:
                for chunk in self.engine.generate(prompt_ids, params, cancel.flag):
                    self._progress_at = time.monotonic()
                    if chunk.finish is None:
                        clock["last"] = time.monotonic()
                        tokens += 1
                        if tokens == 1:
                            clock["first"] = clock["last"]
                    finished = chunk.finish is not None
                    # The second token too: the safety guard holds the first word until the next token shows it
                    # complete, so with the guard on the first text goes out with the second token (~10 ms later).
                    urgent = tokens <= 2 or finished
                    bridge.put(chunk, urgent=urgent)
                    if urgent:
                        # Hand this core to the event loop the put just woke: otherwise the first token waits
                        # (3-8 ms measured on 2 cores) while llama.cpp's threads already decode the next one.
                        os.sched_yield()
                if not finished:  # a backend bug: without this the request would wait forever
                    raise InternalError(f"the {self.engine.name} engine's stream ended without a finish reason")
            except BaseException as exc:  # handed to the loop, raised there
                bridge.put(exc, urgent=True)

        self._check_usable()
        pieces: list[str] = []
        tokens = 0
        finish: str | None = None
        future = loop.run_in_executor(self._executor, self._tracked, produce)
        try:
            while finish is None:
                try:
                    batch = await asyncio.wait_for(bridge.take(), timeout=min(self.stall_s, STALL_CHECK_S))
                except asyncio.TimeoutError:
                    if self.stalled_for() <= self.stall_s:
                        continue  # evaluating a long prompt, or slow tokens: alive
                    self.lost = f"a generation made no progress for {self.stall_s:g} s (server.engine_stall_s)"
                    raise Unavailable(f"the engine is out of service: {self.lost}") from None
                text = []
                before = tokens
                for item in batch:
                    if isinstance(item, BaseException):
                        if isinstance(item, EdgeLlamaError):
                            raise item
                        raise InternalError(f"engine failed: {type(item).__name__}: {item}") from item
                    tokens += item.finish is None
                    text.append(item.text)
                    finish = item.finish
                piece = "".join(text)
                if piece:
                    pieces.append(piece)
                    if on_token is not None:
                        await on_token(piece, tokens - before)
        finally:
            if finish is None:  # the consumer failed or was cancelled: stop the engine within one token
                cancel.cancel(Cancelled("generation abandoned"))
            # The engine thread must be idle before the turn passes on; shield so a second cancel cannot
            # abandon the wait. A lost engine thread is not waited for: the next turn is refused anyway.
            if self.lost is None:
                with contextlib.suppress(BaseException):
                    await asyncio.shield(future)
        first, last = clock["first"], clock["last"]
        ttft_ms = (first - clock["start"]) * 1000 if tokens else 0.0
        decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
        return Outcome("".join(pieces), finish, tokens, round(ttft_ms, 2), round(decode, 2))

    def close(self) -> None:
        # A lost engine thread never returns: joining it would hang the shutdown (serve() then exits at once).
        self._executor.shutdown(wait=self.lost is None, cancel_futures=True)
