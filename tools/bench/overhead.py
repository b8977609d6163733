"""What the daemon costs over calling the backend directly: the same prompts through the Unix socket and straight
into the llama.cpp engine, alternating, in one run.

The daemon runs with its safety guard off (tools/bench/safety.py measures that separately). Both sides use the
same model, thread count, KV budget, template and greedy decoding, so they produce the same
tokens (checked). Each prompt is new to both KV caches. Client-side timings for the socket: TTFT from sending
the request line to the first token line; decode rate from the first to the last token line.

Last line: one JSON object with decode_ratio (socket decode tok/s / direct, medians) and ttft_added_ms (p50 of the
per-prompt difference), and resident memory (MiB) of the daemon next to this process, which holds the same
engine. Targets: decode_ratio >= 0.97, ttft_added_ms <= 5.

    .venv/bin/python tools/bench/overhead.py [--prompts 12] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from edge_llama.client import Client
from edge_llama.config import EngineConfig
from edge_llama.engine.base import GenParams
from edge_llama.engine.llamacpp import LlamaCppEngine
from edge_llama.launch import DaemonProcess
from edge_llama.prompting.template import template_for
from edge_llama.protocol import Message

TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first day of spring", "a lost umbrella",
          "a city under the sea", "an old clock", "a chess match", "a train at night", "a mountain village",
          "a letter never sent", "the last bookshop", "a friendly dragon"]
KV_TOKENS = 2048


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def via_socket(client: Client, text: str, max_tokens: int) -> dict:
    """One streamed greedy chat through a daemon; client-side timings."""
    sent = time.perf_counter()
    rid = client.send({"op": "chat", "messages": [{"role": "user", "content": text}], "temperature": 0,
                       "max_tokens": max_tokens})
    first = last = 0.0
    pieces = []
    for event in client.events(rid):
        if event["event"] == "token":
            last = time.perf_counter()
            first = first or last
            pieces.append(event["text"])
        elif event["event"] == "done":
            done = event
    n = done["usage"]["completion_tokens"]
    return {"ttft_ms": (first - sent) * 1000, "decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0,
            "tokens": n, "text": "".join(pieces), "prompt_tokens": done["usage"]["prompt_tokens"]}


def direct(engine: LlamaCppEngine, template, text: str, max_tokens: int) -> dict:  # type: ignore[no-untyped-def]
    ids = template.tokenize([Message("user", text)], engine.tokenize)  # as the daemon does
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    pieces = []
    for chunk in engine.generate(ids, GenParams(max_tokens=max_tokens, temperature=0.0), threading.Event()):
        if chunk.finish is None:
            n += 1
            last = time.perf_counter()
            first = first or last
        pieces.append(chunk.text)
    return {"ttft_ms": (first - start) * 1000, "decode_tok_s": (n - 1) / (last - first), "tokens": n,
            "text": "".join(pieces), "step_s": last - start}


def start_daemon(workdir: Path, config: str = "") -> DaemonProcess:
    """The daemon the benchmarks measure: the embedded model, KV_TOKENS, the safety guard off (this measures the
    daemon's own cost: socket, protocol, scheduling; tools/bench/safety.py measures the guard's). `config`: more
    YAML."""
    (workdir / "config.yaml").write_text("safety:\n  enabled: false\n" + config)
    return DaemonProcess(workdir / "s.sock", ["--state-dir", str(workdir / "state"), "--kv-tokens", str(KV_TOKENS),
                                              "--config", str(workdir / "config.yaml")], log=workdir / "daemon.log")


def compare(rows: list[dict], side: str, baseline: str) -> dict[str, float]:
    """decode_ratio (median decode rates, side / baseline), ttft_added_ms (per-prompt differences: p50, p90) and
    each side's medians."""
    decode = {name: statistics.median(r[name]["decode_tok_s"] for r in rows) for name in (side, baseline)}
    added = [r[side]["ttft_ms"] - r[baseline]["ttft_ms"] for r in rows]
    return {
        "decode_ratio": round(decode[side] / decode[baseline], 4),
        "ttft_added_ms": round(percentile(added, 0.5), 2),
        "ttft_added_p90_ms": round(percentile(added, 0.9), 2),
        **{f"{name}_decode_tok_s": round(decode[name], 1) for name in (side, baseline)},
        **{f"{name}_ttft_ms_p50": round(percentile([r[name]["ttft_ms"] for r in rows], 0.5), 1)
           for name in (side, baseline)},
    }


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident memory of a process in MiB: total, peak, and anonymous (what cannot be paged back to a file)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM", "RssAnon")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    daemon = start_daemon(Path(tempfile.mkdtemp(prefix="el-bench-", dir="/tmp")))
    engine = LlamaCppEngine(EngineConfig(kv_tokens=KV_TOKENS))
    engine.load()
    template = template_for(None, engine.template_info)
    rows = []
    try:
        daemon.wait_ready()
        with Client(daemon.socket) as client:
            via_socket(client, "Warm up.", 8)
            direct(engine, template, "Warm up.", 8)
            for i in range(args.prompts):
                text = f"Write a long story about {TOPICS[i % len(TOPICS)]}."
                order = ("socket", "direct") if i % 2 == 0 else ("direct", "socket")
                result = {}
                for side in order:
                    time.sleep(0.3)  # let the other side's threads go idle
                    result[side] = (via_socket(client, text, args.max_tokens) if side == "socket"
                                    else direct(engine, template, text, args.max_tokens))
                rows.append(result)
                print(f"prompt {i}: socket {result['socket']['decode_tok_s']:.1f} tok/s "
                      f"ttft {result['socket']['ttft_ms']:.1f} ms | direct {result['direct']['decode_tok_s']:.1f} "
                      f"tok/s ttft {result['direct']['ttft_ms']:.1f} ms | tokens {result['socket']['tokens']}",
                      file=sys.stderr)
        memory = {"daemon": rss_mb(daemon.proc.pid), "direct": rss_mb()}
    finally:
        daemon.stop()
        engine.close()

    print(json.dumps({
        **compare(rows, "socket", "direct"),
        # The daemon process vs this one, which holds the same engine (same model and KV budget) plus the client.
        "daemon_rss_mb": memory["daemon"]["VmRSS"], "direct_rss_mb": memory["direct"]["VmRSS"],
        "rss_added_mb": round(memory["daemon"]["VmRSS"] - memory["direct"]["VmRSS"], 1),
        "daemon_peak_rss_mb": memory["daemon"]["VmHWM"], "daemon_anon_rss_mb": memory["daemon"]["RssAnon"],
        "same_tokens": all(r["socket"]["text"] == r["direct"]["text"] for r in rows),
        "prompts": len(rows), "max_tokens": args.max_tokens, "kv_tokens": KV_TOKENS,
        "model": "SmolLM2-135M-Instruct Q4_1 (embedded)", "targets": {"decode_ratio": 0.97, "ttft_added_ms": 5},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
