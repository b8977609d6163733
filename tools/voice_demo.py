"""`make voice-demo`: start the daemon on the embedded model, let `edge-llama voice` hear the bundled question
(edge_llama/data/voice/question.wav) and speak the answer into voice-demo.wav (or the path given), stop the daemon.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/voice_demo.py [OUT.wav]
"""

from __future__ import annotations

import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from edge_llama.cli import main
from edge_llama.launch import DaemonProcess


def demo(out: str = "voice-demo.wav") -> int:
    question = str(files("edge_llama") / "data" / "voice" / "question.wav")
    workdir = Path(tempfile.mkdtemp(prefix="el-voice-demo-", dir="/tmp"))
    print(f"== starting the daemon (embedded SmolLM2-135M) on {workdir / 'd.sock'}")
    daemon = DaemonProcess(workdir / "d.sock", ["--state-dir", str(workdir / "state")], log=workdir / "daemon.log")
    try:
        daemon.wait_ready(timeout=120)
        print(f"== edge-llama voice --input-wav {question} --output-wav {out}")
        status = main(["voice", "--socket", str(workdir / "d.sock"), "--input-wav", question, "--output-wav", out])
    finally:
        daemon.stop()
    if status == 0:
        print(f"== the spoken answer is in {out} (play it with: aplay {out})")
    return status


if __name__ == "__main__":
    sys.exit(demo(*sys.argv[1:2]))
