"""What HTTP costs over protocol v1: the same kind of streaming chat through `POST /v1/chat/completions` (SSE) and
through NDJSON (edge_llama.client), alternating, on one daemon, in one run, each over one kept-alive connection.

Both clients are minimal, so that the figures are the daemon's: NDJSON through edge_llama.client, HTTP through an
h11 client state machine on a plain socket (one write per request). httpx, which the openai client uses, adds
its own ~4 ms to the first token on the client side (measured here: 19 ms against 15 ms for a raw request, with the
scripted engine at 10 ms per token); that is the client's cost, not the daemon's.

The daemon serves the embedded model with its safety guard off (tools/bench/safety.py measures the guard) and
greedy decoding. Both sides share one daemon and so one llama.cpp KV cache, which reuses a common prompt prefix:
each request gets its own opening words ("Story A3" / "Story B3"), so every prompt is new past the chat template
on both sides alike. Client-side timings: TTFT from sending the request to the first text; decode rate from the
first to the last text over the completion tokens after the first (from `usage`).

(Named http_overhead.py: a tools/bench/http.py would shadow the standard library's `http` for httpx.)

Last line: one JSON object with decode_ratio (HTTP decode tok/s / NDJSON, medians) and ttft_added_ms (p50 of the
per-prompt difference). Targets: decode_ratio >= 0.97, ttft_added_ms <= 5.

    .venv/bin/python tools/bench/http_overhead.py [--prompts 12] [--max-tokens 128] [--fake-token-ms 10]
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

import h11
from overhead import KV_TOKENS, TOPICS, compare, start_daemon, via_socket

from edge_llama.client import Client


class HttpClient:
    """HTTP/1.1 on one kept-alive Unix-socket connection, framed by h11."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connect()

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))
        self.conn = h11.Connection(h11.CLIENT)

    def chat(self, text: str, max_tokens: int) -> dict:
        if select.select([self.sock], [], [], 0)[0]:  # idle for the daemon's 60 s: it closed; so do we, reconnected
            self.sock.close()
            self.connect()
        body = json.dumps({"model": "any", "messages": [{"role": "user", "content": text}], "temperature": 0,
                           "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
        head = h11.Request(method="POST", target="/v1/chat/completions", headers=[
            ("host", "localhost"), ("content-type", "application/json"), ("content-length", str(len(body)))])
        request = self.conn.send(head) + self.conn.send(h11.Data(data=body.encode())) + self.conn.send(
            h11.EndOfMessage())
        sent = time.perf_counter()
        self.sock.sendall(request)
        first = last = 0.0
        n = 0
        pending = b""
        while not isinstance(event := self.conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Data):
                *events, pending = (pending + event.data).split(b"\n\n")
                for data in (e[6:] for e in events if e.startswith(b"data: {")):
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        last = time.perf_counter()
                        first = first or last
        self.conn.start_next_cycle()
        return {"ttft_ms": (first - sent) * 1000, "decode_tok_s": (n - 1) / (last - first), "tokens": n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--fake-token-ms", type=float, help="the scripted engine at this many ms per token instead "
                        "of the model: the protocols' own cost, steady even when other work shares the cores")
    args = parser.parse_args()

    fake = (f"engine: {{backend: fake, fake: {{token_delay_ms: {args.fake_token_ms}, reply: '{'word ' * 400}'}}}}\n"
            if args.fake_token_ms else "")
    daemon = start_daemon(Path(tempfile.mkdtemp(prefix="el-bench-", dir="/tmp")), fake)
    rows = []
    try:
        daemon.wait_ready()
        http = HttpClient(daemon.socket)
        with Client(daemon.socket) as ndjson:
            via_socket(ndjson, "Warm up.", 8)
            http.chat("Warm up, too.", 8)
            for i in range(args.prompts):
                topic = TOPICS[i % len(TOPICS)]
                order = ("ndjson", "http") if i % 2 == 0 else ("http", "ndjson")
                result = {}
                for side in order:
                    time.sleep(0.3)  # let the previous request's threads go idle
                    text = f"Story {'A' if side == 'ndjson' else 'B'}{i}: write a long story about {topic}."
                    result[side] = (via_socket(ndjson, text, args.max_tokens) if side == "ndjson"
                                    else http.chat(text, args.max_tokens))
                rows.append(result)
                print(f"prompt {i}: http {result['http']['decode_tok_s']:.1f} tok/s ttft "
                      f"{result['http']['ttft_ms']:.1f} ms | ndjson {result['ndjson']['decode_tok_s']:.1f} tok/s "
                      f"ttft {result['ndjson']['ttft_ms']:.1f} ms | tokens {result['http']['tokens']}/"
                      f"{result['ndjson']['tokens']}", file=sys.stderr)
        http.sock.close()
    finally:
        daemon.stop()

    print(json.dumps({
        **compare(rows, "http", "ndjson"),
        "prompts": len(rows), "max_tokens": args.max_tokens, "kv_tokens": KV_TOKENS,
        "model": f"fake, {args.fake_token_ms:g} ms per token" if fake else "SmolLM2-135M-Instruct Q4_1 (embedded)",
        "targets": {"decode_ratio": 0.97, "ttft_added_ms": 5},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
