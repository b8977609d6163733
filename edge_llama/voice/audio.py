"""Sound in and out: PortAudio devices through sounddevice, WAV files, resampling, and ALSA file devices.

Everything inside the voice package runs at 16 kHz mono float32 on the way in (Whisper's and Silero's rate), cut
into 32 ms frames of 512 samples (Silero's window). Output runs at the TTS voice's rate when the device takes it.

Live sources and sinks run on the wall clock. Real devices pace themselves (a blocking read waits for the
hardware); ALSA's `file`/`null` plugins return at once, so each stream is also held to the wall clock by a
_Pacer: the same code then runs on a sound card and on the file-backed devices the tests and the benchmark use.
WAV files (`--input-wav`/`--output-wav`) run on a virtual clock instead: samples are time, see loop.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import threading
import time
import wave
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_llama.errors import EdgeLlamaError

RATE = 16000  # Hz: what Silero VAD and Whisper take
FRAME = 512  # samples per VAD frame at 16 kHz = 32 ms
FRAME_S = FRAME / RATE
MIN_FILE_RATE = 8000  # Hz: below this a WAV file cannot carry speech that Whisper recognizes


class AudioError(EdgeLlamaError):
    """A device that cannot be opened or found, a WAV file that cannot be read."""

    code = "audio"
    exit_code = 2


def level_db(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-120 for silence)."""
    if not len(samples):
        return -120.0
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    return 20 * math.log10(rms) if rms > 1e-6 else -120.0


# --- resampling ----------------------------------------------------------------------------------------------------
class Resampler:
    """Streaming sample-rate conversion for speech: a windowed-sinc low-pass below the lower Nyquist frequency, then
    linear interpolation. Good enough for ASR and for a voice (no audible aliasing); state carries across chunks."""

    TAPS = 31

    def __init__(self, rate_in: int, rate_out: int) -> None:
        self.rate_in, self.rate_out = rate_in, rate_out
        self.step = rate_in / rate_out  # input samples per output sample
        cutoff = 0.45 * min(rate_in, rate_out) / rate_in  # cycles per input sample
        n = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        taps = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(self.TAPS)
        self.taps = (taps / taps.sum()).astype(np.float32)
        self._history = np.zeros(self.TAPS - 1, np.float32)
        self._pos = 0.0  # position of the next output sample, in input samples from the buffer start
        self._tail = np.zeros(0, np.float32)

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        if self.rate_in == self.rate_out:
            return chunk.astype(np.float32, copy=False)
        data = np.concatenate([self._history, chunk.astype(np.float32, copy=False)])
        filtered = np.convolve(data, self.taps, mode="valid") if self.rate_out < self.rate_in else data[len(
            self._history):]
        self._history = data[-(self.TAPS - 1):]
        x = np.concatenate([self._tail, filtered])
        if len(x) < 2:
            self._tail = x
            return np.zeros(0, np.float32)
        positions = np.arange(self._pos, len(x) - 1, self.step)
        out = np.interp(positions, np.arange(len(x)), x).astype(np.float32)
        next_pos = (positions[-1] + self.step) if len(positions) else self._pos
        keep = int(next_pos)
        self._tail, self._pos = x[keep:], next_pos - keep
        return out


def frames_of(samples: np.ndarray) -> Iterator[np.ndarray]:
    """16 kHz samples as 512-sample frames; a short last frame is padded with silence."""
    for start in range(0, len(samples), FRAME):
        frame = samples[start:start + FRAME]
        if len(frame) < FRAME:
            frame = np.concatenate([frame, np.zeros(FRAME - len(frame), np.float32)])
        yield frame


# --- WAV files -----------------------------------------------------------------------------------------------------
def read_wav(path: str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """A PCM WAV file as mono float32 in [-1, 1] and its rate. Raises AudioError with one clear line."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate, count = w.getsampwidth(), w.getnchannels(), w.getframerate(), w.getnframes()
            raw = w.readframes(count)
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except (wave.Error, EOFError) as exc:
        raise AudioError(f"{path}: not a PCM WAV file ({exc})") from None
    except OSError as exc:
        raise AudioError(f"{path}: cannot read it ({exc.strerror})") from None
    return pcm_to_float(raw, width, channels), rate


def pcm_to_float(raw: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian PCM (1 byte: unsigned; 2, 3, 4 bytes: signed) as mono float32 in [-1, 1], the
    channels averaged. `raw` holds whole frames (width * channels bytes each)."""
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        samples = (((b[:, 2] << 24) | (b[:, 1] << 16) | (b[:, 0] << 8)) >> 8).astype(np.float32) / 8388608
    else:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1)
    return samples.astype(np.float32, copy=False)


