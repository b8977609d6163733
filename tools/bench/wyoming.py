"""`edge-llama wyoming` against the reference Wyoming servers, in one run, requests alternating.

1. Speech to text: our asr against the `wyoming-faster-whisper` package's own server (run here as a subprocess on
   loopback), both on the same Whisper model folder (the embedded tiny.en, CTranslate2 int8), the same beam size
   (1), compute type (int8), CPU threads and language (en). Each request is what Home Assistant's stt.py sends:
   `transcribe`, `audio-start`, 16 kHz mono 16-bit chunks of 1024 samples, `audio-stop`, on a new connection;
   timed from `audio-stop` written to `transcript` received. The audio: the recording of a person in
   useful-moonshine-onnx (beckett.wav, 10 s) and espeak-ng voice commands (2-3 s). Target: ratio ours/theirs of
   the medians <= 1.0.
2. Handle to first audio: a question to `handle` (the daemon: embedded SmolLM2-135M on llama.cpp, greedy, safety
   on) with the answer spoken by our `tts`; from `transcript` written to the first `audio-chunk` received.
   Streaming: each `handled-chunk` is forwarded at once as a `synthesize-chunk` of a streamed synthesis (what Home
   Assistant does with an LLM agent's streamed answer); plain: `handled`, then one `synthesize` of the whole text.

The machine is shared and noisy: requests alternate (and which side goes first alternates too), medians are
reported, and the lead runs the final figures on a quiet machine.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench/wyoming.py [--rounds 5] [--questions 6]

Last line: one JSON object (milliseconds).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Named like the `wyoming` package it uses: run as a script, its own folder comes first on sys.path and would
# shadow the package.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import wave  # noqa: E402

import numpy as np  # noqa: E402
from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncClient  # noqa: E402
from wyoming.handle import Handled  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop  # noqa: E402

from edge_llama.config import VoiceConfig  # noqa: E402
from edge_llama.launch import DaemonProcess  # noqa: E402
from edge_llama.voice.asr import embedded_model  # noqa: E402
from edge_llama.voice.audio import RATE, Resampler  # noqa: E402
from edge_llama.voice.text import word_errors  # noqa: E402
from edge_llama.voice.tts import Espeak  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."
COMMANDS = ["Turn on the kitchen lights.", "What is the weather like today?", "Set a timer for ten minutes.",
            "Who wrote Romeo and Juliet?"]
# Questions whose answers take more than a sentence (the voice system prompt asks for one to three): streaming
# can start speaking only where there is a first sentence before the end.
QUESTIONS = ["Tell me about the moon.", "How do bees make honey?", "Why do leaves change color in autumn?",
             "What can you tell me about Paris?", "Explain how rain forms.", "Tell me about the ocean.",
             "What is a volcano?", "Describe a cat."]
CHUNK = 1024  # samples per audio-chunk, as Home Assistant's satellites send them


def beckett() -> bytes:
    import importlib.util

    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.submodule_search_locations, "pip install useful-moonshine-onnx (dev setup)"
    with wave.open(str(Path(list(spec.submodule_search_locations)[0]) / "assets" / "beckett.wav")) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (RATE, 2, 1)
        return w.readframes(w.getnframes())


def spoken(text: str) -> bytes:
    tts = Espeak("en-us", 160)
    audio = Resampler(tts.rate, RATE)(np.concatenate(list(tts.synthesize(text))))
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024


async def wait_served(uri: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Until the server answers `describe` (both load their model first)."""
    from wyoming.info import Describe

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            async with AsyncClient.from_uri(uri, connect_timeout=1, read_timeout=5) as client:
                await client.write_event(Describe().event())
                if await client.read_event() is not None:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{uri} not serving; log: {log}"
        await asyncio.sleep(0.2)


async def transcribe(uri: str, pcm: bytes) -> tuple[float, str]:
    """(ms from audio-stop written to transcript received, text)."""
    async with AsyncClient.from_uri(uri, read_timeout=60) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        for i in range(0, len(pcm), CHUNK * 2):
            await client.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=pcm[i:i + CHUNK * 2]).event())
        started = time.perf_counter()
        await client.write_event(AudioStop().event())
        while True:
            event = await client.read_event()
            assert event is not None, "connection closed before the transcript"
            if Transcript.is_type(event.type):
                return (time.perf_counter() - started) * 1000, Transcript.from_event(event).text


