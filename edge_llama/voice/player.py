"""What the assistant is saying: a queue of synthesized audio that an output pulls from, which can be cut at once.

Answers are spoken while they are generated: each sentence's audio is queued the moment TTS makes it, and the
output (a device thread on the wall clock, or the WAV writer on the virtual clock) pulls fixed blocks, getting
silence when nothing is queued. A barge-in calls stop(): the queue is emptied and its epoch advanced, so audio
of the interrupted answer that TTS is still making is dropped on arrival; the output goes silent at its next block.

The player also remembers how loud what it played was (for the echo gate) and when each answer's first sample went
out (voice-to-voice latency).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from edge_llama.voice.audio import Resampler, level_db

LEVEL_WINDOW_S = 0.3  # the echo gate compares the microphone with what was played this long before (room + buffers)


class Player:
    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.epoch = 0
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (turn id, samples at self.rate)
        self._cond = threading.Condition()
        self._levels: deque[tuple[float, float]] = deque()  # (time a block went out, its level in dBFS)
        self._started: set[int] = set()
        self.on_first_sample: Callable[[int, float], None] | None = None  # (turn id, when)
        self.played = 0  # samples of speech played, all turns

    # --- producer side (a turn's TTS) ---------------------------------------------------------------------------
    def resampler(self, rate: int) -> Resampler:
        return Resampler(rate, self.rate)

    def enqueue(self, turn: int, epoch: int, samples: np.ndarray) -> bool:
        """Queue audio of `turn`; False (dropped) when the player was stopped since `epoch` was read."""
        with self._cond:
            if epoch != self.epoch:
                return False
            if len(samples):
                self._chunks.append((turn, samples.astype(np.float32, copy=False)))
                self._cond.notify_all()
            return True

    def stop(self) -> bool:
        """Cut whatever is queued or playing, now. Returns whether anything was."""
        with self._cond:
            self.epoch += 1
            had = bool(self._chunks)
            self._chunks.clear()
            self._cond.notify_all()
            return had

    def notify(self) -> None:
        """Wake whoever waits in wait_audio (a turn ended without audio)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self._chunks)

    def wait_audio(self, timeout: float) -> bool:
        with self._cond:
            if not self._chunks:
                self._cond.wait(timeout)
            return bool(self._chunks)

    # --- consumer side (the output) -----------------------------------------------------------------------------
    def pull(self, n: int, now: float) -> np.ndarray:
        """The next n samples (silence where nothing is queued). `now` is the output's clock (wall or virtual)."""
        out = np.zeros(n, np.float32)
        filled = 0
        first: list[int] = []
        with self._cond:
            while filled < n and self._chunks:
                turn, chunk = self._chunks[0]
                take = min(n - filled, len(chunk))
                out[filled:filled + take] = chunk[:take]
                if turn not in self._started:
                    self._started.add(turn)
                    first.append(turn)
                filled += take
                if take == len(chunk):
                    self._chunks.popleft()
                else:
                    self._chunks[0] = (turn, chunk[take:])
            self.played += filled
            self._levels.append((now, level_db(out[:filled]) if filled else -120.0))
            while self._levels and self._levels[0][0] < now - LEVEL_WINDOW_S:
                self._levels.popleft()
        if self.on_first_sample:
            for turn in first:
                self.on_first_sample(turn, time.monotonic())
        return out

    def recent_level_db(self) -> float:
        """The loudest block played within LEVEL_WINDOW_S (of the output's clock) before the last one."""
        with self._cond:
            return max((level for _, level in self._levels), default=-120.0)
