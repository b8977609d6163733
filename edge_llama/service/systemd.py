"""systemd glue: readiness and status notifications, the watchdog, socket activation, journald logging.

Uses systemd-python (`systemd.daemon`, `systemd.journal`) where it is installed and falls back to the plain
protocols otherwise (a datagram to $NOTIFY_SOCKET, the LISTEN_* variables, stderr), so the daemon behaves the
same on a laptop without systemd, under `systemd-socket-activate`, and as a service on a Jetson.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

from edge_llama.errors import ConfigError

log = logging.getLogger("edge_llama.systemd")
SD_LISTEN_FDS_START = 3
LOG_FIELDS = ("REQUEST_ID", "OP", "PEER_UID", "PEER_PID", "FINISH", "QUEUE_MS", "TTFT_MS", "DECODE_TOK_S",
              "PROMPT_TOKENS", "COMPLETION_TOKENS", "ERROR_CODE", "SAFETY_KIND", "SAFETY_ACTION", "SAFETY_CATEGORIES",
              "SAFETY_HOOKS", "SAFETY_HOOK", "SAFETY_TEXT")


class Notifier:
    """sd_notify(3): a no-op when the daemon was not started by systemd (no $NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self.address = os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self._sd_notify = None
        if not self.address:
            return
        try:
            from systemd.daemon import notify as sd_notify  # systemd-python, where installed

            self._sd_notify = sd_notify
        except ImportError:
            self._target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        message = "\n".join(lines)
        if self._sd_notify is not None:
            self._sd_notify(message)
        elif self._sock is not None:
            try:
                self._sock.sendto(message.encode(), self._target)
            except OSError as exc:  # systemd gone or the socket full: never fatal for the service itself
                log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                    "STATUS=reloading configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def watchdog_interval_s() -> float | None:
    """The watchdog period systemd expects pings within (WatchdogSec=), or None when not enabled for us."""
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


def activated_socket() -> socket.socket | None:
    """The listening socket systemd (or systemd-socket-activate) passed us, if any.

    Takes the fd named "api" (FileDescriptorName=) or the only one. Refuses what edge-llama must not serve on:
    a non-Unix or non-stream socket, and abstract-namespace sockets (no file permissions guard them).
    """
    pid, fds = os.environ.pop("LISTEN_PID", None), os.environ.pop("LISTEN_FDS", None)
    names = os.environ.pop("LISTEN_FDNAMES", "")
    if not fds or not pid or int(pid) != os.getpid():
        return None
    count = int(fds)
    labels = names.split(":") if names else []
    index = labels.index("api") if "api" in labels else 0
    if count < 1 or (count > 1 and "api" not in labels):
        raise ConfigError(f"socket activation passed {count} sockets; name ours 'api' (FileDescriptorName=api)")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START + index)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfigError("the activated socket is not a Unix stream socket (ListenStream=/run/...)")
    name = sock.getsockname()
    if not name or (isinstance(name, bytes) and name.startswith(b"\0")) or str(name).startswith("\0"):
        raise ConfigError("the activated socket is in the abstract namespace; use a path under /run")
    sock.setblocking(False)
    return sock


class FieldsFormatter(logging.Formatter):
    """stderr format: the message, then the structured fields a journal entry would carry, as KEY=value."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={getattr(record, k)}" for k in LOG_FIELDS if hasattr(record, k))
        return f"{text} {fields}" if fields else text


def under_journald() -> bool:
    """True when stderr is connected to the journal ($JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: str, sender: Any = None) -> logging.Handler:
    """Journald with structured fields when running under it (and systemd-python is there), else stderr."""
    handler: logging.Handler
    if under_journald() or sender is not None:
        try:
            from systemd.journal import JournalHandler

            kwargs = {"sender_function": sender} if sender is not None else {}
            handler = JournalHandler(SYSLOG_IDENTIFIER="edge-llama", **kwargs)
        except ImportError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(FieldsFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter("edge-llama[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return handler