async def first_audio(uri: str, question: str, streaming: bool) -> tuple[float, str]:
    """(ms from the question written to the first audio-chunk of the spoken answer, the answer)."""
    async with AsyncClient.from_uri(uri, read_timeout=120) as handle, \
            AsyncClient.from_uri(uri, read_timeout=120) as tts:
        started = time.perf_counter()
        await handle.write_event(Transcript(text=question, language="en").event())
        heard: list[float] = []

        async def audio() -> None:
            while True:
                event = await tts.read_event()
                assert event is not None and event.type != "error", event
                if AudioChunk.is_type(event.type):
                    heard.append(time.perf_counter())
                    return

        if streaming:
            await tts.write_event(SynthesizeStart().event())
            listening = asyncio.create_task(audio())
        while True:
            event = await handle.read_event()
            assert event is not None and event.type != "error", event
            if event.type == "handled-chunk" and streaming:
                await tts.write_event(SynthesizeChunk(text=event.data["text"]).event())
            elif Handled.is_type(event.type):
                answer = Handled.from_event(event).text or ""
                break
        if streaming:
            await tts.write_event(Synthesize(text=answer).event())
            await tts.write_event(SynthesizeStop().event())
            await listening
        else:
            await tts.write_event(Synthesize(text=answer).event())
            await audio()
        return (heard[0] - started) * 1000, answer


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


