"""Wyoming's wire format read with limits, and the PCM audio it carries.

An event is a JSON header line (`type`, `data`, `data_length`, `payload_length`), then `data_length` bytes of JSON
merged into `data`, then `payload_length` bytes of payload (wyoming 1.10, wyoming/event.py `async_read_event`).
The package's own reader reads whatever lengths a header announces; this one refuses a header that announces more
than the configured limits before reading any of it, so one connection's memory stays bounded. A header that is
not valid JSON is reported and skipped (the framing is intact: nothing after it was announced); one whose data
block is not JSON is skipped whole (its lengths were read). Lengths over the limits, or a header line longer than
the stream's limit (asyncio's 64 KiB), leave no way to find the next event: those end the connection.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from edge_llama.voice.audio import pcm_to_float

# Formats the ASR side takes: PCM of 1 (unsigned), 2, 3 or 4 (signed little-endian) bytes per sample.
WIDTHS = (1, 2, 3, 4)
MAX_CHANNELS = 8
MIN_RATE, MAX_RATE = 8000, 192000  # Hz: below 8 kHz there is no speech Whisper recognizes
OUT_SAMPLES = 1024  # samples per audio-chunk sent (46 ms at espeak-ng's 22050 Hz; wyoming-piper sends 1024 too)


class BadEvent(Exception):
    """Input the client should be told about (`code` and `text` go into a Wyoming `error` event). `fatal`: the
    stream cannot be read on from here, the connection is closed after the error."""

    def __init__(self, code: str, text: str, fatal: bool = False) -> None:
        super().__init__(text)
        self.code, self.text, self.fatal = code, text, fatal


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadEvent("bad_event", f"'{key}' must be a whole number of bytes; got {value!r}", fatal=True)
    if value > limit:
        raise BadEvent("too_large", f"'{key}' {value} is over the limit of {limit} bytes "
                       "(wyoming.max_payload_bytes); closing the connection", fatal=True)
    return value


async def read_event(reader: asyncio.StreamReader, max_bytes: int) -> tuple[str, dict[str, Any], bytes] | None:
    """(type, data, payload) of the next event; None at the end of the stream (or a connection cut mid-event)."""
    try:
        line = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, re-raised by readline: no newline within the limit
        raise BadEvent("too_large", "event header line over 64 KiB; closing the connection", fatal=True) from None
    if not line:
        return None
    try:
        header = json.loads(line)
    except ValueError:
        raise BadEvent("bad_event", "event header is not JSON: " + line[:80].decode("utf-8", "replace")) from None
    if not isinstance(header, dict):
        raise BadEvent("bad_event", "event header must be a JSON object")
    data_length = _length(header, "data_length", max_bytes)
    payload_length = _length(header, "payload_length", max_bytes)
    try:
        extra = await reader.readexactly(data_length) if data_length else b""
        payload = await reader.readexactly(payload_length) if payload_length else b""
    except asyncio.IncompleteReadError:
        return None
    data = header.get("data") or {}
    if not isinstance(data, dict):
        raise BadEvent("bad_event", "event 'data' must be a JSON object")
    if extra:
        try:
            more = json.loads(extra)
        except ValueError:
            raise BadEvent("bad_event", "event data block is not JSON") from None
        if not isinstance(more, dict):
            raise BadEvent("bad_event", "event data block must be a JSON object")
        data.update(more)
    kind = header.get("type")
    if not isinstance(kind, str) or not kind:
        raise BadEvent("bad_event", "event without a 'type'")
    return kind, data, payload


# --- PCM ------------------------------------------------------------------------------------------------------------
class AudioFormat:
    """rate/width/channels as a client announced them, checked (an unsupported one raises BadEvent)."""

    def __init__(self, data: dict[str, Any]) -> None:
        values = []
        for key in ("rate", "width", "channels"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadEvent("audio_format", f"audio '{key}' must be a whole number; got {value!r}")
            values.append(value)
        self.rate, self.width, self.channels = values
        if self.width not in WIDTHS:
            raise BadEvent("audio_format", f"audio width {self.width} is not supported (bytes per sample: "
                           f"{', '.join(map(str, WIDTHS))})")
        if not 1 <= self.channels <= MAX_CHANNELS:
            raise BadEvent("audio_format", f"audio channels {self.channels} is not supported (1 to {MAX_CHANNELS})")
        if not MIN_RATE <= self.rate <= MAX_RATE:
            raise BadEvent("audio_format", f"audio rate {self.rate} Hz is not supported ({MIN_RATE} to {MAX_RATE})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AudioFormat) and (self.rate, self.width, self.channels) == (
            other.rate, other.width, other.channels)

    def __str__(self) -> str:
        return f"{self.rate} Hz, {self.width * 8}-bit, {self.channels} channel(s)"

    def decode(self, pcm: bytes) -> np.ndarray:
        """Mono float32 in [-1, 1] (channels averaged) of whole frames of PCM."""
        frame = self.width * self.channels
        if len(pcm) % frame:
            raise BadEvent("audio_format", f"an audio chunk of {len(pcm)} bytes is not whole frames of {frame} bytes "
                           f"({self})")
        return pcm_to_float(pcm, self.width, self.channels)


def encode_s16(samples: np.ndarray) -> list[bytes]:
    """16-bit little-endian PCM of float samples, in pieces of OUT_SAMPLES (one audio-chunk each)."""
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    return [pcm[i:i + OUT_SAMPLES].tobytes() for i in range(0, len(pcm), OUT_SAMPLES)]