def read_speech_wav(path: str | os.PathLike[str]) -> np.ndarray:
    """A WAV file at 16 kHz mono for recognition; any rate from 8 kHz up is converted."""
    samples, rate = read_wav(path)
    if rate < MIN_FILE_RATE or rate > 384000:
        raise AudioError(f"{path}: sample rate {rate} Hz is not supported (speech needs {MIN_FILE_RATE} Hz or more)")
    return Resampler(rate, RATE)(samples) if rate != RATE else samples


class WavWriter:
    """16-bit mono WAV written as it goes (so a file is valid up to the last block even after a crash)."""

    def __init__(self, path: str | os.PathLike[str], rate: int) -> None:
        try:
            self._w = wave.open(str(path), "wb")
        except OSError as exc:
            raise AudioError(f"{path}: cannot write it ({exc.strerror})") from None
        self._w.setnchannels(1)
        self._w.setsampwidth(2)
        self._w.setframerate(rate)
        self.rate = rate
        self.samples = 0

    def write(self, samples: np.ndarray) -> None:
        self._w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
        self.samples += len(samples)

    def close(self) -> None:
        self._w.close()


def write_wav(path: str | os.PathLike[str], samples: np.ndarray, rate: int) -> None:
    writer = WavWriter(path, rate)
    writer.write(samples)
    writer.close()


# --- PortAudio -----------------------------------------------------------------------------------------------------
_ALSA_HANDLER: Any = None


def sounddevice() -> Any:
    """The sounddevice module, with ALSA's own error printing silenced (it writes 'ALSA lib pcm.c: ...' lines to
    stderr for every device it probes; our errors say what matters in one line)."""
    global _ALSA_HANDLER
    if _ALSA_HANDLER is None:
        with contextlib.suppress(OSError):
            asound = ctypes.CDLL("libasound.so.2")
            handler_type = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                            ctypes.c_char_p)
            _ALSA_HANDLER = handler_type(lambda *args: None)  # kept referenced: ALSA calls it later
            asound.snd_lib_error_set_handler(_ALSA_HANDLER)
    try:
        import sounddevice as sd
    except OSError:
        raise AudioError("sounddevice needs the PortAudio library: apt install libportaudio2") from None
    except ImportError:
        raise AudioError("voice support is not installed: pip install 'edge-llama[voice]'") from None
    return sd


def list_devices() -> str:
    sd = sounddevice()
    devices = sd.query_devices()
    if not len(devices):
        return "no audio devices (PortAudio finds none)"
    default_in, default_out = sd.default.device
    lines = []
    for i, d in enumerate(devices):
        mark = ("<" if i == default_in else " ") + (">" if i == default_out else " ")
        lines.append(f"{mark} {i:3d} {d['name']}  (in {d['max_input_channels']}, out {d['max_output_channels']}, "
                     f"{d['default_samplerate']:.0f} Hz, {sd.query_hostapis(d['hostapi'])['name']})")
    lines.append("< default input, > default output")
    return "\n".join(lines)


def resolve_device(spec: int | str | None, kind: str) -> int:
    """A device index from an index, a name (exact, else a unique part of one), or None for the default."""
    sd = sounddevice()
    devices = sd.query_devices()
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    usable = [i for i, d in enumerate(devices) if d[key] > 0]
    hint = "see: edge-llama voice --list-devices" + ("; or use --input-wav FILE" if kind == "input" else "")
    if spec is None:
        index = sd.default.device[0 if kind == "input" else 1]
        if index is None or index < 0 or index not in usable:
            if not usable:
                raise AudioError(f"no audio {kind} device (PortAudio finds none; {hint})")
            index = usable[0]
        return int(index)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        index = int(spec)
        if index not in usable:
            raise AudioError(f"audio device {index} is not an {kind} device ({hint})")
        return index
    exact = [i for i in usable if devices[i]["name"] == spec]
    partial = [i for i in usable if spec.lower() in devices[i]["name"].lower()]
    found = exact or partial
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise AudioError(f"{what} {kind} device matches {spec!r} ({hint})")
    return found[0]