async def bench(ours: str, theirs: str, rounds: int, questions: int) -> dict:
    clips = [("beckett.wav (person, 10 s)", BECKETT, beckett())] + [(f"espeak-ng: {c}", c, spoken(c))
                                                                    for c in COMMANDS]
    for uri in (ours, theirs):  # first requests warm caches on both sides; not measured
        await transcribe(uri, clips[1][2])
    asr: dict[str, list[float]] = {"ours": [], "theirs": []}
    long: dict[str, list[float]] = {"ours": [], "theirs": []}  # beckett.wav alone: Whisper's full 30 s window
    errors = {"ours": [0, 0], "theirs": [0, 0]}
    for r in range(rounds):
        for i, (name, reference, pcm) in enumerate(clips):
            order = [("ours", ours), ("theirs", theirs)]
            if (r + i) % 2:
                order.reverse()
            row = {}
            for side, uri in order:
                ms, text = await transcribe(uri, pcm)
                asr[side].append(ms)
                if i == 0:
                    long[side].append(ms)
                e, n = word_errors(reference, text)
                errors[side][0] += e
                errors[side][1] += n
                row[side] = (ms, text)
            texts = repr(row["ours"][1]) + ("" if row["ours"][1] == row["theirs"][1] else f" / {row['theirs'][1]!r}")
            print(f"  asr {name[:34]:34s} ours {row['ours'][0]:6.0f} ms  theirs {row['theirs'][0]:6.0f} ms  | {texts}",
                  file=sys.stderr)
    handle: dict[str, list[float]] = {"streaming": [], "plain": []}
    for i, question in enumerate((QUESTIONS * 2)[:questions]):
        order = ["streaming", "plain"] if i % 2 == 0 else ["plain", "streaming"]
        row = {}
        for mode in order:
            # Words of its own in front: the daemon's llama.cpp cache would otherwise give the second asker of
            # the same prompt its prompt for free.
            asked = f"Question {i + 1}{mode[0]}: {question}"
            ms, answer = await first_audio(ours, asked, streaming=mode == "streaming")
            handle[mode].append(ms)
            row[mode] = ms
        print(f"  first audio {question[:34]:34s} streaming {row['streaming']:6.0f} ms  plain {row['plain']:6.0f} ms"
              f"  | {answer[:60]!r}", file=sys.stderr)
    ours_p50, theirs_p50 = median(asr["ours"]), median(asr["theirs"])
    streaming_p50, plain_p50 = median(handle["streaming"]), median(handle["plain"])
    return {"asr_ms_p50_ours": ours_p50, "asr_ms_p50_theirs": theirs_p50,
            "asr_ratio": round(ours_p50 / theirs_p50, 3), "asr_target_ratio": 1.0,
            "asr_ms_p50_ours_10s": median(long["ours"]), "asr_ms_p50_theirs_10s": median(long["theirs"]),
            "asr_wer_ours": round(errors["ours"][0] / errors["ours"][1], 3),
            "asr_wer_theirs": round(errors["theirs"][0] / errors["theirs"][1], 3),
            "asr_requests_per_side": len(asr["ours"]),
            "first_audio_ms_p50_streaming": streaming_p50, "first_audio_ms_p50_plain": plain_p50,
            "first_audio_ratio": round(streaming_p50 / plain_p50, 3), "questions": len(handle["plain"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="times each clip is transcribed by each server")
    parser.add_argument("--questions", type=int, default=6, help="questions for handle-to-first-audio")
    args = parser.parse_args()
    voice = VoiceConfig()
    threads = voice.asr_threads or min(os.cpu_count() or 1, 4)  # what our Recognizer uses
    workdir = Path(tempfile.mkdtemp(prefix="el-wyoming-bench-", dir="/tmp"))
    (workdir / "daemon.yaml").write_text(f"server: {{state_dir: {workdir / 'state'}}}\n"
                                         "generation: {temperature: 0.0}\n")
    (workdir / "wyoming.yaml").write_text("voice: {max_tokens: 60}\n")
    print(f"== daemon (embedded SmolLM2-135M, llama.cpp, greedy, safety on); Whisper {embedded_model()}, beam 1, "
          f"int8, {threads} threads", file=sys.stderr)
    daemon = DaemonProcess(workdir / "d.sock", ["--config", str(workdir / "daemon.yaml")], log=workdir / "d.log")
    procs: list[subprocess.Popen] = []
    try:
        daemon.wait_ready(timeout=180)
        ours_log = workdir / "ours.log"
        with open(ours_log, "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_llama", "wyoming", "--uri", "tcp://127.0.0.1:0", "--socket",
                 str(workdir / "d.sock"), "--config", str(workdir / "wyoming.yaml")],
                stdout=log, stderr=subprocess.STDOUT, env=ENV))
        port = free_port()
        theirs_log = workdir / "theirs.log"
        with open(theirs_log, "wb") as log:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "wyoming_faster_whisper", "--uri", f"tcp://127.0.0.1:{port}",
                 "--model", str(embedded_model()), "--data-dir", str(workdir / "models"), "--local-files-only",
                 "--stt-library", "faster-whisper", "--language", "en", "--beam-size", str(voice.asr_beam_size),
                 "--compute-type", voice.asr_compute_type, "--cpu-threads", str(threads), "--device", "cpu"],
                stdout=log, stderr=subprocess.STDOUT, env=ENV))
        deadline = time.monotonic() + 180
        while not (found := re.search(r"ready: Wyoming on (tcp://\S+)", ours_log.read_text())):
            assert procs[0].poll() is None and time.monotonic() < deadline, ours_log.read_text()[-2000:]
            time.sleep(0.1)
        ours, theirs = found.group(1), f"tcp://127.0.0.1:{port}"
        asyncio.run(wait_served(theirs, procs[1], theirs_log))
        load = os.getloadavg()[0]
        result = asyncio.run(bench(ours, theirs, args.rounds, args.questions))
        result.update(rss_mib_ours=round(rss_mib(procs[0].pid), 1), rss_mib_theirs=round(rss_mib(procs[1].pid), 1),
                      load_avg_1min=[round(load, 2), round(os.getloadavg()[0], 2)])
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)
        daemon.stop()
    print(f"== asr p50: ours {result['asr_ms_p50_ours']} ms, wyoming-faster-whisper {result['asr_ms_p50_theirs']} ms "
          f"(ratio {result['asr_ratio']}); first audio p50: streaming {result['first_audio_ms_p50_streaming']} ms, "
          f"plain {result['first_audio_ms_p50_plain']} ms", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
