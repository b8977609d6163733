"""What the safety hook costs, in one run:
- check latency: the daemon's output check (default policy: the `offensive` classifier in word windows, as the
  streaming guard runs it) and its input check (both classifiers) on a 256-character text, p50 and p99;
- guard_ratio: end-to-end generation speed through the real daemon (llama.cpp, embedded model) with the streaming
  guard on / off, same prompts, greedy, alternating between two daemons. Speed = completion tokens / time from
  sending the request to `done`, measured by the client; decode tok/s as reported by the daemon is also given;
- first-text latency (ttft): time from sending the request to the first `token` event, client side, p50 over the
  same prompts, guard on / off (the daemons differ only in `safety.enabled`); ttft_added_ms = on - off.

Last line: one JSON object with check_p50_ms, guard_ratio and ttft_added_ms. Targets: check_p50_ms <= 0.2,
guard_ratio >= 0.97, ttft_added_ms <= 15.

    .venv/bin/python tools/bench/safety.py [--prompts 8] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from edge_llama.client import Client
from edge_llama.config import SafetyConfig
from edge_llama.launch import DaemonProcess
from edge_llama.safety.hooks import SafetyPolicy

TEXT = ("Please summarize the quarterly report and list the three main risks for the board meeting; keep the "
        "numbers, the names of the owners and the deadlines, and add one sentence on what changed since the last "
        "review of the plan.")[:256].ljust(256, ".")
TOPICS = ["a lighthouse keeper", "a robot learning to paint", "the first day of spring", "a lost umbrella",
          "a city under the sea", "an old clock", "a chess match", "a train at night", "a mountain village",
          "a letter never sent"]


def latency(policy: SafetyPolicy, kind: str, runs: int) -> tuple[float, float]:
    for _ in range(200):
        policy.check([TEXT], kind)  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        policy.check([TEXT], kind)
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def run(client: Client, text: str, max_tokens: int) -> dict:
    sent = time.perf_counter()
    first = 0.0
    for event in client.events(client.send({"op": "chat", "messages": [{"role": "user", "content": text}],
                                            "temperature": 0, "max_tokens": max_tokens, "stream": True})):
        if event["event"] == "token" and not first:
            first = time.perf_counter()
        done = event
    elapsed = time.perf_counter() - sent
    return {"e2e_tok_s": done["usage"]["completion_tokens"] / elapsed, "decode_tok_s": done["timings"]["decode_tok_s"],
            "tokens": done["usage"]["completion_tokens"], "finish": done["finish_reason"],
            "first_text_ms": (first - sent) * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5000)
    args = parser.parse_args()

    policy = SafetyPolicy.from_config(SafetyConfig())
    out_p50, out_p99 = latency(policy, "output", args.runs)
    in_p50, in_p99 = latency(policy, "input", args.runs)

    workdir = Path(tempfile.mkdtemp(prefix="el-sbench-", dir="/tmp"))
    configs = {"on": {}, "off": {"safety": {"enabled": False}}}
    daemons = {}
    for name, extra in configs.items():
        (workdir / f"{name}.yaml").write_text(json.dumps({"engine": {"kv_tokens": 2048},
                                                          "server": {"state_dir": str(workdir / name)}, **extra}))
        daemons[name] = DaemonProcess(workdir / f"{name}.sock", ["--config", str(workdir / f"{name}.yaml")],
                                      log=workdir / f"{name}.log")
    rows = []
    try:
        for d in daemons.values():
            d.wait_ready()
        clients = {name: Client(d.socket) for name, d in daemons.items()}
        for c in clients.values():
            run(c, "Warm up.", 8)
        for i in range(args.prompts):
            text = f"Write a long story about {TOPICS[i % len(TOPICS)]}."
            order = ("on", "off") if i % 2 == 0 else ("off", "on")
            row = {}
            for name in order:
                time.sleep(0.3)
                row[name] = run(clients[name], text, args.max_tokens)
            rows.append(row)
            print(f"prompt {i}: guard on {row['on']['e2e_tok_s']:.1f} tok/s ({row['on']['finish']}), first text "
                  f"{row['on']['first_text_ms']:.1f} ms; off {row['off']['e2e_tok_s']:.1f} tok/s, first text "
                  f"{row['off']['first_text_ms']:.1f} ms", file=sys.stderr)
    finally:
        for d in daemons.values():
            d.stop()
    on = statistics.median(r["on"]["e2e_tok_s"] for r in rows)
    off = statistics.median(r["off"]["e2e_tok_s"] for r in rows)
    ttft_on = statistics.median(r["on"]["first_text_ms"] for r in rows)
    ttft_off = statistics.median(r["off"]["first_text_ms"] for r in rows)
    print(json.dumps({
        "check_p50_ms": round(out_p50, 4), "check_p99_ms": round(out_p99, 4),
        "input_check_p50_ms": round(in_p50, 4), "input_check_p99_ms": round(in_p99, 4),
        "guard_ratio": round(on / off, 4), "guard_on_tok_s": round(on, 1), "guard_off_tok_s": round(off, 1),
        "decode_tok_s_on": round(statistics.median(r["on"]["decode_tok_s"] for r in rows), 1),
        "decode_tok_s_off": round(statistics.median(r["off"]["decode_tok_s"] for r in rows), 1),
        # The guard holds the first word until the next token shows it complete: one decode step, no window.
        "ttft_guard_on_ms": round(ttft_on, 1), "ttft_guard_off_ms": round(ttft_off, 1),
        "ttft_added_ms": round(ttft_on - ttft_off, 1),
        "same_token_counts": all(r["on"]["tokens"] == r["off"]["tokens"] for r in rows),
        "prompts": len(rows), "max_tokens": args.max_tokens, "text_chars": len(TEXT),
        "targets": {"check_p50_ms": 0.2, "guard_ratio": 0.97, "ttft_added_ms": 15},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
