"""`edge-llama voice` as a user runs it: a process talking to a real daemon on a real socket, hearing through
sounddevice/PortAudio/ALSA on file-backed ALSA devices (no sound card), or through WAV files.

ALSA devices: `mic` plays a raw file into the capture side, `speaker` records what is played (see
edge_llama.voice.audio.alsa_file_devices). Both streams start together and run on the wall clock, so a time in the
capture file and the same time in the playback file are the same moment (to a few ms).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import Daemons, fake_config, skip_without_offline_security
from voice_helpers import LONG_REPLY, Lines, say, spoken_seconds, voiced_spans, wait_until

from edge_llama.voice.audio import RATE, alsa_file_devices, read_wav, write_wav
from edge_llama.voice.text import wer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
REPLY = "The capital of France is Paris. It is a lovely city on the Seine."
QUESTION = "What is the boiling point of water?"  # tiny.en hears espeak-ng say this right in every setting tried


def voice(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_llama", "voice", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=timeout)


def question_wav(path: Path, *parts: tuple[float, np.ndarray], seconds: float) -> Path:
    audio = np.zeros(int(seconds * RATE), np.float32)
    for at, speech in parts:
        audio[int(at * RATE):int(at * RATE) + len(speech)] = speech
    write_wav(path, audio, RATE)
    return path


def heard(stdout: str) -> list[str]:
    """What the voice process printed as heard ("you: ..." lines)."""
    return [line[5:] for line in stdout.splitlines() if line.startswith("you: ")]


def stats(daemon: object) -> dict:
    from edge_llama.client import Client

    with Client(daemon.socket, timeout=10) as client:  # type: ignore[attr-defined]
        return client.call({"op": "stats"})


def cancelled_on_the_daemon(daemon: object) -> bool:
    """The protocol's cancel op reached the daemon and stopped a generation there."""
    s = stats(daemon)
    return s["requests"].get("cancel", 0) >= 1 and s["finish_reasons"].get("cancelled", 0) >= 1


def audio_clock(speaker: Path, rate: int = 22050) -> float:
    """Seconds the voice process has been playing into the file-backed speaker: the output runs without a break
    (silence between answers) from the moment capture starts, so this is the process's own audio clock, which the
    capture file is read on too."""
    return speaker.stat().st_size / 2 / rate if speaker.exists() else 0.0


def one_line_error(out: subprocess.CompletedProcess, code: int, start: str) -> None:
    assert out.returncode == code, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.startswith("edge-llama:")]
    assert len(lines) == 1 and lines[0].startswith(start), out.stderr
    assert "Traceback" not in out.stderr


# --- files in, files out ------------------------------------------------------------------------------------------
def test_question_in_a_wav_gets_a_spoken_answer(daemons: Daemons, workdir: Path) -> None:
    daemon = daemons.start(fake_config(reply=REPLY))
    question = say(QUESTION)
    wav = question_wav(workdir / "q.wav", (0.5, question), seconds=0.5 + len(question) / RATE + 0.5)
    out = voice("--socket", str(daemon.socket), "--input-wav", str(wav), "--output-wav", str(workdir / "a.wav"))
    assert out.returncode == 0, out.stderr
    assert wer(QUESTION, heard(out.stdout)[0]) <= 0.2 and f"\nassistant: {REPLY}\n" in out.stdout
    answer, rate = read_wav(workdir / "a.wav")
    spans = voiced_spans(answer, rate)
    question_end = 0.5 + np.nonzero(np.abs(question) > 0.01)[0][-1] / RATE
    # On the file's clock the answer follows the question by the endpointing hangover (300 ms)...
    assert 0.25 < spans[0][0] - question_end < 0.5, spans
    # ...and is as long as the text takes to say: two sentences with a pause between them.
    assert abs((spans[-1][1] - spans[0][0]) - spoken_seconds(REPLY)) < 0.3, spans
    assert "forget" in daemons.log(daemon)  # the unnamed session was forgotten on leaving


