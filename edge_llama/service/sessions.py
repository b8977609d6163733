"""Conversations kept by the daemon, one JSON file per session under <state_dir>/sessions/<uid>/.

A session belongs to the uid that created it: each peer uid has its own namespace, so another user can neither
read, continue nor forget it (the same name is simply another session of theirs). Root and the daemon's own uid
are no exception. Files of the shared namespace of earlier versions (<state_dir>/sessions/<name>.json) are moved
into the daemon's own uid's namespace at start: kept, and readable by nobody else.

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
from typing import Any

from edge_llama.errors import InternalError
from edge_llama.protocol import ROLES, Message, ToolCall

log = logging.getLogger("edge_llama.sessions")
SCHEMA = 2  # 2: messages may carry tool_calls / tool_call_id (schema 1 files read the same)
TEMP_FILE_AGE_S = 600  # a temp file older than this is a leftover (another daemon may share the dir)
Key = tuple[int, str]  # (owner uid, session name)


def message_to_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [c.wire() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def message_from_json(d: dict[str, Any]) -> Message:
    calls = tuple(ToolCall(c["id"], c["name"], c["arguments"]) for c in d.get("tool_calls", ()))
    m = Message(d["role"], d["content"], calls, d.get("tool_call_id"))
    if m.role not in ROLES or not isinstance(m.content, str) or not all(
            isinstance(c.id, str) and isinstance(c.name, str) and isinstance(c.arguments, dict) for c in calls):
        raise ValueError("a message has an unknown role, a non-text content or a malformed tool call")
    return m


class SessionStore:
    def __init__(self, root: Path, max_messages: int) -> None:
        self.root = root / "sessions"
        self.max_messages = max_messages
        self._locks: dict[Key, tuple[asyncio.Lock, list[int]]] = {}  # session -> (lock, [holders + waiters])

    def prepare(self) -> None:
        """Create the store, and move the shared namespace of earlier versions into the daemon's own uid's."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        legacy = [p for p in self.root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.endswith((".json", ".json.corrupt"))]
        if legacy:
            own = self._dir(os.getuid())
            own.mkdir(exist_ok=True, mode=0o700)
            for path in legacy:
                os.replace(path, own / path.name)
            log.warning("moved %d session file(s) of the shared namespace of an earlier version to %s: they now "
                        "belong to the daemon's own uid %d (move a file to <uid>/ to give it to that user)",
                        len(legacy), own, os.getuid())

    @contextlib.asynccontextmanager
    async def lock(self, owner: int, session: str) -> AsyncIterator[None]:
        """Requests on one session run one after another (the second sees the first one's answer). A lock
        lives only while someone holds or waits for it, so a long-running daemon does not keep one per session
        it ever saw."""
        key = (owner, session)
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def _dir(self, owner: int) -> Path:
        return self.root / str(owner)

    def _path(self, owner: int, session: str) -> Path:
        # `session` was validated by the protocol (no '/' or leading '.'), `owner` is the kernel's peer uid.
        return self._dir(owner) / f"{session}.json"

    def load(self, owner: int, session: str) -> list[Message]:
        """The stored conversation ([] for a new session). A file that cannot be read as one is moved aside to
        `<session>.json.corrupt` (kept for the operator, never read again) and the error says so: the client's
        next request starts a fresh conversation instead of failing forever."""
        path = self._path(owner, session)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return [message_from_json(m) for m in data["messages"]]
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

    def save(self, owner: int, session: str, messages: list[Message]) -> None:
        """A disk that is full or not writable is an error naming the session and the reason, not a traceback (a
        write that fails before the rename leaves the stored conversation as it was)."""
        try:
            self._write(owner, session, self._bounded(messages))
        except OSError as exc:
            log.warning("session '%s' could not be saved: %s", session, exc.strerror or exc)
            raise InternalError(f"session '{session}' could not be saved ({exc.strerror or exc}); this answer may "
                                "be missing from it") from exc

    def _write(self, owner: int, session: str, messages: list[Message]) -> None:
        payload = json.dumps({"schema": SCHEMA, "messages": [message_to_json(m) for m in messages]},
                             ensure_ascii=False)
        folder = self._dir(owner)
        folder.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{session}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path(owner, session))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(folder, os.O_RDONLY)
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
        for path in [*self.root.glob(".*.tmp"), *self.root.glob("*/*")]:  # (temp files of earlier versions too)
            try:
                age = now - path.stat().st_mtime
                if path.name.startswith(".") and path.suffix == ".tmp":  # ".<session>.<random>.tmp" of a kill
                    if age > TEMP_FILE_AGE_S:  # a save in progress is seconds old, not ten minutes
                        path.unlink()
                elif (path.suffix == ".json" and age > max_age_s and path.parent.name.isdigit()
                      and (int(path.parent.name), path.stem) not in self._locks):
                    path.unlink()
                    deleted += 1
            except FileNotFoundError:  # forgotten meanwhile
                continue
        return deleted

    async def forget(self, owner: int, session: str) -> bool:
        """Delete the stored conversation once requests on it are done; False when there was none."""
        async with self.lock(owner, session):
            try:
                await asyncio.to_thread(self._path(owner, session).unlink)
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
