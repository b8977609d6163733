"""`edge-llama voice` and `edge-llama transcribe`: command-line glue, the terminal status line and the keyboard.

Things are opened in the order a user fixes them: the audio devices (or files), the speech models, then the
daemon (waited for up to voice.daemon_wait_s). Any failure is one line ("edge-llama: ...", from cli.main) and
whatever was opened is closed again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from edge_llama.config import Config, VoiceConfig, default_socket_path, load_config, with_overrides
from edge_llama.voice.audio import AudioError

STATE_LABELS = {"listening": "listening", "hearing": "hearing  ", "thinking": "thinking ", "speaking": "speaking "}


class TerminalStatus:
    """On a terminal: one status line on stderr, rewritten in place ("[hearing] what is the cap..."), with the
    finished lines ("you: ...", "assistant: ...") printed above it on stdout. Elsewhere (systemd, a pipe): only
    the finished lines and the notes, one per line."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.live = self.err.isatty()
        self._lock = threading.Lock()
        self._line = ""

    def state(self, name: str, text: str = "") -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size((80, 20)).columns - 1
        line = f"[{STATE_LABELS.get(name, name)}] {text}".rstrip()
        if len(line) > width:
            line = line[:width - 3] + "..."
        with self._lock:
            self._line = line
            self.err.write("\r\x1b[K" + line)
            self.err.flush()

    def said(self, who: str, text: str) -> None:
        self._print(self.out, f"{who}: {text}")

    def note(self, text: str) -> None:
        self._print(self.err, f"[{text}]")

    def _print(self, stream: TextIO, line: str) -> None:
        with self._lock:
            if self.live:
                self.err.write("\r\x1b[K")
                self.err.flush()
            stream.write(line + "\n")
            stream.flush()
            if self.live and self._line:
                self.err.write(self._line)
                self.err.flush()

    def close(self) -> None:
        with self._lock:
            if self.live:
                self.err.write("\r\x1b[K")
                self.err.flush()
            self._line = ""


class Keyboard:
    """The terminal while `voice` runs: typed lines (/exit), and with --ptt the talk key.

    Terminals report key presses, not releases. Holding Enter makes the terminal repeat it (every ~30-40 ms after a
    250-660 ms delay): talk is held while repeats come and released 150 ms after the last one. A single press with
    no repeat within 0.8 s is a tap: talk until the next Enter.
    """

    REPEAT_GAP_S = 0.2  # Enter presses closer than this are the key repeating
    RELEASE_S = 0.15  # no repeat for this long: the key was let go
    TAP_S = 0.8  # no repeat within this: a tap (toggle) rather than a hold

    def __init__(self, on_exit: Any, talk: threading.Event | None) -> None:
        self.on_exit, self.talk = on_exit, talk
        self.fd = sys.stdin.fileno()
        self._saved: Any = None
        self._running = True
        self._thread = threading.Thread(target=self._run, name="voice-keyboard", daemon=True)

    def start(self) -> None:
        if self.talk is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)  # keys one by one, no echo; Ctrl-C still interrupts
        self._thread.start()

    def close(self) -> None:
        self._running = False
        if self._saved is not None:
            import termios

            with contextlib.suppress(Exception):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)

    def _run(self) -> None:
        typed, last_enter, mode = "", 0.0, ""
        while self._running:
            ready, _, _ = select.select([self.fd], [], [], 0.03)
            now = time.monotonic()
            if self.talk is not None and self.talk.is_set():
                if mode == "hold" and now - last_enter > self.RELEASE_S:
                    self.talk.clear()
                elif mode == "" and now - last_enter > self.TAP_S:
                    mode = "tap"
            if not ready:
                continue
            data = os.read(self.fd, 1024).decode("utf-8", "replace")
            if not data:  # end of input (Ctrl-D)
                self.on_exit()
                return
            for ch in data:
                if ch not in "\r\n":
                    typed += ch
                    continue
                line, typed = typed.strip(), ""
                if line in ("/exit", "/quit"):
                    self.on_exit()
                    return
                if line or self.talk is None:
                    continue
                if not self.talk.is_set():
                    self.talk.set()
                    mode = ""
                elif mode == "tap" or (mode == "" and now - last_enter > self.REPEAT_GAP_S):
                    self.talk.clear()
                else:
                    mode = "hold"
                last_enter = now


