"""`make demo`: start the daemon on the embedded model, stream a chat answer and a summary through the real
socket, stop the daemon cleanly."""

from __future__ import annotations

import sys
import tempfile
import time
from importlib.resources import files
from pathlib import Path

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess

QUESTION = "Give me three short tips for staying focused while studying."


def stream(client: Client, request: dict) -> dict:
    done: dict = {}
    for event in client.events(client.send(request)):
        if event["event"] == "token":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif event["event"] == "progress" and event["done"] < event["total"]:
            chunks = max(event["total"] - 1, 1)  # with more than one chunk, a last step combines their summaries
            step = f"chunk {event['done'] + 1} of {chunks}" if event["done"] < chunks else "combining the summaries"
            sys.stderr.write(f"  [{step}]\n")
        elif event["event"] == "done":
            done = event
    print()
    return done


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="el-demo-", dir="/tmp"))
    sock = workdir / "edge-llama.sock"
    print(f"== starting the daemon on {sock} (embedded SmolLM2-135M-Instruct, llama.cpp on the CPU)")
    started = time.monotonic()
    daemon = DaemonProcess(sock, ["--state-dir", str(workdir / "state"), "--kv-tokens", "512"],
                           log=workdir / "daemon.log")
    try:
        health = daemon.wait_ready()
        print(f"   ready in {time.monotonic() - started:.1f} s: model {health['model']!r}, "
              f"KV budget {health['kv_tokens']} tokens")
        with Client(sock) as client:
            print(f"\n== chat (streamed)\n> {QUESTION}")
            done = stream(client, {"op": "chat", "messages": [{"role": "user", "content": QUESTION}],
                                   "temperature": 0.0, "max_tokens": 160})
            t = done["timings"]
            print(f"   [{done['usage']['completion_tokens']} tokens, first token {t['ttft_ms']:.0f} ms, "
                  f"{t['decode_tok_s']:.0f} tok/s, finish {done['finish_reason']}]")
            text = files("edge_llama").joinpath("data/sample.txt").read_text(encoding="utf-8")
            print(f"\n== summary of the bundled text ({len(text.split())} words)")
            done = stream(client, {"op": "summarize", "text": text, "max_tokens": 120})
            print(f"   [{done['chunks']} chunk(s), {done['usage']['prompt_tokens']} prompt tokens]")
    finally:
        status = daemon.stop()
    print(f"\n== daemon stopped (exit status {status}); log: {workdir / 'daemon.log'}")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
