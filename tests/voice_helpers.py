"""What the voice and Wyoming tests share: speech made with espeak-ng, the recording of a real person shipped in
a PyPI wheel (useful-moonshine-onnx's beckett.wav, 10 s, Samuel Beckett's "Ever tried. Ever failed..."), where
sound is in a recording, a status that records what the voice loop says, and a child process's output lines to
wait on."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import IO

import numpy as np

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in these tests may reach a model hub

from edge_llama.voice.audio import RATE, Resampler  # noqa: E402
from edge_llama.voice.text import SentenceSplitter  # noqa: E402
from edge_llama.voice.tts import Espeak  # noqa: E402

BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."
# One long sentence: its first clause is spoken while the rest is generated (30 ms a token), so a barge-in lands
# while the daemon is still generating, and the audio has no pause to hide the cut in.
LONG_REPLY = ("Paris is the capital of France and it lies on the river Seine, in the north of the country where "
              "millions of people live and work and visit the museums every single day of the year.")


@cache
def say(text: str, voice: str = "en-us", wpm: int = 175) -> np.ndarray:
    """espeak-ng speech at 16 kHz (what a microphone would give the voice loop)."""
    tts = Espeak(voice, wpm)
    return Resampler(tts.rate, RATE)(np.concatenate(list(tts.synthesize(text))))


def spoken_seconds(text: str, voice: str = "en-us", wpm: int = 175) -> float:
    """How long the default espeak-ng voice takes to say an answer, piece by piece as the loop speaks it."""
    tts = Espeak(voice, wpm)
    splitter = SentenceSplitter()
    pieces = splitter.feed(text) + splitter.flush()
    return sum(len(c) for p in pieces for c in tts.synthesize(p)) / tts.rate


def beckett_path() -> Path:
    spec = importlib.util.find_spec("moonshine_onnx")
    assert spec is not None and spec.submodule_search_locations, "tools/setup.sh installs useful-moonshine-onnx"
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "beckett.wav"


def voiced_spans(samples: np.ndarray, rate: int, gap_s: float = 0.3, threshold: float = 0.01) -> list[tuple]:
    """(start s, end s) of the stretches of sound separated by at least gap_s of near silence."""
    loud = np.nonzero(np.abs(samples) > threshold)[0]
    if not len(loud):
        return []
    spans, start, prev = [], loud[0], loud[0]
    for i in loud[1:]:
        if i - prev > gap_s * rate:
            spans.append((start / rate, prev / rate))
            start = i
        prev = i
    spans.append((start / rate, prev / rate))
    return spans


class Recorded:
    """A voice Status that keeps what was said and noted."""

    live = False

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def state(self, name: str, text: str = "") -> None:
        pass

    def said(self, who: str, text: str) -> None:
        self.lines.append((who, text))

    def note(self, text: str) -> None:
        self.lines.append(("note", text))


class Lines:
    """The lines a child process writes to a pipe, read by a thread, to wait on without timing guesses."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, check: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        """Until `check(lines so far)` holds; fails at the deadline or when the stream ends without it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self.lines):
                left = deadline - time.monotonic()
                assert left > 0 and not self._closed, ("not seen", self.lines[-20:])
                self._cond.wait(left)
            return list(self.lines)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "\n".join(self.lines) + "\n"


def wait_until(check: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll a state the test cannot be told about (a file growing, a daemon's counters) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.02)