def _open_rate(sd: Any, index: int, kind: str, wanted: int | None, preferred: int) -> int:
    """The rate to open a device at: `wanted` if set, else `preferred` if the device takes it, else its default."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    name = sd.query_devices(index)["name"]
    default = int(sd.query_devices(index)["default_samplerate"])
    for rate in ([wanted] if wanted else [preferred, default]):
        try:
            check(device=index, samplerate=rate, channels=1, dtype="int16")
            return rate
        except Exception:  # sounddevice raises PortAudioError or ValueError for a rate the device refuses
            continue
    tried = f"{wanted} Hz" if wanted else f"{preferred} Hz or its default {default} Hz"
    raise AudioError(f"{kind} device {name!r} does not take {tried} (mono)")


class _Pacer:
    """Holds a stream to the wall clock when the device does not (see the module docstring). When a device call
    blocked, the device is the clock and the schedule is re-anchored to it."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.start: float | None = None
        self.count = 0

    def done(self, frames: int, blocked_s: float) -> None:
        now = time.monotonic()
        self.count += frames
        if self.start is None or blocked_s > 0.002:
            self.start = now - self.count / self.rate
            return
        ahead = self.start + self.count / self.rate - now
        if ahead > 0.001:
            time.sleep(ahead)


# --- capture -------------------------------------------------------------------------------------------------------
class Capture:
    """16 kHz frames from somewhere. `virtual`: samples are the clock (a file), not the wall clock."""

    virtual = False

    def start(self) -> None:
        pass

    def read(self) -> np.ndarray | None:  # a 512-sample frame, None at the end
        raise NotImplementedError

    def close(self) -> None:
        pass


class DeviceCapture(Capture):
    """A microphone through sounddevice: a thread reads blocks, converts them to 16 kHz and queues 32 ms frames."""

    def __init__(self, device: int | str | None, rate: int | None = None) -> None:
        sd = sounddevice()
        self.index = resolve_device(device, "input")
        self.name = sd.query_devices(self.index)["name"]
        self.rate = _open_rate(sd, self.index, "input", rate, RATE)
        self.block = int(self.rate * FRAME_S)
        try:
            # 16-bit: every device takes it (PortAudio converts), and file-backed devices hold plain PCM.
            self.stream = sd.InputStream(device=self.index, samplerate=self.rate, channels=1, dtype="int16",
                                         blocksize=self.block, latency="low")
        except Exception as exc:  # PortAudioError
            raise AudioError(f"cannot open input device {self.name!r}: {exc}") from None
        self._resample = Resampler(self.rate, RATE)
        # Bounded: a loop that stalls must not grow memory; a real device overruns the same way.
        self._frames: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=int(30 / FRAME_S))
        self._running = True
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="voice-capture", daemon=True)

    def start(self) -> None:
        """Start recording (opening is separate so that a bad device fails before the models load, and recording
        starts with the loop, not seconds of backlog before it)."""
        try:
            self.stream.start()
        except Exception as exc:  # PortAudioError
            raise AudioError(f"cannot start input device {self.name!r}: {exc}") from None
        self._thread.start()

    def _run(self) -> None:
        pacer, pending = _Pacer(self.rate), np.zeros(0, np.float32)
        try:
            while self._running:
                started = time.monotonic()
                data, _overflowed = self.stream.read(self.block)
                pacer.done(len(data), time.monotonic() - started)
                samples = data[:, 0].astype(np.float32) / 32768
                pending = np.concatenate([pending, self._resample(samples)])
                while len(pending) >= FRAME:
                    frame, pending = pending[:FRAME], pending[FRAME:]
                    if self._frames.full():
                        with contextlib.suppress(queue.Empty):
                            self._frames.get_nowait()
                    self._frames.put(frame)
        except Exception as exc:  # the device went away (unplugged): the loop ends with this message
            if self._running:
                self.error = f"input device {self.name!r} stopped: {exc}"
        self._frames.put(None)

    def read(self) -> np.ndarray | None:
        return self._frames.get()

    def close(self) -> None:
        self._running = False
        with contextlib.suppress(Exception):
            self.stream.abort()
            self.stream.close()
        if self._thread.is_alive():
            self._thread.join(timeout=2)


