"""The socket under both protocols: binding it, telling protocol v1 from HTTP on a new connection, and writes
that cannot hold the daemon hostage.

One socket serves protocol v1 (a line starting with `{`) and HTTP/1.1 (a line starting with a method): the first
bytes of a connection tell them apart (`sniff`). Every write to a client goes through `send_bounded`: when the
client stops reading, its bytes pile up in our buffer only up to WRITE_HIGH_WATER, and then the writer waits for it
at most `server.write_timeout_s`. A client that still has not read by then is treated as gone (`ClientStalled`):
its requests are cancelled, so its engine turn ends and the queue behind it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from edge_llama.errors import SocketInUse

if TYPE_CHECKING:
    from edge_llama.config import Config
    from edge_llama.service.handlers import Handlers
    from edge_llama.service.scheduler import CancelToken

READ_CHUNK = 64 * 1024
WRITE_HIGH_WATER = 256 * 1024  # bytes buffered for a slow reader before a stream waits for it
SNIFF_BLANK_BYTES = 1024  # blank bytes (protocol v1 skips empty lines) looked past for a request's first byte
SNIFF_DEADLINE_S = 10.0  # from a request's first byte, how long the bytes that tell its protocol may take
HTTP_METHOD = re.compile(rb"[A-Z]{1,16} ")  # an HTTP request starts with its method (GET, POST...) and a space


class Hub(Protocol):
    """What a connection needs of the server: the live config (a reload replaces it), the request handlers, and
    the registry of cancel tokens that shutdown cancels."""

    config: Config
    handlers: Handlers
    cancels: set[CancelToken]
    http_token: bytes | None  # server.http_token_file's token, when one is configured


class ClientStalled(ConnectionError):
    """The client did not read what we wrote within server.write_timeout_s."""


async def send_bounded(writer: asyncio.StreamWriter, data: bytes, timeout_s: float) -> None:
    """Write `data`. When more than WRITE_HIGH_WATER bytes wait in our buffer, wait for the client to take them, at
    most `timeout_s`; a client that does not is dropped (its transport aborted, so the buffer is freed at once) and
    ClientStalled raised. Raises ConnectionError when the client is gone."""
    writer.write(data)
    if writer.transport.get_write_buffer_size() <= WRITE_HIGH_WATER:
        return
    try:
        await asyncio.wait_for(writer.drain(), timeout_s)
    except asyncio.TimeoutError:
        writer.transport.abort()
        raise ClientStalled(f"the client read nothing for {timeout_s:g} s (server.write_timeout_s)") from None


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


async def sniff(reader: asyncio.StreamReader, first_byte_s: float | None, total_s: float | None = None) -> bytes:
    """Read a new connection's first bytes until they tell its protocol (see `protocol_known`). The first byte is
    waited for `first_byte_s` (None: for ever: an interactive `edge-llama chat` connects long before its first
    request); the rest for at most SNIFF_DEADLINE_S. `total_s` bounds the whole (a refused peer). Returns what
    was read (all of it, on a timeout or EOF)."""
    loop = asyncio.get_running_loop()
    head = b""
    deadline: float | None = None
    end = loop.time() + total_s if total_s is not None else None
    with contextlib.suppress(asyncio.TimeoutError):
        while not protocol_known(head):
            waits = [w for w in (first_byte_s if deadline is None else deadline - loop.time(),
                                 None if end is None else end - loop.time()) if w is not None]
            data = await asyncio.wait_for(reader.read(READ_CHUNK), max(0.0, min(waits)) if waits else None)
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
    """A connection's reader with the bytes `sniff` took put back in front (connections only call read())."""

    def __init__(self, head: bytes, reader: asyncio.StreamReader) -> None:
        self._head = head
        self._reader = reader

    async def read(self, n: int = -1) -> bytes:
        if not self._head:
            return await self._reader.read(n)
        cut = len(self._head) if n < 0 else n
        out, self._head = self._head[:cut], self._head[cut:]
        return out
