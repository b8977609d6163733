"""Conversations kept by the daemon, one JSON file per session under <state_dir>/sessions/.

Writes are atomic (temp file, fsync, rename, fsync of the directory) so a session survives a daemon restart and
a SIGKILL at any moment: a reader sees either the old or the new conversation, never half of one. `load` and
`save` block on the disk (fsync can take tens of ms on an SD card): the daemon calls them in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from edge_llama.errors import InternalError
from edge_llama.protocol import ROLES, Message

log = logging.getLogger("edge_llama.sessions")
SCHEMA = 1
TEMP_FILE_AGE_S = 600  # a temp file older than this is a leftover (another daemon may share the dir)


class SessionStore:
    def __init__(self, root: Path, max_messages: int) -> None:
        self.root = root / "sessions"
        self.max_messages = max_messages
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # session -> (lock, [holders + waiters])

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    @contextlib.asynccontextmanager
    async def lock(self, session: str) -> AsyncIterator[None]:
        """Requests on one session run one after another (the second sees the first one's answer). A lock
        lives only while someone holds or waits for it, so a long-running daemon does not keep one per session
        it ever saw."""
        lock, users = self._locks.setdefault(session, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[session]

    def _path(self, session: str) -> Path:
        return self.root / f"{session}.json"  # `session` was validated by the protocol: no '/' or leading '.'

    def load(self, session: str) -> list[Message]:
        """The stored conversation ([] for a new session). A file that cannot be read as one is moved aside to
        `<session>.json.corrupt` (kept for the operator, never read again) and the error says so: the client's
        next request starts a fresh conversation instead of failing forever."""
        path = self._path(session)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            messages = [Message(m["role"], m["content"]) for m in data["messages"]]
            if not all(m.role in ROLES and isinstance(m.content, str) for m in messages):
                raise ValueError("a message has an unknown role or a non-text content")
            return messages
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not a conversation
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
            except OSError as move:
                raise InternalError(f"session '{session}' is unreadable ({exc}) and could not be set aside "
                                    f"({move.strerror}): ask the operator to remove {path}") from exc
            raise InternalError(f"session '{session}' was unreadable ({type(exc).__name__}: {exc}); its history was "
                                f"set aside as {aside.name} and your next request starts a new conversation") from exc
        except OSError as exc:
            raise InternalError(f"session '{session}' cannot be read: {exc.strerror}") from exc

    def save(self, session: str, messages: list[Message]) -> None:
        """A disk that is full or not writable is an error naming the session and the reason, not a traceback (a
        write that fails before the rename leaves the stored conversation as it was)."""
        try:
            self._write(session, self._bounded(messages))
        except OSError as exc:
            log.warning("session '%s' could not be saved: %s", session, exc.strerror or exc)
            raise InternalError(f"session '{session}' could not be saved ({exc.strerror or exc}); this answer may "
                                "be missing from it") from exc

    def _write(self, session: str, messages: list[Message]) -> None:
        payload = json.dumps({"schema": SCHEMA, "messages": [m.as_dict() for m in messages]}, ensure_ascii=False)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{session}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(session))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)

    def expire(self, max_age_s: float) -> int:
        """Delete sessions not written for `max_age_s` seconds, and temp files a killed daemon left behind; a
        session in use (locked) is kept. Clients that never send `forget` would otherwise fill the disk.
        Returns how many sessions were deleted."""
        now = time.time()
        deleted = 0
        for path in self.root.iterdir():
            try:
                age = now - path.stat().st_mtime
                if path.name.startswith(".") and path.suffix == ".tmp":  # ".<session>.<random>.tmp" of a kill
                    if age > TEMP_FILE_AGE_S:  # a save in progress is seconds old, not ten minutes
                        path.unlink()
                elif path.suffix == ".json" and age > max_age_s and path.stem not in self._locks:
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:  # forgotten meanwhile
                continue
        return deleted

    async def forget(self, session: str) -> bool:
        """Delete the stored conversation once requests on it are done; False when there was none."""
        async with self.lock(session):
            try:
                await asyncio.to_thread(self._path(session).unlink)
            except FileNotFoundError:
                return False
            except OSError as exc:
                raise InternalError(f"session '{session}' could not be deleted: {exc.strerror}") from exc
            return True

    def _bounded(self, messages: list[Message]) -> list[Message]:
        """Keep leading system messages and the newest messages, starting at a user turn."""
        if len(messages) <= self.max_messages:
            return messages
        pinned = [m for m in messages[:1] if m.role == "system"]
        rest = messages[len(pinned):][-(self.max_messages - len(pinned)):]
        while rest and rest[0].role != "user":
            rest = rest[1:]
        return pinned + rest
