"""The voice state machine: listening -> hearing -> thinking -> speaking -> listening, with barge-in.

One thread (the caller's) reads 32 ms frames from the capture and runs the VAD and the endpointer on each; ASR
runs in a one-thread pool, each answer in its own Turn thread (answer.py), playback in the output's thread.

- Speculative recognition: when speech pauses for ~96 ms, ASR starts on what was said so far; if the pause
  becomes the end of the utterance (the hangover runs out) its result is used, so most of the ASR time overlaps
  the hangover instead of following it. If speech resumes, that result is dropped.
- Barge-in: speech while an answer is being prepared or spoken stops the player at once (the output goes
  silent at its next 10 ms block) and cancels the turn, which sends `cancel` to the daemon; the new utterance is
  then heard as usual. An answer interrupted before any of it was played hands its transcript on: the user was
  still talking, and the next question is both parts together. (If the daemon had already stored the first part
  with the start of its answer, only the new words are sent: the question is in the conversation once.)
- Echo gate (so the assistant does not interrupt itself): while the assistant speaks, a frame counts as speech
  only if Silero says so AND the microphone is at least voice.barge_in_margin_db louder than the loudest block
  played in the last 300 ms. The assistant's voice reaches the microphone weaker than it was played (unless the
  speaker is loud and next to the microphone: then raise the margin, or use --ptt); a person talking to the
  device is louder than that echo. And it must last voice.barge_in_ms (64 ms) to count.
- Clocks: with a live input the wall clock rules. With a WAV file in and a WAV file out, time is the samples
  read (virtual): answers are treated as instant (the clock stops while one is prepared), so the output file is
  the same on every machine: silence while the user speaks, the answer right after the endpoint.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from edge_llama.config import VoiceConfig
from edge_llama.voice.answer import Conversation, Status, Turn
from edge_llama.voice.asr import Recognizer, Transcript
from edge_llama.voice.audio import FRAME, FRAME_S, RATE, Capture, WavWriter, level_db
from edge_llama.voice.player import Player
from edge_llama.voice.text import strip_wake_phrase
from edge_llama.voice.tts import Tts
from edge_llama.voice.vad import Endpointer, Event, SileroVad

PARTIAL_EVERY_S = 1.0  # a partial transcript for the status line at most this often, while the user speaks
VIRTUAL_WAIT_S = 120.0  # the virtual clock never waits longer than this for an answer (a wedged daemon)


class VirtualOutput:
    """The output WAV on the virtual clock: the loop advances it by the input samples it reads."""

    def __init__(self, writer: WavWriter) -> None:
        self.writer = writer
        self.rate = writer.rate
        self._owed = 0.0
        self.clock = 0.0  # seconds of input read

    def advance(self, samples_16k: int, pull: Callable[[int, float], np.ndarray]) -> None:
        self.clock += samples_16k / RATE
        self._owed += samples_16k * self.rate / RATE
        n = int(self._owed)
        self._owed -= n
        self.writer.write(pull(n, self.clock))

    def close(self) -> None:
        self.writer.close()


class PushToTalk(threading.Event):
    """Set while the talk key is held (the terminal side lives in cli.py)."""


class VoiceLoop:
    def __init__(self, config: VoiceConfig, capture: Capture, player: Player, recognizer: Recognizer, tts: Tts,
                 conversation: Conversation, status: Status, vad: SileroVad | None = None,
                 virtual_output: VirtualOutput | None = None, ptt: PushToTalk | None = None,
                 on_turn: Callable[[Turn], None] | None = None) -> None:
        self.config, self.capture, self.player = config, capture, player
        self.recognizer, self.tts, self.conversation, self.status = recognizer, tts, conversation, status
        self.vad, self.virtual_output, self.ptt, self.on_turn = vad, virtual_output, ptt, on_turn
        assert vad is not None or ptt is not None, "hands-free listening needs the VAD"
        self.endpointer = Endpointer(config.hangover_ms, config.min_speech_ms, config.max_utterance_s)
        self.barge_frames = max(1, round(config.barge_in_ms / 1000 / FRAME_S))
        self.stopping = threading.Event()
        self.turns: list[Turn] = []
        self.turn: Turn | None = None
        self._asr = ThreadPoolExecutor(1, thread_name_prefix="voice-asr")
        self._asr_pending: set[Future[Transcript]] = set()
        self._speculative: Future[Transcript] | None = None
        self._interrupted: Turn | None = None  # a turn cut off before it spoke: the next one carries its words on
        self._partial_at = 0
        self._ptt_frames: list[np.ndarray] | None = None
        self._awake = False  # the wake phrase was said alone: the next utterance needs none
        self._reported: set[int] = set()
        self.barge_ins = 0
        self.times: dict[str, float] = {}  # of the last barge-in: "heard" (monotonic)
        player.on_first_sample = self._first_sample

    # --- the frame loop ------------------------------------------------------------------------------------------
    def run(self) -> None:
        self.status.state("listening")
        while not self.stopping.is_set():
            frame = self.capture.read()
            if frame is None:
                break
            if self.virtual_output is not None:
                self._advance_virtual()
            self._frame(frame)
            self._check_turn()
        if not self.stopping.is_set():
            self._drain()

    def stop(self) -> None:
        """Leave now: cancel what runs (the daemon is told), cut the speech."""
        self.stopping.set()
        self.player.stop()
        for turn in self.turns:
            if not turn.done.is_set():
                turn.cancel()
        for turn in self.turns:
            turn.join(timeout=5)
        self._asr.shutdown(wait=False, cancel_futures=True)

    def _frame(self, frame: np.ndarray) -> None:
        if self.ptt is not None:
            self._push_to_talk(frame)
            return
        assert self.vad is not None
        speech = self.vad(frame) >= self.config.vad_threshold
        busy = self._assistant_busy()
        if busy and not self.config.barge_in:
            speech = False
        elif speech and level_db(frame) < self.player.recent_level_db() + self.config.barge_in_margin_db:
            speech = False  # as loud as what was just played, or quieter: the assistant hearing itself
        event = self.endpointer.push(frame, speech, self.barge_frames if busy else 1)
        if event is Event.START:
            if busy:
                self._barge_in()
            self.status.state("hearing")
            self._partial_at = 0
        elif event is Event.PAUSE:
            self._speculative = self._transcribe(self.endpointer.audio())
        elif event is Event.RESUME:
            self._speculative = None  # it goes on: that guess is out of date
        elif event is Event.END:
            job, self._speculative = self._speculative, None
            self._start_turn(job or self._transcribe(self.endpointer.utterance()))
        elif event is Event.DISCARD:
            self._speculative = None
            if not self._assistant_busy():
                self.status.state("listening")
        elif self.endpointer.state == "speech" and self.status.live and self.config.partial_transcripts:
            self._partial()

    def _push_to_talk(self, frame: np.ndarray) -> None:
        assert self.ptt is not None
        if self.ptt.is_set():
            if self._ptt_frames is None:
                if self._assistant_busy():
                    self._barge_in()
                self._ptt_frames = []
                self.status.state("hearing")
            self._ptt_frames.append(frame)
        elif self._ptt_frames is not None:
            frames, self._ptt_frames = self._ptt_frames, None
            if len(frames) * FRAME_S * 1000 < max(self.config.min_speech_ms, 100):
                self.status.state("listening")
                return
            self._start_turn(self._transcribe(np.concatenate(frames)))

    def _drain(self) -> None:
        """The input ended (a file): finish the utterance in progress and speak the last answer."""
        if self.ptt is None and self.endpointer.active:
            event = self.endpointer.push(np.zeros(FRAME, np.float32), False)
            while event not in (Event.END, Event.DISCARD):
                event = self.endpointer.push(np.zeros(FRAME, np.float32), False)
            if event is Event.END:
                self._start_turn(self._transcribe(self.endpointer.utterance()))
        while self._assistant_busy() and not self.stopping.is_set():
            if self.virtual_output is not None:
                self._advance_virtual()
            else:
                time.sleep(0.02)
            self._check_turn()
        if self.virtual_output is None:
            time.sleep(0.1)  # the output device plays its last block
        self._check_turn()

    # --- pieces --------------------------------------------------------------------------------------------------
    def _assistant_busy(self) -> bool:
        return (self.turn is not None and not self.turn.done.is_set()) or self.player.busy

    def _advance_virtual(self) -> None:
        """On the virtual clock no time passes while an answer is being prepared and nothing is left to play."""
        assert self.virtual_output is not None
        deadline = time.monotonic() + VIRTUAL_WAIT_S
        while (self.turn is not None and not self.turn.done.is_set() and not self.player.busy
               and time.monotonic() < deadline and not self.stopping.is_set()):
            self.player.wait_audio(0.05)
        self.virtual_output.advance(FRAME, self.player.pull)

    def _transcribe(self, audio: np.ndarray) -> Future[Transcript]:
        future = self._asr.submit(self.recognizer.transcribe, audio)
        self._asr_pending.add(future)
        future.add_done_callback(self._asr_pending.discard)
        return future

    def _partial(self) -> None:
        """A transcript of the speech so far for the status line, when ASR is idle (never delaying the final one)."""
        heard = len(self.endpointer.audio())
        if self._asr_pending or heard - self._partial_at < PARTIAL_EVERY_S * RATE:
            return
        self._partial_at = heard
        job = self._transcribe(self.endpointer.audio())

        def show(future: Future[Transcript]) -> None:
            if not future.cancelled() and future.exception() is None and self.endpointer.active:
                self.status.state("hearing", future.result().text)

        job.add_done_callback(show)

    def _start_turn(self, transcript: Future[Transcript]) -> None:
        self.times["endpoint"] = time.monotonic()
        interrupted, self._interrupted = self._interrupted, None
        carry = interrupted.transcripts if interrupted else []
        turn = Turn(len(self.turns) + 1, carry + [transcript], self.conversation, self.tts, self.player,
                    self.status, self._accept, interrupted)
        turn.times["endpoint"] = self.times["endpoint"]
        self.turns.append(turn)
        self.turn = turn
        self.status.state("thinking")
        turn.start()

    def _barge_in(self) -> None:
        turn = self.turn
        playing = self.player.stop()
        self.times["heard"] = time.monotonic()
        if turn is None:
            return
        if playing or not turn.done.is_set():
            self.status.note("interrupted")
        if not turn.done.is_set():
            turn.cancel()
            if not turn.played:
                self._interrupted = turn  # still talking: the next question is both parts together
        self.barge_ins += 1
        turn.times["barge_in"] = self.times["heard"]

    def _accept(self, text: str) -> str | None:
        """What to ask the daemon for an utterance (None: ignore it; "": answer the wake phrase alone)."""
        phrase = self.config.wake_phrase
        if not phrase:
            return text
        if self._awake:
            self._awake = False
            return text
        rest = strip_wake_phrase(text, phrase)
        if rest is None:
            self.status.note(f"not for me (no {phrase!r}): {text}")
        elif not rest:
            self._awake = True
        return rest

    def _first_sample(self, turn_id: int, when: float) -> None:
        turn = self.turns[turn_id - 1] if 0 < turn_id <= len(self.turns) else None
        if turn is not None:
            turn.times.setdefault("first_sample", when)

    def _check_turn(self) -> None:
        """After an answer was spoken (or dropped): report it once, and show that we listen again."""
        turn = self.turn
        if turn is None or turn.id in self._reported or not turn.done.is_set() or self.player.busy:
            return
        self._reported.add(turn.id)
        if not self.endpointer.active and self._ptt_frames is None:
            self.status.state("listening")
        if self.on_turn:
            self.on_turn(turn)

    def summary(self) -> dict[str, Any]:
        return {"turns": len(self.turns), "barge_ins": self.barge_ins}