def test_real_model_answers_aloud(daemons: Daemons, workdir: Path) -> None:
    """The embedded SmolLM2-135M on llama.cpp: whatever it answers is what is spoken, sentence by sentence."""
    daemon = daemons.start({"engine": {"kv_tokens": 1024}, "server": {"warmup": False}})
    (workdir / "voice.yaml").write_text("voice: {max_tokens: 40}\n")
    asked = QUESTION
    question = say(asked)
    wav = question_wav(workdir / "q.wav", (0.3, question), seconds=0.3 + len(question) / RATE + 0.6)
    out = voice("--config", str(workdir / "voice.yaml"), "--socket", str(daemon.socket), "--input-wav", str(wav),
                "--output-wav", str(workdir / "a.wav"), timeout=240)
    assert out.returncode == 0, out.stderr
    answer_text = out.stdout.split("assistant: ", 1)[1].strip()
    assert wer(asked, heard(out.stdout)[0]) <= 0.2 and answer_text
    answer, rate = read_wav(workdir / "a.wav")
    spans = voiced_spans(answer, rate, gap_s=2.0)
    assert len(spans) == 1 and abs((spans[0][1] - spans[0][0]) - spoken_seconds(answer_text)) < 0.5, (
        spans, answer_text)


def test_barge_in_on_the_file_clock_cancels_and_answers_the_new_question(daemons: Daemons, workdir: Path) -> None:
    daemon = daemons.start(fake_config(reply=LONG_REPLY, token_delay_ms=30))
    first, second = say(QUESTION), say("Tell me about Germany instead.")
    onset = 0.5 + len(first) / RATE + 2.5
    wav = question_wav(workdir / "q.wav", (0.5, first), (onset, second), seconds=onset + 3)
    (workdir / "voice.yaml").write_text("voice: {max_tokens: 256}\n")
    out = voice("--config", str(workdir / "voice.yaml"), "--socket", str(daemon.socket), "--input-wav", str(wav),
                "--output-wav", str(workdir / "a.wav"))
    assert out.returncode == 0, out.stderr
    said = heard(out.stdout)
    assert len(said) == 2 and "Germany" in said[1], out.stdout
    assert "[interrupted]" in out.stdout and "[interrupted]" in out.stderr
    assert cancelled_on_the_daemon(daemon), stats(daemon)
    answer, rate = read_wav(workdir / "a.wav")
    spans = voiced_spans(answer, rate, gap_s=0.2)
    cut = next(end for start, end in spans if start < onset < end + 0.2)
    latency = cut - (onset + np.nonzero(np.abs(second) > 0.01)[0][0] / RATE)
    print(f"\nbarge-in on the file clock: the answer stopped {latency * 1000:.0f} ms after the user started talking")
    assert latency <= 0.15
    assert spans[-1][0] > onset + len(second) / RATE  # and then the second question was answered


def test_wake_phrase(daemons: Daemons, workdir: Path) -> None:
    """Only utterances that start with the phrase are answered; the phrase alone gets "Yes?" and opens the next one.
    ("hey computer": tiny.en spells it reliably; "Jetson" comes back as "Jackson" too, see test_voice.py)"""
    daemon = daemons.start(fake_config(reply="Yes."))
    woken, ignored = say("Hey computer, what is the capital of France?"), say("What color is the sky?")
    alone, after = say("Hey computer."), say("What time is it?")
    wav = question_wav(workdir / "q.wav", (0.3, woken), (4.5, ignored), (7.0, alone), (9.0, after), seconds=12)
    out = voice("--wake", "hey computer", "--socket", str(daemon.socket), "--input-wav", str(wav), "--output-wav",
                str(workdir / "a.wav"))
    assert out.returncode == 0, out.stderr
    answered = [line for line in out.stdout.splitlines() if line.startswith("assistant: ")]
    assert answered == ["assistant: Yes.", "assistant: Yes."], out.stdout  # the first and the fourth
    assert "not for me" in out.stderr and "What color is the sky?" in out.stderr
    assert stats(daemon)["requests"].get("chat") == 2  # the phrase alone was answered "Yes?" without the daemon


