"""Voice: the pieces a user hears the effect of (recognition accuracy, endpointing, barge-in and its echo gate,
cutting answers into sentences), in one process with real models and, where the daemon is involved, a real daemon.

Speech fixtures are made at test time with espeak-ng (two voices, two speeds), plus one recording of a real person
(tests/voice_helpers.py). The word error rate on each is printed (pytest -s) and bounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from conftest import Daemons, fake_config, guarded
from voice_helpers import (
    BECKETT,
    LONG_REPLY,
    Recorded,
    beckett_path,
    say,
    spoken_seconds,
    voiced_spans,
    wait_until,
)

from edge_llama.config import VoiceConfig, from_dict
from edge_llama.errors import ConfigError, ModelError
from edge_llama.voice.answer import Conversation, Turn
from edge_llama.voice.asr import TINY_EN, Recognizer, Transcript, embedded_model
from edge_llama.voice.audio import FRAME, RATE, ArrayCapture, OutputDriver, Resampler, WavWriter, read_speech_wav
from edge_llama.voice.loop import VirtualOutput, VoiceLoop
from edge_llama.voice.player import Player
from edge_llama.voice.text import SentenceSplitter, strip_wake_phrase, wer, word_errors
from edge_llama.voice.tts import Espeak, Piper
from edge_llama.voice.vad import Endpointer, Event, SileroVad

# Questions a voice assistant hears; each fixture voice/speed says all of them.
SENTENCES = ["What is the capital of France?", "How many legs does a spider have?",
             "Please turn on the kitchen lights.", "Set a timer for ten minutes.", "Who wrote Romeo and Juliet?",
             "What is the boiling point of water?", "Tell me a fun fact about cats.", "Why is the sea salty?"]
FIXTURE_VOICES = [("en-us", 140), ("en-us", 180), ("en-gb", 140), ("en-gb", 180)]
TESTS = str(Path(__file__).parent)  # safety_hooks.py, for the daemon


@pytest.fixture(scope="module")
def recognizer() -> Recognizer:
    return Recognizer(VoiceConfig())


# --- text ---------------------------------------------------------------------------------------------------------
def test_answers_are_spoken_sentence_by_sentence_as_they_stream() -> None:
    splitter = SentenceSplitter()
    stream = ["The capital", " of France is Paris.", " It has about 2.1", " million people. Dr.", " Smith", " lives",
              " there, and **likes** it.", "\n- one\n- two"]
    got = [splitter.feed(piece) for piece in stream]
    # The first sentence is ready the moment its period arrives; "2.1" and "Dr." do not end one.
    assert got[1] == ["The capital of France is Paris."]
    assert got[3] == ["It has about 2.1 million people."]
    assert got[6] == ["Dr. Smith lives there, and likes it."]
    assert got[7] == ["one"] and splitter.flush() == ["two"]
    # A long first sentence starts speaking at a clause boundary after six words.
    assert SentenceSplitter().feed("Well, the thing about quantum computers, as far as we know, is") == [
        "Well, the thing about quantum computers,"]


def test_word_error_rate_and_wake_phrase() -> None:
    assert word_errors("Ever tried. Ever failed.", "ever tried, never failed") == (1, 4)
    assert wer("set a timer for 10 minutes", "Set a timer for ten minutes.") == 0
    assert strip_wake_phrase("Hey Jetson, what time is it?", "hey jetson") == "what time is it?"
    assert strip_wake_phrase("Hey, Jetsen. What's up?", "hey jetson") == "What's up?"
    assert strip_wake_phrase("hey jetson", "hey jetson") == ""
    assert strip_wake_phrase("What time is it?", "hey jetson") is None


def test_voice_config_is_validated_with_key_paths() -> None:
    config = from_dict({"voice": {"input_device": "USB", "hangover_ms": 400, "wake_phrase": "hey jetson"}})
    assert config.voice.input_device == "USB" and config.voice.hangover_ms == 400
    for bad, key in [({"hangover_ms": 20}, "voice.hangover_ms"), ({"vad_threshold": 2}, "voice.vad_threshold"),
                     ({"tts": "x"}, "voice.tts"), ({"asr_device": "tpu"}, "voice.asr_device"),
                     ({"wake_phrase": " "}, "voice.wake_phrase")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            from_dict({"voice": bad})


# --- ASR: the embedded model, its accuracy, bad folders ------------------------------------------------------------
def _ct2_shapes(model_bin: Path) -> dict[str, tuple[int, ...]]:
    """Variable shapes from a CTranslate2 model.bin header (format version 6)."""
    shapes = {}
    with model_bin.open("rb") as f:
        def text() -> str:
            (n,) = struct.unpack("<H", f.read(2))
            return f.read(n).decode().rstrip("\0")
        version = struct.unpack("<I", f.read(4))[0]
        assert version == 6 and text() == "WhisperSpec"
        f.read(4)  # spec revision
        (count,) = struct.unpack("<I", f.read(4))
        for _ in range(count):
            name = text()
            rank = f.read(1)[0]
            dims = struct.unpack("<" + "I" * rank, f.read(4 * rank))
            f.read(1)  # dtype
            (size,) = struct.unpack("<I", f.read(4))
            f.seek(size, 1)
            shapes[name] = dims
    return shapes


def test_embedded_asr_model_is_whisper_tiny_en(recognizer: Recognizer) -> None:
    folder = embedded_model()
    config = json.loads((folder / "config.json").read_text())
    assert config["alignment_heads"] == TINY_EN["alignment_heads"]  # OpenAI's published heads for tiny.en
    vocabulary = (folder / "vocabulary.txt").read_text().splitlines()
    assert len(vocabulary) == TINY_EN["vocabulary"] and vocabulary[50256:50258] == ["<|endoftext|>",
                                                                                   "<|startoftranscript|>"]
    shapes = _ct2_shapes(folder / "model.bin")
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder/layer_(\d+)/", k))}
    assert len(layers) == TINY_EN["layers"]
    assert shapes["decoder/embeddings/weight"] == (TINY_EN["vocabulary"], TINY_EN["width"])
    assert hashlib.sha256((folder / "model.bin").read_bytes()).hexdigest() == TINY_EN["model_bin_sha256"]
    assert not recognizer.multilingual
    # A known sentence, spoken by a person: word for word.
    assert wer(BECKETT, recognizer.transcribe(read_speech_wav(beckett_path())).text) == 0


def test_word_error_rate_on_espeak_voices_and_a_human_recording(recognizer: Recognizer) -> None:
    report, total = [], [0, 0]
    for voice, wpm in FIXTURE_VOICES:
        errors = words = 0
        for sentence in SENTENCES:
            e, n = word_errors(sentence, recognizer.transcribe(say(sentence, voice, wpm)).text)
            errors, words = errors + e, words + n
        report.append((f"espeak-ng {voice} {wpm} wpm", errors, words))
        total = [total[0] + errors, total[1] + words]
    e, n = word_errors(BECKETT, recognizer.transcribe(read_speech_wav(beckett_path())).text)
    report.append(("beckett.wav (human, 10 s)", e, n))
    print("\nASR word error rate (Whisper tiny.en, int8, greedy, 10 s window):")
    for name, errors, words in report:
        print(f"  {name:28s} {errors:2d}/{words} = {errors / words:.3f}")
    print(f"  espeak-ng, all four           {total[0]}/{total[1]} = {total[0] / total[1]:.3f}")
    assert all(errors / words <= 0.3 for _, errors, words in report), report
    assert total[0] / total[1] <= 0.2


def test_missing_or_corrupt_asr_folder_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        Recognizer(VoiceConfig(asr_model=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (broken / name).write_bytes((embedded_model() / name).read_bytes())
    with pytest.raises(ModelError, match="model.bin missing"):
        Recognizer(VoiceConfig(asr_model=str(broken)))
    (broken / "model.bin").write_bytes((embedded_model() / "model.bin").read_bytes()[:4096])  # truncated
    with pytest.raises(ModelError, match="cannot load the ASR model"):
        Recognizer(VoiceConfig(asr_model=str(broken)))
    out = subprocess.run([sys.executable, "-m", "edge_llama", "transcribe", str(beckett_path()), "--asr-model",
                          str(broken)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("edge-llama: cannot load the ASR model") and out.stderr.count("\n") == 1


def test_transcribe_command_prints_the_transcript() -> None:
    out = subprocess.run([sys.executable, "-m", "edge_llama", "transcribe", str(beckett_path())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert wer(BECKETT, out.stdout) == 0


# --- VAD and endpointing --------------------------------------------------------------------------------------
def test_endpointer_finds_the_utterance_and_waits_the_hangover() -> None:
    vad, endpointer = SileroVad(), Endpointer(hangover_ms=300, min_speech_ms=250, max_utterance_s=28)
    question = say(SENTENCES[0])
    audio = np.concatenate([np.zeros(RATE // 2, np.float32), question, np.zeros(RATE, np.float32)])
    events = []
    for i, frame in enumerate(np.split(audio[:len(audio) // FRAME * FRAME], len(audio) // FRAME)):
        event = endpointer.push(frame, vad(frame) >= 0.5)
        if event:
            events.append((event, (i + 1) * FRAME / RATE))
    kinds = [e for e, _ in events]
    assert kinds[0] is Event.START and kinds[-1] is Event.END, events
    voiced = np.nonzero(np.abs(question) > 0.003)[0] / RATE  # espeak-ng's own leading/trailing quiet excluded
    onset, end = 0.5 + voiced[0], 0.5 + voiced[-1]
    assert 0 < events[0][1] - onset < 0.1
    assert 0.25 <= events[-1][1] - end <= 0.45  # ~ the 300 ms hangover (Silero hears the fading tail as silence)
    # A click is not an utterance.
    endpointer.reset()
    click = [endpointer.push(np.zeros(FRAME, np.float32), s) for s in [True, True] + [False] * 12]
    assert Event.DISCARD in click and Event.END not in click


# --- playback -----------------------------------------------------------------------------------------------------
def test_player_stop_cuts_at_once_and_drops_the_rest_of_that_answer() -> None:
    player = Player(22050)
    epoch = player.epoch
    assert player.enqueue(1, epoch, np.full(22050, 0.5, np.float32))
    assert np.all(player.pull(2205, 0.1) == 0.5)
    assert player.stop()
    assert not np.any(player.pull(2205, 0.2))  # silent from the next block on
    assert not player.enqueue(1, epoch, np.full(100, 0.5, np.float32))  # TTS still making the cut answer
    assert player.enqueue(2, player.epoch, np.full(100, 0.5, np.float32))  # the next answer plays


def test_resampler_keeps_a_tone() -> None:
    t = np.arange(22050) / 22050
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    resample = Resampler(22050, RATE)
    out = np.concatenate([resample(chunk) for chunk in np.array_split(tone, 7)])  # in pieces, as streamed
    assert abs(len(out) - RATE) <= 2
    spectrum = np.abs(np.fft.rfft(out[1000:-1000]))
    assert abs(np.argmax(spectrum) * RATE / len(out[1000:-1000]) - 440) < 3
    assert abs(np.sqrt(np.mean(out[1000:-1000] ** 2)) - 0.5 / np.sqrt(2)) < 0.01


def test_piper_voice_is_used_when_configured(tmp_path: Path) -> None:
    """A stand-in Piper voice (an ONNX graph with Piper's inputs that returns 256 samples of tone per phoneme id):
    loading, phonemizing through piper's own espeak-ng, and the audio handed to the player."""
    import onnx
    from onnx import TensorProto, helper

    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(256) / 16000)).astype(np.float32).reshape(1, 1, 1, 256)
    graph = helper.make_graph(
        [helper.make_node("Shape", ["input"], ["shape"]),
         helper.make_node("Slice", ["shape", "one", "two"], ["n"]),
         helper.make_node("Concat", ["ones3", "n"], ["repeats"], axis=0),
         helper.make_node("Tile", ["tone", "repeats"], ["output"])],
        "piper_standin",
        [helper.make_tensor_value_info("input", TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("input_lengths", TensorProto.INT64, [1]),
         helper.make_tensor_value_info("scales", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, 1, None])],
        [helper.make_tensor("one", TensorProto.INT64, [1], [1]), helper.make_tensor("two", TensorProto.INT64, [1], [2]),
         helper.make_tensor("ones3", TensorProto.INT64, [3], [1, 1, 1]),
         helper.make_tensor("tone", TensorProto.FLOAT, tone.shape, tone.ravel().tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "standin.onnx")
    from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

    (tmp_path / "standin.onnx.json").write_text(json.dumps({
        "audio": {"sample_rate": 16000}, "espeak": {"voice": "en-us"}, "num_symbols": 256, "num_speakers": 1,
        "phoneme_id_map": DEFAULT_PHONEME_ID_MAP, "phoneme_type": "espeak"}))
    with pytest.raises(ModelError, match="no such Piper voice"):
        Piper(str(tmp_path / "missing.onnx"))
    voice = Piper(str(tmp_path / "standin.onnx"))
    short = np.concatenate(list(voice.synthesize("Hello.")))
    long = np.concatenate(list(voice.synthesize("Hello there, how are you doing today?")))
    assert voice.rate == 16000 and len(short) % 256 == 0 and len(long) > 3 * len(short)
    assert np.abs(long).max() > 0.2  # Piper normalizes; the tone came through


# --- the loop: barge-in and the echo gate, on the virtual clock in a simulated room -------------------------------
class Room:
    """A microphone that hears the user (a fixed recording) plus the assistant's own voice coming back from the
    speaker `delay_s` later and `echo_db` weaker: what a device with a speaker and a microphone sounds like."""

    def __init__(self, user: np.ndarray, echo_db: float, delay_s: float = 0.05) -> None:
        self.user = np.concatenate([user, np.zeros(-len(user) % FRAME, np.float32)])
        self.gain, self.delay = 10 ** (echo_db / 20), int(delay_s * RATE)
        self.played = np.zeros(0, np.float32)  # what the speaker played, at 16 kHz, from t = 0

    def speaker(self, rate: int, path: Path) -> VirtualOutput:
        room, to16k = self, Resampler(rate, RATE)

        class Speaker(WavWriter):
            def write(self, samples: np.ndarray) -> None:
                super().write(samples)
                room.played = np.concatenate([room.played, to16k(samples)])

        return VirtualOutput(Speaker(path, rate))

    def microphone(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.user), FRAME):
            frame = self.user[start:start + FRAME].copy()
            echo = self.played[max(0, start - self.delay):max(0, start + FRAME - self.delay)]
            frame[FRAME - len(echo):] += self.gain * echo
            yield frame


def run_room(daemons: Daemons, recognizer: Recognizer, workdir: Path, user: np.ndarray, echo_db: float) -> tuple:
    daemon = daemons.start(fake_config(reply=LONG_REPLY, token_delay_ms=30))
    config = dataclasses.replace(VoiceConfig(), max_tokens=256)
    status, room = Recorded(), Room(user, echo_db)
    tts = Espeak(config.espeak_voice, config.speech_rate_wpm)
    output = room.speaker(tts.rate, workdir / "out.wav")
    loop = VoiceLoop(config, ArrayCapture(room.microphone()), Player(tts.rate), recognizer, tts,
                     Conversation(daemon.socket, config, status), status, vad=SileroVad(), virtual_output=output)
    try:
        loop.run()
    finally:
        loop.stop()
        output.close()
    return loop, status, room


def test_own_voice_coming_back_does_not_interrupt(daemons: Daemons, recognizer: Recognizer, workdir: Path) -> None:
    question = say(SENTENCES[0])
    user = np.concatenate([np.zeros(RATE // 2, np.float32), question, np.zeros(14 * RATE, np.float32)])
    loop, status, room = run_room(daemons, recognizer, workdir, user, echo_db=-12)
    assert loop.barge_ins == 0 and len(loop.turns) == 1, status.lines
    assert ("assistant", LONG_REPLY) in status.lines
    spans = voiced_spans(room.played, RATE)
    assert spans[-1][1] - spans[0][0] > 0.9 * spoken_seconds(LONG_REPLY)  # all of it was spoken


def test_user_talking_over_the_answer_interrupts_it(daemons: Daemons, recognizer: Recognizer, workdir: Path) -> None:
    first, second = say(SENTENCES[0]), say("Tell me about Germany instead.")
    onset = 0.5 + len(first) / RATE + 3.0  # the answer started ~0.35 s after the question ended
    user = np.zeros(int((onset + 12) * RATE), np.float32)
    user[RATE // 2:RATE // 2 + len(first)] = first
    user[int(onset * RATE):int(onset * RATE) + len(second)] = second
    loop, status, room = run_room(daemons, recognizer, workdir, user, echo_db=-20)
    assert loop.barge_ins == 1 and len(loop.turns) == 2, status.lines
    assert "germany" in loop.turns[1].text.lower(), status.lines  # the second question was heard and answered
    # The daemon confirms it stopped generating the first answer (the protocol's cancel reached it).
    assert loop.turns[0].finish == "cancelled" and loop.turns[1].finish == "stop"
    # The first answer stopped within 150 ms of the user starting to talk (the echo is still in the room, so the
    # answer's own audio is measured where the speaker played it).
    spans = voiced_spans(room.played, RATE, gap_s=0.2)
    cut = next(end for start, end in spans if start < onset < end + 0.2)
    voiced = np.nonzero(np.abs(second) > 0.01)[0][0] / RATE
    assert cut - (onset + voiced) <= 0.15, (cut, onset + voiced)


# --- the conversation the daemon keeps ---------------------------------------------------------------------------
def stored_messages(daemons: Daemons, session: str) -> list[dict]:
    (path,) = (daemons.workdir / "state" / "sessions").rglob(f"{session}.json")
    return json.loads(path.read_text())["messages"]


def heard(text: str) -> Future[Transcript]:
    future: Future[Transcript] = Future()
    future.set_result(Transcript(text=text, seconds=len(text) / 15))
    return future


def test_system_prompt_holds_after_a_blocked_and_a_cancelled_first_turn(daemons: Daemons) -> None:
    """The daemon does not keep a turn that was blocked, or cancelled before any text: the voice system prompt must
    not have gone with it (it used to be sent with the first turn only)."""
    rules = [{"category": "keyword", "block": 0.5, "on": ["input"]}]
    config = guarded(fake_config(prompt_delay_ms=5), hooks=["safety_hooks:KeywordHook"], rules=rules)
    daemon = daemons.start(config, env={"PYTHONPATH": TESTS})
    voice, status = VoiceConfig(), Recorded()
    conversation = Conversation(daemon.socket, voice, status, session="kitchen")
    tts = Espeak(voice.espeak_voice, voice.speech_rate_wpm)

    def turn(number: int, text: str) -> Turn:
        return Turn(number, [heard(text)], conversation, tts, Player(tts.rate), status, lambda t: t).start()

    blocked = turn(1, "say forbidden-word")
    blocked.join(60)
    assert blocked.finish == "safety" and blocked.done.is_set()
    cancelled = turn(2, "are you there")  # cancelled while the daemon reads its prompt (5 ms a prompt token)
    wait_until(lambda: "sent" in cancelled.times or cancelled.done.is_set(), what="the request sent")
    cancelled.cancel()
    cancelled.join(60)
    assert cancelled.finish == "cancelled" and not cancelled.answer
    answered = turn(3, "hello there")
    answered.join(60)
    assert answered.answer == "You said: hello there"
    messages = stored_messages(daemons, "kitchen")
    assert messages[0] == {"role": "system", "content": voice.system_prompt}, messages
    assert [m["content"] for m in messages[1:]] == ["hello there", "You said: hello there"]


def test_a_question_interrupted_before_its_answer_was_heard_is_kept_once(daemons: Daemons, recognizer: Recognizer
                                                                         ) -> None:
    """The user goes on talking while the daemon already answers: the answer is cut before any of it was heard and
    both parts are one question. The daemon had stored the first part (with the start of its answer) when the
    cut came, so it must not be asked again."""
    daemon = daemons.start(fake_config(reply="Paris is the capital. It is big.", token_delay_ms=40))
    config = dataclasses.replace(VoiceConfig(), max_tokens=64, partial_transcripts=False)
    status = Recorded()
    first, second = say("What is the capital of France?"), say("Tell me about Germany instead.")
    silence = np.zeros(RATE // 2, np.float32)
    loop: VoiceLoop | None = None

    def microphone() -> Iterator[np.ndarray]:
        yield from (silence, first, silence, silence)  # the question, and the 300 ms that end it
        assert loop is not None and loop.turns, status.lines
        # until the daemon's answer arrives (a piece of it is spoken from 21 tokens, 0.8 s, on)
        wait_until(lambda: bool(loop.turns[0].answer) or loop.turns[0].done.is_set(), what="the first answer")
        assert not loop.turns[0].played
        yield from (second, silence, silence)

    tts = Espeak(config.espeak_voice, config.speech_rate_wpm)
    player = Player(tts.rate)
    output = OutputDriver(tts.rate)  # plays on the wall clock, into nothing
    loop = VoiceLoop(config, ArrayCapture(microphone()), player, recognizer, tts,
                     Conversation(daemon.socket, config, status, session="barge"), status, vad=SileroVad())
    output.start(player.pull)
    try:
        loop.run()
    finally:
        loop.stop()
        output.close()
    assert loop.barge_ins == 1 and len(loop.turns) == 2, status.lines
    assert loop.turns[0].finish == "cancelled" and loop.turns[0].answer and not loop.turns[0].played
    assert "france" in loop.turns[1].text.lower() and "germany" in loop.turns[1].text.lower()
    asked = [m["content"] for m in stored_messages(daemons, "barge") if m["role"] == "user"]
    assert sum("France" in text for text in asked) == 1, asked
    assert "Germany" in asked[-1] and loop.turns[1].finish == "stop", asked
