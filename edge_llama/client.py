"""A small blocking client for the daemon's socket (used by the CLI, the benchmarks and the tests)."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge_llama.config import check_private_dir, per_user_socket_path
from edge_llama.errors import EdgeLlamaError, Unavailable, from_wire

_ids = itertools.count(1)


class ConnectionLost(Unavailable):
    """The daemon closed this connection (it stopped or restarted). `unsent`: the request being sent never
    reached it, so sending it again on a new connection cannot run it twice."""

    def __init__(self, message: str = "the daemon closed the connection", unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent


class Client:
    def __init__(self, path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.path = Path(path)
        if self.path.parent == per_user_socket_path().parent:
            # Another user who made /tmp/edge-llama-$UID first would be listening there: refuse (ConfigError,
            # with the reason) before anything is sent, as the daemon refuses to serve there.
            check_private_dir(self.path.parent, create=False)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise Unavailable(
                f"the edge-llama daemon is not running at {self.path}; start it with: edge-llama serve"
            ) from None
        except PermissionError:
            self.sock.close()
            raise Unavailable(f"no permission to connect to {self.path} (are you in its group?)") from None
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, request: dict[str, Any]) -> str:
        """Send one request (an id is added if missing); returns its id."""
        request.setdefault("id", f"r{next(_ids)}")
        try:
            self.sock.sendall((json.dumps(request, ensure_ascii=False) + "\n").encode("utf-8"))
        except (BrokenPipeError, ConnectionResetError):
            raise self._closed_error(unsent=True) from None
        return request["id"]

    def read_event(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ConnectionLost()
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _closed_error(self, unsent: bool) -> EdgeLlamaError:
        """The daemon closed the connection: the error line it sent before, if any, says why (e.g. forbidden)."""
        try:
            self.sock.settimeout(1.0)  # it has closed: what it sent is already here
            while data := self.sock.recv(65536):
                self._buf += data
        except OSError:
            pass
        for line in self._buf.split(b"\n"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == "error":
                return from_wire(event)
        return ConnectionLost(unsent=unsent)

    def next_event(self, request_id: str) -> dict[str, Any]:
        """The next event of one request (others are skipped); an `error` line is raised as its typed error, and so
        is one without an id: it concerns the whole connection."""
        while True:
            event = self.read_event()
            if event.get("id") not in (request_id, None):
                continue
            if event["event"] == "error":
                raise from_wire(event)
            return event

    def events(self, request_id: str) -> Iterator[dict[str, Any]]:
        """Events of one request up to and including its `done`."""
        while True:
            event = self.next_event(request_id)
            yield event
            if event["event"] == "done":
                return

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return its `done` event (non-streaming use)."""
        done: dict[str, Any] = {}
        for event in self.events(self.send(request)):
            done = event
        return done