# --- devices ------------------------------------------------------------------------------------------------------
# A short first sentence, then one that flows for ~9 s without a pause (no commas): wherever the interruption falls
# in it, the answer is sounding, so the moment it stops is measurable.
DEVICE_REPLY = ("Paris is the capital. It lies on the river Seine in the north of the country where millions of "
                "people live and work and visit the museums every single day of the year and many more come from "
                "far away to see it")


def test_sound_devices_end_to_end_with_barge_in(daemons: Daemons, workdir: Path) -> None:
    """Real PortAudio I/O: the question and, while the answer plays, a second question; then Ctrl-C."""
    daemon = daemons.start(fake_config(reply=DEVICE_REPLY, token_delay_ms=5))
    first, second = say(QUESTION), say("Tell me about Germany instead.")
    onset = 5.5
    capture = np.zeros(11 * RATE, np.float32)
    capture[RATE // 2:RATE // 2 + len(first)] = first
    capture[int(onset * RATE):int(onset * RATE) + len(second)] = second
    (np.clip(capture, -1, 1) * 32767).astype("<i2").tofile(workdir / "mic.raw")
    env = alsa_file_devices(workdir, workdir / "mic.raw", workdir / "speaker.raw")
    listed = voice("--list-devices", env=env)
    assert listed.returncode == 0 and " mic " in listed.stdout and " speaker " in listed.stdout
    (workdir / "voice.yaml").write_text("voice: {max_tokens: 256}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge_llama", "voice", "--config", str(workdir / "voice.yaml"),
                             "--socket", str(daemon.socket), "--input-device", "mic", "--output-device", "speaker"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env})
    assert proc.stdout is not None and proc.stderr is not None
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    err.wait_for(lambda lines: any("[ready:" in line for line in lines))  # models loaded; both streams start
    # The second question heard, and its answer sounding for a second on the process's audio clock.
    out.wait_for(lambda lines: sum(line.startswith("you: ") for line in lines) == 2, timeout=60)
    def second_answer_sounding() -> bool:
        spans = voiced_spans(np.fromfile(workdir / "speaker.raw", "<i2").astype(np.float32) / 32768, 22050, 0.2)
        return bool(spans) and spans[-1][0] > onset + 1.0 and audio_clock(workdir / "speaker.raw") > spans[-1][0] + 1

    wait_until(second_answer_sounding, timeout=60, what="the second answer")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    stdout, stderr = out.text(), err.text()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    said = heard(stdout)
    assert len(said) == 2, stdout
    assert wer(QUESTION, said[0]) <= 0.2 and "Germany" in said[1], stdout
    played = np.fromfile(workdir / "speaker.raw", "<i2").astype(np.float32) / 32768
    spans = voiced_spans(played, 22050, gap_s=0.2)  # espeak-ng's rate, which the device took
    question_end = 0.5 + np.nonzero(np.abs(first) > 0.01)[0][-1] / RATE
    assert spans[0][0] - question_end < 2.0, spans  # heard, recognized, answered and speaking within 2 s
    cut = next(end for start, end in spans if start < onset < end + 0.2)
    latency = cut - (onset + np.nonzero(np.abs(second) > 0.01)[0][0] / RATE)
    print(f"\nbarge-in on ALSA devices: playback stopped {latency * 1000:.0f} ms after the user started talking")
    assert latency <= 0.15, spans
    assert spans[-1][0] > onset + 1.0  # the second question got its own answer
    # (The daemon had finished generating this one; the cancel op is checked on the file clock above.)
    assert "forget" in daemons.log(daemon)  # Ctrl-C left cleanly, forgetting the unnamed session


