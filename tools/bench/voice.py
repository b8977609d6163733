"""Voice-to-voice latency: from the end of the user's speech to the first sample of the spoken answer.

A real daemon (the embedded SmolLM2-135M on llama.cpp, daemon defaults: safety on) answers; this process is the
voice process (Silero VAD, Whisper tiny.en, espeak-ng, player), so its resident memory is the voice side's. The
microphone is a wall-clock source fed with espeak-ng questions (en-us, 160 wpm): each question comes after the
previous answer has been spoken, as a person would ask. The output is a wall-clock sink that discards samples;
"first output sample" is when the output thread takes it from the player (a device adds its buffer, ~10-20 ms).

The end of speech is exact: the last sample of the question above -50 dBFS (the source knows when it "recorded"
it). Per question, the latency splits into:
  hangover        end of speech -> endpoint (Silero noticing the silence + voice.hangover_ms)
  asr             endpoint -> transcript (what is left of ASR after the endpoint: it starts at the first pause)
  ttft            transcript -> first token from the daemon (request, queue, prompt, the safety window)
  first_sentence  first token -> first speakable piece (a sentence, or a long first sentence's first clause)
  tts             first piece -> first sample out (synthesis, queueing, the output's next 10 ms block)

    .venv/bin/python tools/bench/voice.py [--questions 12] [--hangover-ms 300] [--max-tokens 40]

Last line: one JSON object (milliseconds; medians over the questions; rss_mib of this process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from edge_llama.config import VoiceConfig  # noqa: E402
from edge_llama.launch import DaemonProcess  # noqa: E402
from edge_llama.voice.answer import Conversation, Turn  # noqa: E402
from edge_llama.voice.asr import Recognizer  # noqa: E402
from edge_llama.voice.audio import FRAME, RATE, ArrayCapture, OutputDriver, Resampler  # noqa: E402
from edge_llama.voice.loop import VoiceLoop  # noqa: E402
from edge_llama.voice.player import Player  # noqa: E402
from edge_llama.voice.tts import Espeak  # noqa: E402
from edge_llama.voice.vad import SileroVad  # noqa: E402

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "What color is the sky?",
             "Name a fruit that is yellow.", "What is two plus two?", "Who wrote Romeo and Juliet?",
             "What is the boiling point of water?", "How many days are in a week?", "What is the largest planet?",
             "Tell me a fun fact about cats.", "What language is spoken in Spain?", "Why is the sea salty?",
             "What do bees make?", "How far away is the moon?", "What is the opposite of hot?",
             "Which animal is known as the king of the jungle?"]
PARTS = ["hangover", "asr", "ttft", "first_sentence", "tts"]
MARKS = ["end", "endpoint", "asr", "first_token", "first_piece", "first_sample"]


class QuietStatus:
    live = False

    def state(self, name: str, text: str = "") -> None:
        pass

    def said(self, who: str, text: str) -> None:
        print(f"  {who}: {text}", file=sys.stderr)

    def note(self, text: str) -> None:
        print(f"  [{text}]", file=sys.stderr)


def rss_mib(pid: int | str = "self") -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--hangover-ms", type=int, default=VoiceConfig.hangover_ms)
    parser.add_argument("--max-tokens", type=int, default=40, help="answer length (the latency does not depend on "
                        "it; shorter answers make the run shorter)")
    parser.add_argument("--no-safety", action="store_true", help="daemon with its safety guard off (the output "
                        "guard holds text back by safety.window_tokens: this shows what that costs)")
    args = parser.parse_args()
    config = dataclasses.replace(VoiceConfig(), hangover_ms=args.hangover_ms, max_tokens=args.max_tokens,
                                 partial_transcripts=False)
    workdir = Path(tempfile.mkdtemp(prefix="el-voice-bench-", dir="/tmp"))
    sock = workdir / "d.sock"
    daemon_args = ["--state-dir", str(workdir / "state")]
    if args.no_safety:
        (workdir / "config.yaml").write_text("safety: {enabled: false}\n")
        daemon_args += ["--config", str(workdir / "config.yaml")]
    print(f"== starting the daemon (embedded SmolLM2-135M, llama.cpp, safety {'off' if args.no_safety else 'on'})",
          file=sys.stderr)
    daemon = DaemonProcess(sock, daemon_args, log=workdir / "daemon.log")
    try:
        daemon.wait_ready(timeout=120)
        return run(config, sock, args.questions, daemon.proc.pid, safety=not args.no_safety)
    finally:
        daemon.stop()


def run(config: VoiceConfig, sock: Path, count: int, daemon_pid: int, safety: bool) -> int:
    tts = Espeak("en-us", 160)
    speaker = Resampler(tts.rate, RATE)
    questions = [speaker(np.concatenate(list(tts.synthesize(q)))) for q in (QUESTIONS * 2)[:count]]
    tts = Espeak(config.espeak_voice, config.speech_rate_wpm)
    recognizer = Recognizer(config)
    player = Player(tts.rate)
    status = QuietStatus()
    conversation = Conversation(sock, config, status)
    conversation.wait_ready()
    ends: list[int] = []  # sample index (of the capture) where each question's speech ends
    results: list[dict[str, float]] = []
    loop: VoiceLoop | None = None

    def microphone() -> Iterator[np.ndarray]:
        silence = np.zeros(FRAME, np.float32)
        for question in questions:
            for _ in range(int(0.6 * RATE / FRAME)):
                yield silence
            assert loop is not None
            start = loop.capture.samples  # type: ignore[attr-defined]
            voiced = np.nonzero(np.abs(question) > 10 ** (-50 / 20))[0]
            ends.append(start + int(voiced[-1]) + 1)
            yield question
            while len(results) < len(ends):  # wait (in silence) until the answer has been spoken
                yield silence
        for _ in range(int(0.3 * RATE / FRAME)):
            yield silence

    def on_turn(turn: Turn) -> None:
        assert loop is not None
        capture: ArrayCapture = loop.capture  # type: ignore[assignment]
        marks = dict(turn.times, end=capture.time_of(ends[len(results)]))
        if not all(m in marks for m in MARKS):
            print(f"  (question {len(results) + 1}: no answer: {turn.error or turn.finish})", file=sys.stderr)
            results.append({})
            return
        parts = {name: (marks[b] - marks[a]) * 1000 for name, a, b in zip(PARTS, MARKS[:-1], MARKS[1:], strict=True)}
        parts["total"] = (marks["first_sample"] - marks["end"]) * 1000
        results.append(parts)
        print("  " + "  ".join(f"{k} {v:6.0f}" for k, v in parts.items()), file=sys.stderr)

    capture = ArrayCapture(microphone(), realtime=True)
    driver = OutputDriver(player.rate)  # discards: the benchmark measures up to the output, not a device
    loop = VoiceLoop(config, capture, player, recognizer, tts, conversation, status, vad=SileroVad(),
                     on_turn=on_turn)
    driver.start(player.pull)
    started, load = time.monotonic(), os.getloadavg()[0]
    try:
        loop.run()
    finally:
        loop.stop()
        driver.close()
        conversation.forget()
    measured = [r for r in results if r]
    if len(measured) < 10:
        print(f"only {len(measured)} questions answered", file=sys.stderr)
    summary: dict[str, object] = {name: round(statistics.median(r[name] for r in measured), 1)
                                  for name in [*PARTS, "total"]}
    rss, peak = rss_mib()
    daemon_rss, _ = rss_mib(daemon_pid)
    print(f"== {len(measured)} questions in {time.monotonic() - started:.0f} s; medians (ms): "
          + ", ".join(f"{k} {v}" for k, v in summary.items()), file=sys.stderr)
    print(f"== voice process: {rss:.0f} MiB resident (peak {peak:.0f}); daemon {daemon_rss:.0f} MiB", file=sys.stderr)
    result = {"voice_to_voice_ms_p50": summary.pop("total"), **{f"{k}_ms_p50": v for k, v in summary.items()},
              "voice_to_voice_ms_max": round(max(r["total"] for r in measured), 1),
              "questions": len(measured), "hangover_ms": config.hangover_ms, "rss_mib": round(rss, 1),
              "rss_peak_mib": round(peak, 1), "daemon_rss_mib": round(daemon_rss, 1), "daemon_safety": safety,
              "load_avg_1min": [round(load, 2), round(os.getloadavg()[0], 2)], "target_ms": 1000}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
