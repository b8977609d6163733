"""Text to speech: Piper when voice.tts_voice names a Piper voice, otherwise espeak-ng.

espeak-ng is called as a library (ctypes), not as a program: Debian's libespeak-ng.so.1 when installed, else the
copy shipped in the `espeakng-loader` wheel with its data. It is fast enough that a sentence is synthesized whole
(3.4 s of speech in ~7 ms on one core here) before its first chunk is queued; a cancelled answer stops synthesis at
espeak-ng's next 50 ms callback. Piper (neural, better sounding, ~10x slower) yields audio per sentence.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_llama.config import VoiceConfig
from edge_llama.errors import ModelError

# espeak-ng's C API (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_RATE = 1  # espeakRATE parameter: words per minute
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_BUFFER_MS = 50  # espeak-ng's callback delivers audio in pieces this long


class _EspeakVoice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


def _set_voice(lib: ctypes.CDLL, voice: str) -> bool:
    """By voice name or file ("en-us", "en-us+f3"), else by language ("en-gb" is the language of the file "en")."""
    if lib.espeak_SetVoiceByName(voice.encode()) == 0:
        return True
    spec = _EspeakVoice(languages=voice.split("+")[0].encode())
    return bool(lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) == 0)


class Tts:
    """synthesize(text, stop) yields float32 chunks at `rate`; `stop()` returning True ends it early."""

    rate: int
    name: str

    def synthesize(self, text: str, stop: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
        raise NotImplementedError


def _espeak_library() -> tuple[ctypes.CDLL, str | None]:
    """(library, data folder or None for the library's built-in one): Debian's first, then the wheel's."""
    for name in ("libespeak-ng.so.1", ctypes.util.find_library("espeak-ng")):
        if name:
            with contextlib.suppress(OSError):
                return ctypes.CDLL(name), None
    try:
        import espeakng_loader
    except ImportError:
        raise ModelError("no espeak-ng for speech output: apt install espeak-ng, or pip install espeakng-loader, "
                         "or set voice.tts_voice to a Piper voice") from None
    try:
        return ctypes.CDLL(espeakng_loader.get_library_path()), espeakng_loader.get_data_path()
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"cannot load espeak-ng from espeakng-loader: {exc}") from None


class Espeak(Tts):
    # espeak-ng keeps global state: one synthesis at a time in a process.
    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None
    _rate = 0

    def __init__(self, voice: str = "en-us", wpm: int = 175) -> None:
        cls = type(self)
        with cls._lock:
            if cls._lib is None:
                lib, data = _espeak_library()
                lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
                lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                             ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
                lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
                rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS,
                                             data.encode() if data else None, _INITIALIZE_DONT_EXIT)
                if rate <= 0:
                    raise ModelError("espeak-ng failed to start (its data folder is missing?)")
                cls._lib, cls._rate = lib, rate
        self.rate = cls._rate
        self.voice, self.wpm = voice, wpm
        self.name = f"espeak-ng {voice}"
        with cls._lock:
            if not _set_voice(cls._lib, voice):
                raise ModelError(f"espeak-ng has no voice {voice!r} (voice.espeak_voice; list: espeak-ng --voices)")

    def synthesize(self, text: str, stop: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
        """The whole sentence is synthesized in one call (~2 ms per second of speech); chunks are yielded after."""
        chunks: list[np.ndarray] = []

        def on_audio(wav: Any, count: int, _events: Any) -> int:
            if count > 0 and wav:
                chunks.append(np.ctypeslib.as_array(wav, shape=(count,)).astype(np.float32) / 32768)
            return 1 if stop() else 0  # 1 tells espeak-ng to abort

        callback = _SYNTH_CALLBACK(on_audio)
        data = text.encode("utf-8")
        lib = type(self)._lib
        assert lib is not None
        with type(self)._lock:
            lib.espeak_SetSynthCallback(callback)
            _set_voice(lib, self.voice)
            lib.espeak_SetParameter(_RATE, self.wpm, 0)
            lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None)
        yield from chunks


class Piper(Tts):
    """A Piper voice: an .onnx model with its .onnx.json config beside it (operator-supplied)."""

    def __init__(self, model: str, use_cuda: bool = False) -> None:
        path = Path(model).expanduser()
        config = Path(f"{path}.json")
        if not path.is_file():
            raise ModelError(f"voice.tts_voice: no such Piper voice {path}")
        if not config.is_file():
            raise ModelError(f"voice.tts_voice: the voice's config {config} is missing (Piper voices come as "
                             ".onnx + .onnx.json)")
        try:
            from piper import PiperVoice
        except ImportError:
            raise ModelError("voice.tts_voice needs Piper: pip install 'edge-llama[piper]'") from None
        try:
            self.voice = PiperVoice.load(str(path), str(config), use_cuda=use_cuda)
        except Exception as exc:  # onnxruntime, JSON and key errors from a broken voice
            raise ModelError(f"cannot load the Piper voice {path}: {str(exc).splitlines()[0]}") from None
        self.rate = int(self.voice.config.sample_rate)
        self.name = f"Piper {path.stem}"
        self._lock = threading.Lock()

    def synthesize(self, text: str, stop: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
        with self._lock:  # one onnxruntime session: one sentence at a time
            for chunk in self.voice.synthesize(text):  # one chunk per sentence Piper finds
                if stop():
                    return
                yield chunk.audio_float_array.astype(np.float32, copy=False)


def load_tts(config: VoiceConfig) -> Tts:
    if config.tts_voice:
        return Piper(config.tts_voice)
    return Espeak(config.espeak_voice, config.speech_rate_wpm)