def test_push_to_talk_hears_only_while_enter_is_held(daemons: Daemons, workdir: Path) -> None:
    """--ptt on a terminal: the terminal repeats a held Enter; speech outside the hold is not heard."""
    import pexpect

    daemon = daemons.start(fake_config(reply="Paris."))
    question, outside = say(QUESTION), say("Nobody is holding the key now.")
    capture = np.zeros(9 * RATE, np.float32)
    capture[RATE // 2:RATE // 2 + len(question)] = question
    capture[int(4.5 * RATE):int(4.5 * RATE) + len(outside)] = outside
    (np.clip(capture, -1, 1) * 32767).astype("<i2").tofile(workdir / "mic.raw")
    env = {**ENV, **alsa_file_devices(workdir, workdir / "mic.raw", workdir / "speaker.raw")}
    child = pexpect.spawn(sys.executable, ["-m", "edge_llama", "voice", "--ptt", "--socket", str(daemon.socket),
                                           "--input-device", "mic", "--output-device", "speaker"],
                          env=env, encoding="utf-8", timeout=60)
    child.expect(r"\[ready:.*hold Enter to talk")
    speaker = workdir / "speaker.raw"
    wait_until(lambda: audio_clock(speaker) >= 0.3, what="the audio clock at 0.3 s")
    while audio_clock(speaker) < 0.5 + len(question) / RATE + 0.3:  # held over the question
        child.send("\r")
        time.sleep(0.03)  # not a wait: the terminal's key repeat, every 30 ms while the key is down
    child.expect("you: ")
    child.expect("assistant: Paris.")
    # The second sentence (4.5 s to 6.5 s of the capture) plays into a released key.
    wait_until(lambda: audio_clock(speaker) >= 7.0, timeout=30, what="the audio clock past the second sentence")
    child.send("/exit\r")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    said = [line[5:] for line in child.before.splitlines() if "you: " in line]
    assert not said, child.before  # nothing heard after the key was let go
    assert stats(daemon)["requests"].get("chat") == 1


def test_ctrl_c_during_an_answer_cancels_it_on_the_daemon(daemons: Daemons, workdir: Path) -> None:
    daemon = daemons.start(fake_config(reply=LONG_REPLY, token_delay_ms=200))  # 40 s of generation
    question = say(QUESTION)
    capture = np.zeros(6 * RATE, np.float32)
    capture[RATE // 2:RATE // 2 + len(question)] = question
    (np.clip(capture, -1, 1) * 32767).astype("<i2").tofile(workdir / "mic.raw")
    env = {**ENV, **alsa_file_devices(workdir, workdir / "mic.raw", workdir / "speaker.raw")}
    proc = subprocess.Popen([sys.executable, "-m", "edge_llama", "voice", "--socket", str(daemon.socket),
                             "--input-device", "mic", "--output-wav", str(workdir / "a.wav")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("you: ")  # heard
    wait_until(lambda: stats(daemon)["queue"]["admitted"] >= 1, what="the answer being generated")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "[interrupted]" in stdout
    assert cancelled_on_the_daemon(daemon), stats(daemon)
    assert "forget" in daemons.log(daemon)


def test_no_input_device_unknown_device_and_ptt_without_terminal(workdir: Path) -> None:
    env = alsa_file_devices(workdir, workdir / "mic.raw", workdir / "speaker.raw")
    (workdir / "mic.raw").write_bytes(b"")
    one_line_error(voice("--input-device", "usb-headset", env=env), 2, "edge-llama: no input device matches")
    one_line_error(voice("--ptt", "--input-wav", "x.wav"), 2, "edge-llama: --ptt needs a microphone")
    if Path("/proc/asound/cards").exists() and "no soundcards" not in Path("/proc/asound/cards").read_text():
        # (An empty ALSA configuration does not hide the cards: alsa-lib aborts the process on it.)
        pytest.skip("on a Jetson: needs a machine without a sound card (Orin's APE card is always present); CI "
                    "checks it")
    one_line_error(voice(), 2, "edge-llama: no audio input device")


def test_unsupported_sample_rate_and_unreadable_wav(workdir: Path) -> None:
    write_wav(workdir / "4k.wav", np.zeros(4000, np.float32), 4000)
    one_line_error(voice("--input-wav", str(workdir / "4k.wav"), "--output-wav", str(workdir / "a.wav")), 2,
                   "edge-llama: " + str(workdir / "4k.wav") + ": sample rate 4000 Hz is not supported")
    (workdir / "text.wav").write_text("not audio")
    one_line_error(voice("--input-wav", str(workdir / "text.wav"), "--output-wav", str(workdir / "a.wav")), 2,
                   "edge-llama: " + str(workdir / "text.wav") + ": not a PCM WAV file")


def test_daemon_down_is_retried_then_one_clear_line(daemons: Daemons, workdir: Path) -> None:
    wav = question_wav(workdir / "q.wav", (0.3, say(QUESTION)), seconds=3)
    (workdir / "voice.yaml").write_text("voice: {daemon_wait_s: 1}\n")
    sock = workdir / "d.sock"
    out = voice("--config", str(workdir / "voice.yaml"), "--socket", str(sock), "--input-wav", str(wav),
                "--output-wav", str(workdir / "a.wav"))
    assert f"[waiting for the daemon at {sock}" in out.stderr
    one_line_error(out, 3, f"edge-llama: the edge-llama daemon is not running at {sock}")
    # Started while the voice process waits: it carries on.
    (workdir / "voice.yaml").write_text("voice: {daemon_wait_s: 60}\n")
    proc = subprocess.Popen([sys.executable, "-m", "edge_llama", "voice", "--config", str(workdir / "voice.yaml"),
                             "--socket", str(sock), "--input-wav", str(wav), "--output-wav", str(workdir / "a.wav")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stderr is not None
    while "[waiting for the daemon" not in proc.stderr.readline():  # loading its models, then waiting
        assert proc.poll() is None, proc.stderr.read()
    daemons.start(fake_config(reply="Paris."))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "assistant: Paris." in stdout, stderr


def test_status_line_on_a_terminal(daemons: Daemons, workdir: Path) -> None:
    import pexpect

    daemon = daemons.start(fake_config(reply=REPLY))
    wav = question_wav(workdir / "q.wav", (0.3, say(QUESTION)), seconds=3)
    child = pexpect.spawn(sys.executable, ["-m", "edge_llama", "voice", "--socket", str(daemon.socket),
                                           "--input-wav", str(wav), "--output-wav", str(workdir / "a.wav")],
                          env=ENV, encoding="utf-8", timeout=60)
    seen = []
    for pattern in [r"\[listening\]", r"\[hearing  \]", r"\[thinking \]", "you: What is the boiling point",
                    r"\[speaking \] The capital of France is Paris.", "assistant: "]:
        child.expect(pattern)
        seen.append(pattern)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, seen


def test_voice_service_unit_verifies(workdir: Path) -> None:
    import shutil

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    units = Path(__file__).resolve().parent.parent / "systemd"
    venv = Path(sys.executable).parent.parent
    for name in ("edge-llama-voice.service", "edge-llama.service", "edge-llama.socket"):
        (workdir / name).write_text((units / name).read_text().replace("/opt/edge-llama/venv", str(venv)))
    out = subprocess.run(["systemd-analyze", "verify", "edge-llama-voice.service"], cwd=workdir,
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    text = (units / "edge-llama-voice.service").read_text()
    for line in ("SupplementaryGroups=audio edge-llama-clients", "DevicePolicy=closed", "DeviceAllow=char-alsa rw",
                 "After=edge-llama.socket", "Restart=on-failure"):
        assert line in text.splitlines() or any(ln.startswith(line) for ln in text.splitlines()), line
    skip_without_offline_security()
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=15",
                          "edge-llama-voice.service"], cwd=workdir, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-400:]
    print(out.stdout.strip().splitlines()[-1])
