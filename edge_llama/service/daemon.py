"""The daemon's lifecycle: startup -> main loop -> shutdown.

startup: check the state directory and the socket path (fail fast, before the slow model load), load the engine
on its thread, warm it up, then bind and accept. Main loop: serve until a signal handler sets the exit flag.
shutdown: stop accepting, let admitted requests finish within server.shutdown_grace_s, cancel the rest (each
still ends with one `done` or `error` line), remove the socket we created, free the engine. Exit status 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time

from edge_llama.config import Config, socket_path, state_dir
from edge_llama.engine import GenParams, create_engine
from edge_llama.errors import EdgeLlamaError, InternalError, SocketInUse
from edge_llama.prompting.template import template_for
from edge_llama.protocol import Message
from edge_llama.service.handlers import Handlers
from edge_llama.service.scheduler import Scheduler
from edge_llama.service.server import Server, bind_unix_socket
from edge_llama.service.sessions import SessionStore

log = logging.getLogger("edge_llama.daemon")


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.socket_path = socket_path(config)
        self.should_exit = asyncio.Event()
        self._signals = 0
        self._grace_s = config.server.shutdown_grace_s

    def _on_signal(self, signum: int) -> None:
        """Signal handlers only set flags; a second signal skips the grace period."""
        self._signals += 1
        log.info("received %s%s", signal.Signals(signum).name, " again: cancelling now" if self._signals > 1 else "")
        self.should_exit.set()
        if self._signals > 1:
            self._grace_s = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        sessions = SessionStore(state_dir(self.config), self.config.server.max_session_messages)
        try:
            sessions.prepare()
        except OSError as exc:
            raise EdgeLlamaError(f"cannot create state directory {sessions.root}: {exc.strerror}") from exc
        self._check_socket_free()

        engine = create_engine(self.config.engine)
        scheduler = Scheduler(engine, self.config.server.max_queue, self.config.server.stream_interval_ms)
        started = time.monotonic()
        try:
            await scheduler.call(engine.load)
            template = template_for(self.config.engine.chat_template, engine.template_info)
            handlers = Handlers(self.config, scheduler, template, sessions)
            if self.config.server.warmup:
                await scheduler.call(self._warm_up, engine, template)
            log.info("model %s loaded in %.2f s (backend %s, KV budget %d tokens, template %s)", engine.model_name,
                     time.monotonic() - started, engine.name, engine.capacity.kv_tokens, template.name)
            if self.should_exit.is_set():
                return
            sock = bind_unix_socket(self.socket_path, self.config.server.socket_mode)
            server = Server(self.config, handlers)
            try:
                await server.start(sock)
                handlers.state = "ready"
                log.info("serving on %s", self.socket_path)
                await self.should_exit.wait()
                handlers.state = "stopping"
                log.info("shutting down: no new requests; %d admitted", scheduler.admitted)
                server.stop_accepting()
                await server.drain(self._grace_s)
            finally:
                sock.close()
                self.socket_path.unlink(missing_ok=True)
        finally:
            scheduler.close()
            engine.close()
        log.info("stopped")

    def _check_socket_free(self) -> None:
        """Refuse early when another daemon serves our socket (binding happens only after the model loads)."""
        path = self.socket_path
        if not path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            return  # stale or not a socket: bind_unix_socket decides
        finally:
            probe.close()
        raise SocketInUse(f"another edge-llama daemon is already serving {path}")

    @staticmethod
    def _warm_up(engine, template) -> None:  # type: ignore[no-untyped-def]
        """One tiny generation: proves the model runs before we accept requests and pages the weights in."""
        ids = engine.tokenize(template.render([Message("user", "Hi")]))
        chunks = list(engine.generate(ids, GenParams(max_tokens=2, temperature=0.0), threading.Event()))
        if not chunks or chunks[-1].finish is None:
            raise InternalError("warm-up generation did not finish")


def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT. Raises EdgeLlamaError for start-up failures."""
    asyncio.run(Daemon(config).run())
    return 0
