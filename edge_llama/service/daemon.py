"""The daemon's lifecycle: startup -> main loop -> shutdown.

startup: check the state directory and the socket (fail fast, before the slow model load), load the engine on
its thread while telling systemd we are still loading (EXTEND_TIMEOUT_USEC), warm it up, accept, READY=1.
Main loop: signal handlers only set flags; SIGHUP re-reads the config (RELOADING=1 ... READY=1), SIGTERM/SIGINT
end the loop. The watchdog is pinged from the event loop only while the engine makes progress.
shutdown: STOPPING=1, stop accepting, let admitted requests finish within server.shutdown_grace_s, cancel the
rest (each still ends with one `done` or `error` line), remove the socket we created (never an activated one),
free the engine. Exit status 0; 1 when the engine went out of service without a systemd watchdog to decide, or
a background task (watchdog, session sweep, loop monitor) died.
Blocking work never runs on the event loop: engine hashing and loading, the safety policy's models, session
files, long tokenizations and checks all go to threads (stats `loop.max_stall_ms` shows the worst wake-up delay).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from edge_llama.config import (
    Config,
    check_private_dir,
    live_update,
    load_config,
    per_user_socket_path,
    socket_path,
    state_dir,
    with_overrides,
)
from edge_llama.engine import Engine, GenParams, create_engine
from edge_llama.errors import EdgeLlamaError, InternalError, SocketInUse
from edge_llama.prompting.template import ChatTemplate, template_for
from edge_llama.protocol import Message
from edge_llama.safety.hooks import SafetyPolicy
from edge_llama.service.access import load_token, policy_for
from edge_llama.service.handlers import Handlers
from edge_llama.service.scheduler import Scheduler
from edge_llama.service.server import Server
from edge_llama.service.sessions import SessionStore
from edge_llama.service.systemd import Notifier, activated_socket, watchdog_interval_s
from edge_llama.service.transport import bind_unix_socket

log = logging.getLogger("edge_llama.daemon")
LOAD_KEEPALIVE_S = 5.0  # how often a long model load tells systemd it is still starting
LOAD_EXTEND_S = 30.0  # ... and by how much it extends the start timeout each time
SESSION_SWEEP_S = 3600.0  # how often idle sessions are looked for
FAULT_CHECK_S = 1.0  # without a systemd watchdog, how often a faulted engine is looked for
LOOP_PROBE_S = 0.01  # the loop monitor's sleep: a stall shows as a late wake-up
T = TypeVar("T")


class Daemon:
    def __init__(self, config: Config, config_file: str | None = None,
                 overrides: dict[str, object] | None = None) -> None:
        self.config = config
        self.config_file = config_file  # re-read on SIGHUP, with the same command-line overrides on top
        self.overrides = overrides or {}
        self.notifier = Notifier()
        self._wake = asyncio.Event()
        self._exit = False
        self._reload = False
        self._signals = 0
        self._cancel_now = asyncio.Event()  # a second exit signal: do not wait for running answers
        self.status = 0  # exit status: 1 when the engine or a background task failed
        self.engine_lost = False  # the engine thread never came back (see serve())
        self._closing: set[asyncio.Task[None]] = set()  # replaced safety policies waiting for their last user

    # --- signals: only set flags ---------------------------------------------------------------------------
    def _on_exit_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            self._cancel_now.set()
        self._exit = True
        self._wake.set()

    def _on_reload_signal(self) -> None:
        self._reload = True
        self._wake.set()

    # --- lifecycle -------------------------------------------------------------------------------------------
    async def run(self) -> int:
        """Serve until an exit signal; returns the exit status (1 when the engine or a background task failed)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_exit_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        activated = activated_socket()
        path = Path(activated.getsockname()) if activated is not None else socket_path(self.config)
        if activated is None and path == per_user_socket_path():
            check_private_dir(path.parent, create=True)
        sessions = SessionStore(state_dir(self.config), self.config.server.max_session_messages)
        try:
            sessions.prepare()
        except OSError as exc:
            raise EdgeLlamaError(f"cannot create state directory {sessions.root}: {exc.strerror}") from exc
        if activated is None:
            _check_socket_free(path)
        await asyncio.to_thread(self._sweep_sessions, sessions)  # after the check: a refused daemon touches nothing

        engine, scheduler, template = await self._load()
        try:
            if self._exit:
                return self.status
            safety = await asyncio.to_thread(SafetyPolicy.from_config, self.config.safety)
            log.info("safety: %s", ", ".join(h.name for h in safety.hooks) if safety.active else "off")
            handlers = Handlers(self.config, scheduler, template, sessions, safety)
            server = Server(self.config, handlers)
            server.http_token = await asyncio.to_thread(load_token, self.config.server.http_token_file)
            sock = activated or bind_unix_socket(path, self.config.server.socket_mode)
            server.socket_file = path
            server.policy = policy_for(self.config.server, path)  # (the socket file's group: it exists now)
            background = [self._supervise(self._watchdog(scheduler), "watchdog"),
                          self._supervise(self._expire_sessions(sessions), "session sweep"),
                          self._supervise(self._measure_loop(handlers), "loop monitor")]
            try:
                await server.start(sock)
                handlers.state = "ready"
                log.info("serving on %s%s (access: %s)", path, " (socket-activated)" if activated else "",
                         server.policy.describe())
                self.notifier.ready(self._status(handlers))
                await self._main_loop(server, handlers)
                handlers.state = "stopping"
                background[0].cancel()  # the watchdog: systemd enforces TimeoutStopSec from here on
                self.notifier.stopping()
                log.info("shutting down: no new requests; %d admitted", scheduler.admitted)
                server.stop_accepting()
                await server.drain(self.config.server.shutdown_grace_s, self._cancel_now)
            finally:
                for task in background:
                    task.cancel()
                sock.close()
                if activated is None:
                    path.unlink(missing_ok=True)
        finally:
            self.engine_lost = scheduler.lost is not None
            scheduler.close()
            if not self.engine_lost:  # a lost engine thread may be inside the backend: leave it alone
                engine.close()
            self.notifier.close()
        log.info("stopped%s", f" (exit status {self.status})" if self.status else "")
        return self.status

    async def _load(self) -> tuple[Engine, Scheduler, ChatTemplate]:
        """Open the engine (its manifest's file hashes: seconds for a GB engine), load it and warm it up, all on
        threads, while telling systemd the start is still going on."""
        started = time.monotonic()
        backend = self.config.engine.backend
        self.notifier.status(f"loading model ({backend} backend)")
        engine = await self._keep_starting(asyncio.to_thread(create_engine, self.config.engine))
        server = self.config.server
        scheduler = Scheduler(engine, server.max_queue, server.stream_interval_ms, server.engine_stall_s)
        try:
            await self._keep_starting(scheduler.call(engine.load))
            template = template_for(self.config.engine.chat_template, engine.template_info)
            if server.warmup:
                self.notifier.status("warming up")
                await self._keep_starting(scheduler.call(_warm_up, engine, template))
        except BaseException:
            scheduler.close()
            engine.close()
            raise
        log.info("model %s loaded in %.2f s (backend %s, KV budget %d tokens, template %s)", engine.model_name,
                 time.monotonic() - started, engine.name, engine.capacity.kv_tokens, template.name)
        return engine, scheduler, template

    async def _keep_starting(self, work: Awaitable[T]) -> T:
        """Await `work` while extending systemd's start timeout (a TensorRT engine on a Jetson can take minutes)."""
        future = asyncio.ensure_future(work)
        while not future.done():
            self.notifier.extend_timeout(LOAD_EXTEND_S)
            self.notifier.watchdog()
            await asyncio.wait({future}, timeout=LOAD_KEEPALIVE_S)
        return future.result()

    def _supervise(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a background task that must live as long as the daemon. If it dies, the daemon logs why and exits
        with status 1, so systemd restarts it: a dead watchdog task would otherwise stop the pings silently."""
        task = asyncio.create_task(work, name=name)

        def ended(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            error = task.exception()
            if error is None and self._exit:
                return  # it ended the daemon on purpose (the watchdog on a faulted engine)
            log.critical("background task '%s' ended%s: exiting so that the service restarts", name,
                         f" with {type(error).__name__}: {error}" if error else "", exc_info=error)
            self._fail()

        task.add_done_callback(ended)
        return task

    def _fail(self) -> None:
        self.status = 1
        self._exit = True
        self._wake.set()

    async def _main_loop(self, server: Server, handlers: Handlers) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._exit:
                return
            if self._reload:
                self._reload = False
                await self._apply_reload(server, handlers)

    async def _apply_reload(self, server: Server, handlers: Handlers) -> None:
        """Apply the config file again. Any failure (an unreadable or invalid file, a token file, a safety hook
        whose constructor raises anything, a Llama Guard model that fails to load) refuses the reload and keeps
        the running configuration whole."""
        self.notifier.reloading()
        try:
            new = with_overrides(await asyncio.to_thread(load_config, self.config_file), self.overrides)
            new, ignored = live_update(self.config, new)
            policy = policy_for(new.server, server.socket_file)
            token = await asyncio.to_thread(load_token, new.server.http_token_file)
            safety = handlers.safety
            if new.safety != self.config.safety:  # a hook may load a model (Llama Guard): off the event loop
                safety = await asyncio.to_thread(SafetyPolicy.from_config, new.safety)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the daemon keeps serving as it was
            why = exc.message if isinstance(exc, EdgeLlamaError) else f"{type(exc).__name__}: {exc}"
            log.error("reload refused, keeping the running configuration: %s", why,
                      exc_info=not isinstance(exc, EdgeLlamaError))
            self.notifier.ready(f"reload failed: {why}; {self._status(handlers)}")
            return
        server.policy = policy
        server.http_token = token
        old_safety, handlers.safety = handlers.safety, safety
        self._install(new, server, handlers)
        if old_safety is not safety:
            # Checks and streams still using the old policy keep it until they end; then its hooks are freed.
            self._closing.add(asyncio.create_task(asyncio.to_thread(old_safety.close_when_idle)))
            self._closing = {t for t in self._closing if not t.done()}
        if ignored:
            log.warning("reload: %s changed but only take effect after a restart", ", ".join(ignored))
        log.info("configuration reloaded")
        self.notifier.ready(self._status(handlers))

    def _install(self, config: Config, server: Server, handlers: Handlers) -> None:
        self.config = config
        server.config = config
        handlers.config = config
        handlers.scheduler.max_queue = config.server.max_queue
        handlers.scheduler.stream_interval_s = config.server.stream_interval_ms / 1000
        handlers.scheduler.stall_s = config.server.engine_stall_s
        handlers.sessions.max_messages = config.server.max_session_messages
        logging.getLogger().setLevel(config.log_level.upper())

    async def _expire_sessions(self, sessions: SessionStore) -> None:
        """Sweep idle sessions every hour (or every half TTL when that is shorter). Reads the config each time,
        so a reload applies."""
        while True:
            ttl_s = self.config.server.session_ttl_hours * 3600
            await asyncio.sleep(min(SESSION_SWEEP_S, ttl_s / 2) if ttl_s > 0 else SESSION_SWEEP_S)
            await asyncio.to_thread(self._sweep_sessions, sessions)

    def _sweep_sessions(self, sessions: SessionStore) -> None:
        """Delete sessions idle longer than server.session_ttl_hours (0: never)."""
        ttl_h = self.config.server.session_ttl_hours
        if ttl_h <= 0:
            return
        try:
            if deleted := sessions.expire(ttl_h * 3600):
                log.info("deleted %d session(s) idle for more than %g h", deleted, ttl_h)
        except OSError as exc:
            log.warning("session expiry failed: %s", exc)

    def _status(self, handlers: Handlers) -> str:
        cap = handlers.engine.capacity
        return (f"ready: {handlers.engine.model_name} ({handlers.engine.name}), KV budget {cap.kv_tokens} tokens, "
                f"serving {handlers.scheduler.admitted} requests")

    async def _watchdog(self, scheduler: Scheduler) -> None:
        """Pings systemd's watchdog while the engine makes progress and is not faulted. Without a watchdog, a
        faulted engine ends the daemon with status 1 instead (a supervisor's Restart= then brings it back)."""
        interval = watchdog_interval_s()
        stalled_logged = False
        while True:
            await asyncio.sleep(interval / 2 if interval else FAULT_CHECK_S)
            stall = scheduler.stalled_for()
            fault = scheduler.fault()
            if stall > self.config.server.engine_stall_s or fault:
                if interval is None and fault:
                    log.critical("engine out of service (%s): exiting with status 1", fault)
                    self._fail()
                    return
                if not stalled_logged:
                    log.error("%s: withholding watchdog pings", fault or f"engine made no progress for {stall:.0f} s")
                    stalled_logged = True
                continue
            stalled_logged = False
            if interval:
                self.notifier.watchdog()

    async def _measure_loop(self, handlers: Handlers) -> None:
        """How late the event loop wakes up: the worst delay is what every client waited on top of its own work
        (stats `loop.max_stall_ms`). Blocking work belongs in threads; this shows where it did not go."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_PROBE_S)
            late_ms = (loop.time() - before - LOOP_PROBE_S) * 1000
            handlers.stats.loop_max_stall_ms = max(handlers.stats.loop_max_stall_ms, late_ms)


def _check_socket_free(path: Path) -> None:
    """Refuse early when another daemon serves our socket (binding happens only after the model loads)."""
    if not path.exists():
        return
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return  # stale or not a socket: bind_unix_socket decides
    raise SocketInUse(f"another edge-llama daemon is already serving {path}")


def _warm_up(engine, template) -> None:  # type: ignore[no-untyped-def]
    """One tiny generation: proves the model runs before we accept requests and pages the weights in."""
    ids = template.tokenize([Message("user", "Hi")], engine.tokenize)
    chunks = list(engine.generate(ids, GenParams(max_tokens=2, temperature=0.0), threading.Event()))
    if not chunks or chunks[-1].finish is None:
        raise InternalError("warm-up generation did not finish")


def serve(config: Config, config_file: str | None = None, overrides: dict[str, object] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status. Raises EdgeLlamaError for start-up failures."""
    daemon = Daemon(config, config_file, overrides)
    status = asyncio.run(daemon.run())
    if daemon.engine_lost:
        # The engine thread is stuck inside the backend and would block the interpreter's exit (it joins worker
        # threads): leave now, with everything logged and flushed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 1)
    return status
