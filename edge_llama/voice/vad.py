"""Voice activity: Silero VAD (the ONNX file faster-whisper ships, run with onnxruntime) and the endpointer that
turns per-frame speech probabilities into utterances.

Silero v6 takes 512 new samples at 16 kHz (32 ms) plus the previous 64 as context, and carries an LSTM state
(h, c) from frame to frame; streaming it frame by frame gives the same probabilities as faster-whisper's batched
call (to 1e-3). One frame costs ~0.2 ms on one core.
"""

from __future__ import annotations

import os
from enum import Enum

import numpy as np

from edge_llama.errors import ModelError
from edge_llama.voice.audio import FRAME_S

CONTEXT = 64  # samples of the previous frame Silero sees with each new one


def silero_path() -> str:
    """The Silero VAD ONNX inside the installed faster-whisper (found without importing faster_whisper, which
    would load PyAV and CTranslate2)."""
    import importlib.util

    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("voice support is not installed (faster-whisper ships the VAD): "
                         "pip install 'edge-llama[voice]'")
    assets = os.path.join(list(spec.submodule_search_locations)[0], "assets")
    names = sorted(n for n in os.listdir(assets) if n.startswith("silero_vad") and n.endswith(".onnx"))
    if not names:
        raise ModelError(f"no Silero VAD model in {assets}")
    return os.path.join(assets, names[-1])


class SileroVad:
    """Speech probability of each 512-sample frame, in order (it keeps state: one instance per stream)."""

    def __init__(self, path: str | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ModelError("voice support needs onnxruntime: pip install 'edge-llama[voice]'") from None
        self.path = path or silero_path()
        options = onnxruntime.SessionOptions()
        # One thread: a frame is tiny, and the cores belong to ASR and the daemon.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        options.log_severity_level = 4
        try:
            self.session = onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise ModelError(f"cannot load the VAD model {self.path}: {str(exc).splitlines()[0]}") from None
        self.reset()

    def reset(self) -> None:
        self._h = np.zeros((1, 1, 128), np.float32)
        self._c = np.zeros((1, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        x = np.concatenate([self._context, frame.astype(np.float32, copy=False)])[None, :]
        out, self._h, self._c = self.session.run(None, {"input": x, "h": self._h, "c": self._c})
        self._context = frame[-CONTEXT:].astype(np.float32, copy=False)
        return float(np.ravel(out)[0])


class Event(Enum):
    START = "start"  # speech began (after `start_frames` speech frames in a row)
    PAUSE = "pause"  # speech stopped for a moment: a good time to start recognizing what was said so far
    RESUME = "resume"  # it went on before the hangover ran out
    END = "end"  # the utterance is over: `utterance()` holds it
    DISCARD = "discard"  # it was too short to be speech (a click, a cough)


class Endpointer:
    """Frames in, utterance boundaries out. Keeps `preroll_ms` of audio from before the start (Silero reacts a
    frame or two after the onset, and Whisper wants the first phoneme whole)."""

    def __init__(self, hangover_ms: int, min_speech_ms: int, max_utterance_s: float, preroll_ms: int = 200,
                 pause_ms: int = 96) -> None:
        self.hangover = max(1, round(hangover_ms / 1000 / FRAME_S))
        self.min_speech = round(min_speech_ms / 1000 / FRAME_S)
        self.max_frames = int(max_utterance_s / FRAME_S)
        self.preroll = round(preroll_ms / 1000 / FRAME_S)
        # A pause this long (3 frames) is worth a speculative recognition; the gaps between words are shorter.
        self.pause = min(max(1, round(pause_ms / 1000 / FRAME_S)), self.hangover)
        self.reset()

    def reset(self) -> None:
        self.state = "idle"  # idle | speech | trailing
        self._frames: list[np.ndarray] = []
        self._run = 0  # speech frames in a row (idle), silent frames in a row (trailing)
        self._speech_frames = 0
        self._paused = False

    @property
    def active(self) -> bool:
        return self.state != "idle"

    def push(self, frame: np.ndarray, speech: bool, start_frames: int = 1) -> Event | None:
        if self.state == "idle":
            self._frames.append(frame)
            del self._frames[:-(self.preroll + start_frames)]
            self._run = self._run + 1 if speech else 0
            if self._run >= start_frames:
                self.state, self._speech_frames, self._run = "speech", self._run, 0
                return Event.START
            return None
        self._frames.append(frame)
        if speech:
            self._speech_frames += 1
            resumed = self.state == "trailing" and self._paused
            self.state, self._run, self._paused = "speech", 0, False
            if len(self._frames) >= self.max_frames:
                return self._end()
            return Event.RESUME if resumed else None
        self.state = "trailing"
        self._run += 1
        if self._run >= self.hangover or len(self._frames) >= self.max_frames:
            return self._end()
        if self._run == self.pause:
            self._paused = True
            return Event.PAUSE
        return None

    def audio(self) -> np.ndarray:
        """The utterance so far (preroll included)."""
        return np.concatenate(self._frames) if self._frames else np.zeros(0, np.float32)

    def _end(self) -> Event:
        long_enough = self._speech_frames >= self.min_speech
        self._utterance = self.audio()
        self.state, self._frames, self._run, self._paused = "idle", [], 0, False
        return Event.END if long_enough else Event.DISCARD

    def utterance(self) -> np.ndarray:
        return self._utterance
