"""Wyoming `handle`: a `transcript` becomes a chat with the daemon (protocol v1 over its Unix socket), in a daemon
session per Home Assistant conversation.

Home Assistant sends `transcript` with `context: {"conversation_id", "device_id"?, "satellite_id"?}` and reads
events until `handled`, `not-handled` or `error` (homeassistant/components/wyoming/conversation.py). The answer is
streamed as wyoming 1.10 describes it: `handled-start`, a `handled-chunk` per piece of text from the daemon, then
the whole answer in `handled` ("sent for backwards compatibility"), then `handled-stop`. Streaming is not
negotiated per request in that protocol: the server says `supports_handled_streaming` in `info`, and a client that
does not stream ignores the chunks and stops at `handled`, as Home Assistant does.

The client library blocks, so each question runs in a thread of its own, handing what arrives to the event loop
through a queue; the voice front end's Conversation builds the request (the system prompt with every turn) and
waits for a daemon that is starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import threading
from pathlib import Path
from typing import Any

from edge_llama.config import VoiceConfig
from edge_llama.errors import EdgeLlamaError, InternalError
from edge_llama.protocol import MAX_SESSION_CHARS
from edge_llama.voice.answer import Conversation

log = logging.getLogger("edge_llama.wyoming")

SESSION_PREFIX = "wyoming-"  # keeps these apart from other clients' sessions, and never starts with "."
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]")  # what protocol v1 refuses in a session name


def session_name(conversation_id: Any) -> str | None:
    """The daemon session of a Home Assistant conversation id (a ULID such as 01JD3Z...), within the protocol's
    rules: at most MAX_SESSION_CHARS of [A-Za-z0-9._-], not starting with ".". An id that had to be changed or
    shortened gets a hash of the original, so two ids never share a session. None: no id, no session (one turn)."""
    if not isinstance(conversation_id, str) or not conversation_id:
        return None
    clean = _NOT_ALLOWED.sub("-", conversation_id)
    name = SESSION_PREFIX + clean
    if clean != conversation_id or len(name) > MAX_SESSION_CHARS:
        digest = hashlib.sha256(conversation_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{SESSION_PREFIX}{clean[:MAX_SESSION_CHARS - len(SESSION_PREFIX) - 17]}-{digest}"
    return name


class _LogStatus:
    """The voice Conversation's status lines, as log lines."""

    live = False

    def state(self, name: str, text: str = "") -> None:
        pass

    def said(self, who: str, text: str) -> None:
        log.debug("%s: %s", who, text)

    def note(self, text: str) -> None:
        log.info("%s", text)


class DaemonChat:
    """One question to the daemon, asked from a thread. The queue gets ("token", text) items, then ("done", the
    done event) or ("error", EdgeLlamaError)."""

    def __init__(self, sock: Path, voice: VoiceConfig, session: str | None, text: str) -> None:
        self.conversation = Conversation(sock, voice, _LogStatus(), session)
        self.session, self.text = session, text
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._client: Any = None
        self._request_id: str | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="wyoming-chat", daemon=True)

    def start(self) -> DaemonChat:
        self._thread.start()
        return self

    def _put(self, item: tuple[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self) -> None:
        try:
            client = self.conversation.connect(self.conversation.config.daemon_wait_s)
            try:
                request = self.conversation.request(self.text)
                if self.session is None:
                    del request["session"]  # no conversation id: a single turn, nothing kept
                with self._lock:
                    if self._cancelled:
                        return
                    self._client, self._request_id = client, client.send(request)
                for event in client.events(self._request_id):
                    self._put(("token", event["text"]) if event["event"] == "token" else ("done", event))
            finally:
                with self._lock:
                    self._client = None
                client.close()
        except EdgeLlamaError as exc:
            self._put(("error", exc))
        except (OSError, ValueError) as exc:  # the daemon's connection broke mid-answer
            self._put(("error", InternalError(f"the daemon's answer broke off: {exc}")))

    def cancel(self) -> None:
        """Stop the answer (the Wyoming client left): the protocol's `cancel` for the running request. Blocking
        (a send on the daemon's socket): call it from a thread."""
        with self._lock:
            self._cancelled = True
            client, request_id = self._client, self._request_id
            if client is not None and request_id is not None:
                with contextlib.suppress(EdgeLlamaError, OSError):
                    client.send({"op": "cancel", "target": request_id})