class ArrayCapture(Capture):
    """Frames from arrays (a WAV file, or a generator the benchmark feeds): on a virtual clock, or on the wall clock
    when `realtime` (each frame is returned when a microphone would have finished recording it)."""

    def __init__(self, chunks: Iterable[np.ndarray], realtime: bool = False) -> None:
        self.virtual = not realtime
        self._chunks = iter(chunks)
        self._pending = np.zeros(0, np.float32)
        self.started_at: float | None = None
        self.samples = 0

    def read(self) -> np.ndarray | None:
        while len(self._pending) < FRAME:
            chunk = next(self._chunks, None)
            if chunk is None:
                if not len(self._pending):
                    return None
                chunk = np.zeros(FRAME - len(self._pending), np.float32)
            self._pending = np.concatenate([self._pending, chunk.astype(np.float32, copy=False)])
        frame, self._pending = self._pending[:FRAME], self._pending[FRAME:]
        self.samples += FRAME
        if not self.virtual:
            if self.started_at is None:
                self.started_at = time.monotonic() - FRAME_S
            ahead = self.time_of(self.samples) - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        return frame

    def time_of(self, sample: int) -> float:
        """Wall-clock time at which sample number `sample` was 'recorded' (realtime only)."""
        assert self.started_at is not None
        return self.started_at + sample / RATE


# --- playback ------------------------------------------------------------------------------------------------------
class OutputDriver:
    """Plays what a Player holds on the wall clock: a thread takes 10 ms blocks from the player (silence when it
    has nothing) and writes them. The stream runs all the time, so playing starts without opening a device, and a
    stop takes effect at the next block. `write` is a device's blocking write, or None to discard (benchmark)."""

    BLOCK_S = 0.010

    def __init__(self, rate: int, write: Callable[[np.ndarray], Any] | None = None,
                 on_close: Callable[[], None] | None = None, name: str = "",
                 on_start: Callable[[], None] | None = None) -> None:
        self.rate, self.name = rate, name
        self._write, self._on_close, self._on_start = write, on_close, on_start
        self._pull: Callable[[int, float], np.ndarray] | None = None
        self._running = True
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="voice-playback", daemon=True)

    def start(self, pull: Callable[[int, float], np.ndarray]) -> None:
        """`pull(n, now)` returns the next n samples (a Player's pull)."""
        self._pull = pull
        if self._on_start:
            self._on_start()
        self._thread.start()

    def _run(self) -> None:
        block, pacer = max(1, int(self.rate * self.BLOCK_S)), _Pacer(self.rate)
        try:
            assert self._pull is not None
            while self._running:
                samples = self._pull(block, time.monotonic())
                started = time.monotonic()
                if self._write is not None:
                    self._write(samples.reshape(-1, 1))
                pacer.done(block, time.monotonic() - started)
        except Exception as exc:
            if self._running:
                self.error = f"output stopped: {exc}"

    def close(self) -> None:
        self._running = False
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._on_close:
            self._on_close()


def device_output(device: int | str | None, rate: int) -> OutputDriver:
    """An OutputDriver on a sounddevice output stream, opened at `rate` if the device takes it (else at its
    default rate: the driver's `rate` says which)."""
    sd = sounddevice()
    index = resolve_device(device, "output")
    name = sd.query_devices(index)["name"]
    open_rate = _open_rate(sd, index, "output", None, rate)
    try:
        stream = sd.OutputStream(device=index, samplerate=open_rate, channels=1, dtype="int16",
                                 blocksize=int(open_rate * OutputDriver.BLOCK_S), latency="low")
    except Exception as exc:  # PortAudioError
        raise AudioError(f"cannot open output device {name!r}: {exc}") from None

    def start() -> None:
        try:
            stream.start()
        except Exception as exc:  # PortAudioError
            raise AudioError(f"cannot start output device {name!r}: {exc}") from None

    def close() -> None:
        with contextlib.suppress(Exception):
            stream.stop()
            stream.close()

    def write(samples: np.ndarray) -> None:
        stream.write((np.clip(samples, -1, 1) * 32767).astype(np.int16))

    return OutputDriver(open_rate, write, close, name, start)


# --- ALSA file devices ---------------------------------------------------------------------------------------------
SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")


def alsa_file_devices(folder: Path, capture_raw: Path, playback_raw: Path) -> dict[str, str]:
    """Environment for a process in which PortAudio sees two ALSA devices backed by files: `mic` reads raw
    16-bit little-endian PCM from `capture_raw` (at whatever rate it is opened with; then zeros), and `speaker`
    writes what is played to `playback_raw`. No sound card needed: the tests, the benchmark, a headless check."""
    conf = folder / "asound.conf"
    conf.write_text(
        f'pcm.mic {{\n  type file\n  slave.pcm "null"\n  file "/dev/null"\n  infile "{capture_raw}"\n'
        f'  format "raw"\n}}\n'
        f'pcm.speaker {{\n  type file\n  slave.pcm "null"\n  file "{playback_raw}"\n  format "raw"\n}}\n')
    return {"ALSA_CONFIG_PATH": f"{SYSTEM_ALSA_CONF}:{conf}"}
