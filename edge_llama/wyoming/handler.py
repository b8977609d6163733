"""One Wyoming connection: the events of asr, tts and handle (wyoming 1.10), as Home Assistant sends them.

- asr: `transcribe`? `audio-start` `audio-chunk`* `audio-stop` -> `transcript`. Any rate (8-192 kHz), width
  (1-4 bytes) and channel count (1-8) is taken and converted to the 16 kHz mono float32 Whisper hears.
- tts: `synthesize` -> `audio-start` `audio-chunk`* `audio-stop`. Streamed: `synthesize-start`
  `synthesize-chunk`* (`synthesize`, which is then ignored: Home Assistant sends the whole text again for servers
  that do not stream) `synthesize-stop` -> an `audio-start`...`audio-stop` per sentence as soon as the sentence is
  complete, then `synthesize-stopped` (homeassistant/components/wyoming/tts.py reads the audio format from the
  first `audio-start` and the audio until `synthesize-stopped`).
- handle: `transcript` -> the daemon's answer (handle.py).
- `describe` -> `info`; `ping` -> `pong`; other types are dropped, as the protocol asks of servers.

Bad input gets an `error` event (Wyoming's `code` and `text`). Where the stream can go on, so does the
connection (audio before `audio-start`, a bad header line, a question over the text limit); where it cannot (an
unsupported audio format, a broken frame, a payload over the limit) or a client waits for audio (text to speak
over the limit), the connection is closed after the error: Home Assistant's stt and tts clients ignore `error` and
would otherwise wait for audio or a transcript that never comes. An utterance longer than
wyoming.max_utterance_s is cut there (with an `error`) and the rest dropped, so a connection holds at most that
much audio, one event being read and one waiting.

Events are read by a task of their own into a one-place queue: a client that vanishes is noticed while an answer
is being generated, and its request on the daemon is cancelled. Models run in threads, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.handle import Handled, HandledChunk, HandledStart, HandledStop
from wyoming.ping import Pong
from wyoming.server import AsyncEventHandler
from wyoming.tts import SynthesizeStopped

from edge_llama.errors import EdgeLlamaError, SafetyBlocked
from edge_llama.voice.audio import RATE, Resampler
from edge_llama.voice.text import SentenceSplitter
from edge_llama.wyoming.handle import DaemonChat, session_name
from edge_llama.wyoming.services import Services
from edge_llama.wyoming.wire import AudioFormat, BadEvent, encode_s16, read_event

log = logging.getLogger("edge_llama.wyoming")

ANSWER_TIMEOUT_S = 120.0  # between two pieces of one answer: a daemon silent this long is treated as gone
LINGER_S = 2.0  # after an error that ends the connection: how long what the client still sends is read and dropped


class ClientGone(Exception):
    """The client closed the connection while we were answering."""


class _Silent(Exception):
    """The daemon sent nothing for ANSWER_TIMEOUT_S."""


class Handler(AsyncEventHandler):
    """One connection (AsyncServer makes one per client: functools.partial(Handler, services))."""

    def __init__(self, services: Services, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.services, self.limits = services, services.limits
        self._events: asyncio.Queue[Any] = asyncio.Queue(maxsize=1)
        self._gone = asyncio.Event()
        # asr: the utterance being received
        self._format: AudioFormat | None = None
        self._resample: Resampler | None = None
        self._audio: list[np.ndarray] = []
        self._samples = 0  # 16 kHz samples kept
        self._cut = False  # the utterance went over the limit: the rest is dropped
        self._stray = False  # audio came without audio-start (told once)
        # tts: a streamed synthesis in progress
        self._splitter: SentenceSplitter | None = None
        self._streamed_chars = 0

    # --- the connection -------------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Read events (bounded, in a task of their own) and answer each in turn until the client leaves."""
        peer = self.writer.get_extra_info("peername") or "unix socket"
        services = self.services
        services.connections += 1
        reading = asyncio.create_task(self._read_events())
        try:
            if services.connections > self.limits.max_connections:
                await self._error(BadEvent("busy", f"{self.limits.max_connections} clients are connected "
                                           "(wyoming.max_connections); try again later"))
                return await self._linger(reading)
            log.debug("connection from %s", peer)
            while True:
                item = await self._events.get()
                if item is None:
                    return
                if isinstance(item, BadEvent):
                    await self._error(item)
                    if item.fatal:
                        return await self._linger(reading)
                    continue
                kind, data, payload = item
                try:
                    if not await self.handle_event(Event(kind, data, payload)):
                        return
                except BadEvent as exc:
                    await self._error(exc)
                    if exc.fatal:
                        return await self._linger(reading)
        except (ClientGone, ConnectionError):
            log.info("%s left", peer)
        except Exception:  # a bug must end this connection only, never the server
            log.exception("internal error on the connection from %s", peer)
            await self._error(BadEvent("internal", "internal error in edge-llama wyoming (see its log)"))
        finally:
            services.connections -= 1
            reading.cancel()
            self.writer.close()

    async def _read_events(self) -> None:
        try:
            while True:
                try:
                    event = await read_event(self.reader, self.limits.max_payload_bytes)
                except BadEvent as exc:
                    await self._events.put(exc)
                    if exc.fatal:
                        break
                    continue
                if event is None:
                    break
                await self._events.put(event)
        except (ConnectionError, OSError):
            pass
        self._gone.set()
        await self._events.put(None)  # after what is queued: the answer to the last event is still given

    async def _linger(self, reading: asyncio.Task) -> None:
        """Let the client read the error that ends its connection. Closing a socket with input not read makes the
        kernel send a reset, which can destroy the error in flight; so: no more output, then what the client still
        sends is read and dropped, for up to LINGER_S."""
        reading.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_S
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            while deadline > loop.time() and await asyncio.wait_for(self.reader.read(1 << 16),
                                                                    deadline - loop.time()):
                pass
        except (asyncio.TimeoutError, ConnectionError, OSError, ValueError):
            pass

    async def _write(self, event: Any) -> None:
        await async_write_event(event, self.writer)

    async def _error(self, exc: BadEvent) -> None:
        log.info("error sent: %s: %s", exc.code, exc.text)
        try:
            await self._write(Error(text=exc.text, code=exc.code).event())
        except (ConnectionError, OSError):
            pass

    async def handle_event(self, event: Any) -> bool:
        """Answer one event (AsyncEventHandler's hook); False ends the connection."""
        kind, data, payload = event.type, event.data or {}, event.payload or b""
        if kind == "audio-chunk":
            return await self._audio_chunk(data, payload)
        if kind == "audio-start":
            return self._audio_start(data)
        if kind == "audio-stop":
            return await self._audio_stop()
        if kind == "transcribe":  # its model or language: there is one of each
            log.debug("transcribe %s", data)
            return True
        if kind == "synthesize":
            return await self._synthesize(data)
        if kind == "synthesize-start":
            self._splitter, self._streamed_chars = SentenceSplitter(), 0
            return True
        if kind == "synthesize-chunk":
            return await self._synthesize_chunk(data)
        if kind == "synthesize-stop":
            return await self._synthesize_stop()
        if kind == "transcript":
            return await self._handle(data)
        if kind == "describe":
            await self._write(await self.services.info())
            return True
        if kind == "ping":
            await self._write(Pong(text=data.get("text")).event())
        return True

    # --- asr ------------------------------------------------------------------------------------------------------
    def _reset_audio(self) -> None:
        self._format, self._resample, self._audio, self._samples, self._cut = None, None, [], 0, False

    def _audio_start(self, data: dict[str, Any]) -> bool:
        self._reset_audio()
        self._stray = False
        try:
            self._format = AudioFormat(data)
        except BadEvent as exc:  # the stream that follows cannot be understood: refuse it, close after the error
            raise BadEvent(exc.code, exc.text + "; closing the connection", fatal=True) from None
        self._resample = Resampler(self._format.rate, RATE)
        return True

    async def _audio_chunk(self, data: dict[str, Any], payload: bytes) -> bool:
        if self._format is None:
            if not self._stray:
                self._stray = True
                raise BadEvent("no_audio_start", "audio-chunk before audio-start: ignored (send audio-start with "
                               "rate, width and channels first)")
            return True
        try:
            chunk_format = AudioFormat(data)
            if chunk_format != self._format:
                raise BadEvent("audio_format", f"an audio-chunk in {chunk_format} inside a stream announced as "
                               f"{self._format}")
            if self._cut:
                return True
            assert self._resample is not None
            samples = self._resample(self._format.decode(payload))
        except BadEvent as exc:  # the stream cannot be read on
            raise BadEvent(exc.code, exc.text + "; closing the connection", fatal=True) from None
        room = int(self.limits.max_utterance_s * RATE) - self._samples
        if len(samples) > room:
            samples, self._cut = samples[:room], True
        self._audio.append(samples)
        self._samples += len(samples)
        if self._cut:
            raise BadEvent("audio_too_long", f"the utterance is longer than {self.limits.max_utterance_s:g} s "
                           "(wyoming.max_utterance_s): only its beginning is transcribed")
        return True

    async def _audio_stop(self) -> bool:
        if self._format is None:
            self._stray = False
            raise BadEvent("no_audio_start", "audio-stop without audio-start: nothing to transcribe")
        audio = np.concatenate(self._audio) if self._audio else np.zeros(0, np.float32)
        self._reset_audio()
        if not len(audio):  # nothing was said (Whisper on nothing makes words up)
            await self._write(Transcript(text="", language=self.services.voice.language).event())
            return True
        # Not given up when the client leaves: bounded work (at most max_utterance_s), and the connection keeps
        # counting against max_connections until it is done, so nobody can pile up transcriptions.
        started = time.monotonic()
        result = await asyncio.to_thread(self.services.recognizer.transcribe, audio)
        # What people say stays out of the journal unless asked for (--debug), like the daemon's safety.log_texts.
        log.info("transcribed %.1f s of audio in %.0f ms", result.seconds, (time.monotonic() - started) * 1000)
        log.debug("heard: %s", result.text)
        await self._write(Transcript(text=result.text, language=self.services.voice.language).event())
        return True

    # --- tts ------------------------------------------------------------------------------------------------------
    def _text(self, data: dict[str, Any], what: str, fatal: bool = False) -> str:
        """The event's text, checked. `fatal` for speech: a client waiting for audio ignores errors (Home
        Assistant's tts.py does), so the connection is closed after the error rather than left hanging."""
        text = data.get("text")
        closing = "; closing the connection" if fatal else ""
        if not isinstance(text, str):
            raise BadEvent("bad_event", f"{what} needs 'text' (a string){closing}", fatal)
        if len(text) > self.limits.max_text_chars:
            raise BadEvent("text_too_long", f"{what} text of {len(text)} characters is over the limit of "
                           f"{self.limits.max_text_chars} (wyoming.max_text_chars){closing}", fatal)
        return text

    async def _speak(self, pieces: list[str], framed: bool = True) -> None:
        """Audio of each piece; `framed`: each in its own audio-start ... audio-stop (a streamed synthesis)."""
        tts = self.services.tts
        for piece in pieces:
            chunks = await asyncio.to_thread(lambda text=piece: list(tts.synthesize(text)))
            if framed:
                await self._write(AudioStart(rate=tts.rate, width=2, channels=1).event())
            for chunk in chunks:
                for pcm in encode_s16(chunk):
                    await self._write(AudioChunk(rate=tts.rate, width=2, channels=1, audio=pcm).event())
            if framed:
                await self._write(AudioStop().event())

    async def _synthesize(self, data: dict[str, Any]) -> bool:
        if self._splitter is not None:
            return True  # the whole text of a streamed synthesis, sent again for servers that do not stream
        text = self._text(data, "synthesize", fatal=True)
        splitter = SentenceSplitter()
        pieces = splitter.feed(text) + splitter.flush()
        tts = self.services.tts
        await self._write(AudioStart(rate=tts.rate, width=2, channels=1).event())
        await self._speak(pieces, framed=False)  # one audio stream: a plain client reads up to its audio-stop
        await self._write(AudioStop().event())
        return True

    async def _synthesize_chunk(self, data: dict[str, Any]) -> bool:
        if self._splitter is None:
            raise BadEvent("no_synthesize_start", "synthesize-chunk before synthesize-start: ignored")
        text = self._text(data, "synthesize-chunk", fatal=True)
        self._streamed_chars += len(text)
        if self._streamed_chars > self.limits.max_text_chars:
            raise BadEvent("text_too_long", f"the streamed text is over {self.limits.max_text_chars} characters "
                           "(wyoming.max_text_chars); closing the connection", fatal=True)
        await self._speak(self._splitter.feed(text))
        return True

    async def _synthesize_stop(self) -> bool:
        if self._splitter is None:
            raise BadEvent("no_synthesize_start", "synthesize-stop without synthesize-start: ignored")
        splitter, self._splitter = self._splitter, None
        await self._speak(splitter.flush())
        await self._write(SynthesizeStopped().event())
        return True

    # --- handle ---------------------------------------------------------------------------------------------------
    async def _handle(self, data: dict[str, Any]) -> bool:
        text = self._text(data, "transcript").strip()
        context = data.get("context") if isinstance(data.get("context"), dict) else {}
        conversation_id = context.get("conversation_id")
        reply_context = {"conversation_id": conversation_id} if isinstance(conversation_id, str) else None
        if not text:  # nothing to ask: an empty answer
            for event in (HandledStart(context=reply_context), Handled(text="", context=reply_context),
                          HandledStop()):
                await self._write(event.event())
            return True
        chat = DaemonChat(self.services.sock, self.services.voice, session_name(conversation_id), text).start()
        answer, started = "", False
        try:
            while True:
                kind, value = await self._unless_gone(chat.queue.get())
                if kind == "error" and not isinstance(value, SafetyBlocked):
                    assert isinstance(value, EdgeLlamaError)
                    await self._write(Error(text=value.message, code=value.code).event())
                    return True
                if kind == "token":
                    piece = value
                else:  # done, or the question blocked: a refusal is what is said
                    piece = value.message if kind == "error" else self._refusal(value)
                    if piece is not None:
                        answer = ""
                if piece:
                    if not started:
                        started = True
                        await self._write(HandledStart(context=reply_context).event())
                    answer += piece
                    await self._write(HandledChunk(text=piece).event())
                if kind != "token":
                    break
        except (ClientGone, _Silent) as exc:
            await asyncio.to_thread(chat.cancel)
            if isinstance(exc, ClientGone):
                raise
            await self._write(Error(text=f"the daemon said nothing for {ANSWER_TIMEOUT_S:.0f} s", code="timeout")
                              .event())
            return True
        if not started:
            await self._write(HandledStart(context=reply_context).event())
        await self._write(Handled(text=answer, context=reply_context).event())
        await self._write(HandledStop().event())
        return True

    @staticmethod
    def _refusal(done: dict[str, Any]) -> str | None:
        if done.get("finish_reason") != "safety":
            return None
        return (done.get("safety") or {}).get("refusal") or "Sorry, I can't help with that."

    async def _unless_gone(self, awaitable: Any) -> Any:
        """`awaitable`'s result, unless the client leaves first (ClientGone) or nothing comes for
        ANSWER_TIMEOUT_S (_Silent)."""
        task = asyncio.ensure_future(awaitable)
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            done, _ = await asyncio.wait({task, gone}, timeout=ANSWER_TIMEOUT_S,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        if gone in done:
            raise ClientGone()
        raise _Silent()