def _voice_config(args: argparse.Namespace) -> Config:
    overrides = {"voice.wake_phrase": args.wake, "voice.input_device": _device(args.input_device),
                 "voice.output_device": _device(args.output_device), "voice.asr_model": args.asr_model}
    return with_overrides(load_config(args.config), overrides)


def _device(spec: str | None) -> int | str | None:
    return int(spec) if spec is not None and spec.isdigit() else spec


def run_transcribe(args: argparse.Namespace) -> int:
    from edge_llama.voice.asr import transcribe_file

    overrides = {"voice.asr_model": args.asr_model}
    config = with_overrides(load_config(args.config), overrides).voice
    print(transcribe_file(args.file, config))
    return 0


def run_voice(args: argparse.Namespace) -> int:
    from edge_llama.voice.audio import list_devices

    if args.list_devices:
        print(list_devices())
        return 0
    config = _voice_config(args)
    if args.ptt and (args.input_wav or not sys.stdin.isatty()):
        raise AudioError("--ptt needs a microphone and a terminal (hold Enter to talk); "
                         "without a terminal use hands-free mode")
    sock = Path(args.socket) if args.socket else default_socket_path()
    status = TerminalStatus()
    with contextlib.ExitStack() as stack:
        stack.callback(status.close)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # systemctl stop: leave like Ctrl-C
        stack.callback(signal.signal, signal.SIGTERM, previous)
        try:
            return _run(args, config.voice, sock, status, stack)
        except KeyboardInterrupt:
            return 0


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace, vc: VoiceConfig, sock: Path, status: TerminalStatus,
         stack: contextlib.ExitStack) -> int:
    from edge_llama.voice.answer import Conversation
    from edge_llama.voice.asr import Recognizer
    from edge_llama.voice.audio import (
        ArrayCapture,
        DeviceCapture,
        OutputDriver,
        WavWriter,
        device_output,
        read_speech_wav,
    )
    from edge_llama.voice.loop import PushToTalk, VirtualOutput, VoiceLoop
    from edge_llama.voice.player import Player
    from edge_llama.voice.tts import load_tts
    from edge_llama.voice.vad import SileroVad

    if args.input_wav:
        capture: Any = ArrayCapture([read_speech_wav(args.input_wav)], realtime=not args.output_wav)
    else:
        capture = DeviceCapture(vc.input_device, vc.input_rate)
        stack.callback(capture.close)
    tts = load_tts(vc)
    virtual: VirtualOutput | None = None
    driver: OutputDriver | None = None
    if args.output_wav:
        writer = WavWriter(args.output_wav, tts.rate)
        if args.input_wav:
            virtual = VirtualOutput(writer)
            stack.callback(virtual.close)
        else:
            driver = OutputDriver(tts.rate, writer.write, writer.close, name=args.output_wav)
    else:
        driver = device_output(vc.output_device, tts.rate)
    if driver is not None:
        stack.callback(driver.close)
    player = Player(driver.rate if driver else tts.rate)
    recognizer = Recognizer(vc)
    vad = None if args.ptt else SileroVad()
    conversation = Conversation(sock, vc, status, args.session)
    health = conversation.wait_ready()
    stack.callback(conversation.forget)
    talk = PushToTalk() if args.ptt else None
    loop = VoiceLoop(vc, capture, player, recognizer, tts, conversation, status, vad=vad, virtual_output=virtual,
                     ptt=talk)
    stack.callback(loop.stop)
    how = "hold Enter to talk" if talk else "speak" + (f" (start with {vc.wake_phrase!r})" if vc.wake_phrase else "")
    where = args.input_wav or getattr(capture, "name", "")
    status.note(f"ready: {recognizer.name} -> {health.get('model')} -> {tts.name}; {where} -> "
                f"{args.output_wav or driver.name if driver else args.output_wav}; {how}; /exit or Ctrl-C leaves")
    if sys.stdin.isatty() and not args.input_wav:
        keyboard = Keyboard(loop.stopping.set, talk)
        keyboard.start()
        stack.callback(keyboard.close)
    # Both streams start together, now: the output file of a file-backed device lines up with the input file.
    if driver is not None:
        driver.start(player.pull)
    capture.start()
    loop.run()
    for failed in (getattr(capture, "error", None), driver.error if driver else None):
        if failed:
            raise AudioError(failed)
    return 0

