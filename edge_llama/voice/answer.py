"""One spoken exchange with the daemon: the transcript goes out as a chat message in the voice session, the
streamed answer comes back, is cut into sentences as it arrives, and each sentence is synthesized and queued for
playing at once, so the first sentence is heard while the rest is still being generated.

A Turn runs in its own thread. cancel() (a barge-in, Ctrl-C) sends the protocol's `cancel` op for the running
request on the same connection, stops TTS at its next chunk, and the turn reads the daemon's `done` before it
closes the connection; the daemon keeps the session consistent (a cancelled answer is stored as far as it got).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any, Protocol

from edge_llama.client import Client
from edge_llama.config import VoiceConfig
from edge_llama.errors import EdgeLlamaError, SafetyBlocked, Unavailable
from edge_llama.voice.asr import Transcript
from edge_llama.voice.player import Player
from edge_llama.voice.text import SentenceSplitter
from edge_llama.voice.tts import Tts

READ_TIMEOUT_S = 60.0  # between two lines of one answer: a daemon that says nothing this long is treated as gone
SORRY = "Sorry, I could not answer that."


class Status(Protocol):
    """Where the voice process tells the user what happens (a terminal status line, or log lines)."""

    live: bool  # a terminal that shows partial transcripts

    def state(self, name: str, text: str = "") -> None: ...  # listening / hearing / thinking / speaking
    def said(self, who: str, text: str) -> None: ...  # a finished line: "you" or "assistant"
    def note(self, text: str) -> None: ...  # anything else worth a line


def new_session_id() -> str:
    return "voice-" + secrets.token_hex(6)


class Conversation:
    """The voice process's side of the daemon: one session for the whole conversation, a connection per answer
    (closing it is the daemon's signal that nobody listens any more)."""

    def __init__(self, sock: Path, config: VoiceConfig, status: Status, session: str | None = None) -> None:
        self.sock, self.config, self.status = sock, config, status
        self.named = session is not None
        self.session = session or new_session_id()

    def connect(self, wait_s: float) -> Client:
        """A connection, retrying for up to `wait_s` while the daemon is not there (starting, restarting)."""
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                return Client(self.sock, timeout=READ_TIMEOUT_S)
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    waited = f" (waited {wait_s:.0f} s)" if wait_s >= 1 else ""
                    raise Unavailable(exc.message + waited) from None
                if not told:
                    self.status.note(f"waiting for the daemon at {self.sock} (up to {wait_s:.0f} s): {exc.message}")
                    told = True
                time.sleep(0.25)

    def wait_ready(self) -> dict[str, Any]:
        """Health of the daemon, waiting up to voice.daemon_wait_s for it to come up."""
        deadline = time.monotonic() + self.config.daemon_wait_s
        while True:
            with self.connect(max(0.0, deadline - time.monotonic())) as client:
                try:
                    return client.call({"op": "health"})
                except Unavailable:  # loading its model: answers `unavailable` until ready
                    if time.monotonic() >= deadline:
                        raise
            time.sleep(0.25)

    def request(self, text: str) -> dict[str, Any]:
        """The chat request of one turn. The system prompt goes with every turn (the daemon replaces the stored
        one with it): a first turn that was blocked or cancelled before any text is not stored, and a system
        prompt sent only with it would be lost for the rest of the conversation."""
        messages = []
        if self.config.system_prompt:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": text})
        return {"op": "chat", "messages": messages, "session": self.session, "stream": True,
                "max_tokens": self.config.max_tokens}

    def forget(self) -> None:
        """An unnamed session ends with the process (like `edge-llama chat`); a daemon that is down is not awaited."""
        if self.named:
            return
        with contextlib.suppress(EdgeLlamaError, OSError), self.connect(0) as client:
            client.call({"op": "forget", "session": self.session})


class Turn:
    """Transcript -> (wake check) -> the daemon's streamed answer -> sentences -> TTS -> the player."""

    def __init__(self, turn_id: int, transcripts: list[Future[Transcript]], conversation: Conversation,
                 tts: Tts, player: Player, status: Status, accept: Callable[[str], str | None],
                 interrupted: Turn | None = None) -> None:
        self.id = turn_id
        self.transcripts = transcripts  # an interrupted turn that had not spoken yet hands its words on
        self.interrupted = interrupted  # that turn (its transcripts lead this turn's)
        self.in_session = 0  # how many of the leading transcripts the daemon's session holds after this turn
        self.conversation, self.tts, self.player, self.status = conversation, tts, player, status
        self._accept = accept
        self.epoch = player.epoch
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.text = ""  # what the user said
        self.answer = ""  # what the daemon answered (streamed so far)
        self.spoken: list[str] = []
        self.finish: str | None = None
        self.error: str | None = None
        self.times: dict[str, float] = {}  # monotonic: asr, sent, first_token, first_piece, first_audio, first_sample
        self._client: Client | None = None
        self._request_id: str | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"voice-turn-{turn_id}", daemon=True)

    def start(self) -> Turn:
        self._thread.start()
        return self

    @property
    def played(self) -> bool:
        return "first_sample" in self.times

    @property
    def stored(self) -> bool:
        """The daemon kept this exchange in the session: it stores a turn with any answer text, cancelled or not,
        except a blocked one (docs/protocol.md)."""
        return bool(self.answer) and self.finish in ("stop", "length", "cancelled")

    def cancel(self) -> None:
        """Stop this answer: cancel the request on the daemon (protocol `cancel`) and stop its speech."""
        self.cancelled.set()
        with self._lock:
            client, request_id = self._client, self._request_id
        if client is not None and request_id is not None and not self.done.is_set():
            with contextlib.suppress(EdgeLlamaError, OSError):
                client.send({"op": "cancel", "target": request_id})

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            texts = [f.result().text for f in self.transcripts]
            self.times["asr"] = time.monotonic()
            self.text = " ".join(t for t in texts if t).strip()
            if not self.text or self.cancelled.is_set():
                return
            self.status.said("you", self.text)
            request = self._accept(self.text)
            if request is None:
                return
            if not request:  # the wake phrase alone: answer it without asking the daemon
                self._speak("Yes?")
                return
            asked = self._asked_before()
            if asked:  # the interrupted question is in the session already: ask only what was said after it
                request = " ".join(t for t in texts[asked:] if t).strip()
                if not request:
                    self.status.note("nothing new heard after the interruption")
                    return
            self.status.state("thinking", self.text)
            self._ask(request)
        except CancelledError:  # leaving: the recognition this turn waited for was dropped
            self.cancelled.set()
        except EdgeLlamaError as exc:
            self.error = exc.message
            self.status.note(f"{exc.code}: {exc.message}")
            if not self.cancelled.is_set():
                self._speak(SORRY)
        except Exception as exc:  # a bug must not leave the loop waiting for this turn forever
            self.error = f"{type(exc).__name__}: {exc}"
            self.status.note(f"internal error: {self.error}")
        finally:
            self.in_session = len(self.transcripts) if self.stored else self._asked_before()
            if self.answer or self.cancelled.is_set():
                self.status.said("assistant", self.answer + (" [interrupted]" if self.cancelled.is_set() else ""))
            self.done.set()
            self.player.notify()

    def _asked_before(self) -> int:
        """How many leading transcripts an interrupted turn left in the daemon's session (0 without one). Its
        question is there, with what was made of its answer, when the daemon stored that turn: asking it again
        would put it in the conversation twice."""
        if self.interrupted is None:
            return 0
        self.interrupted.done.wait(READ_TIMEOUT_S)  # its `done` says whether the daemon stored it
        return self.interrupted.in_session

    def _ask(self, request_text: str) -> None:
        client = self.conversation.connect(self.conversation.config.daemon_wait_s)
        splitter = SentenceSplitter()
        try:
            request = self.conversation.request(request_text)
            with self._lock:
                self._client = client
                self._request_id = client.send(request)
            self.times["sent"] = time.monotonic()
            if self.cancelled.is_set():  # cancelled while connecting: cancel() had no request to name yet
                client.send({"op": "cancel", "target": self._request_id})
            try:
                for event in client.events(self._request_id):
                    if event["event"] == "token":
                        self.times.setdefault("first_token", time.monotonic())
                        self.answer += event["text"]
                        if not self.cancelled.is_set():
                            for piece in splitter.feed(event["text"]):
                                self._speak(piece)
                    elif event["event"] == "done":
                        self.finish = event.get("finish_reason")
                        if self.finish == "safety":  # nothing blocked was streamed; say the refusal instead
                            self.answer = (event.get("safety") or {}).get("refusal") or SORRY
                            splitter = SentenceSplitter()
                            splitter.feed(self.answer)
            except SafetyBlocked as exc:  # the question itself was blocked: the message is the refusal
                self.finish, self.answer = "safety", exc.message
                splitter.feed(exc.message)
            if not self.cancelled.is_set():
                for piece in splitter.flush():
                    self._speak(piece)
        finally:
            with self._lock:
                self._client = None
            client.close()

    def _speak(self, piece: str) -> None:
        if self.cancelled.is_set():
            return
        self.times.setdefault("first_piece", time.monotonic())
        self.status.state("speaking", piece)
        resample = self.player.resampler(self.tts.rate)
        for chunk in self.tts.synthesize(piece, stop=self.cancelled.is_set):
            self.times.setdefault("first_audio", time.monotonic())
            if not self.player.enqueue(self.id, self.epoch, resample(chunk)):
                self.cancelled.set()  # the player was stopped (barge-in) since this turn began
                return
        self.spoken.append(piece)
