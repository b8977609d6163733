"""Reliability of the daemon, with figures: the real `edge-llama serve` in child processes on temporary sockets.

Sections (each reports `unexpected`: answers that break the contract; it must be 0):
- parser_fuzz, socket_fuzz: property-based fuzzing (hypothesis) of protocol.parse_request in-process, and of the
  live socket (frames batched, split across writes, oversized); every line gets exactly one structured answer and
  the daemon still serves a chat afterwards.
- concurrency: N clients x M chats against server.max_queue 4: each ends `done` or `busy` with retry_after_ms;
  then clients that honour retry_after_ms all finish. Latency p50/p99 (ms).
- disconnect: a client leaves mid-prefill or mid-stream; the engine is freed within a token (the next request's
  queue_ms) and no admission leaks.
- sigkill: session chats while the daemon is SIGKILLed at random moments; every session file holds the previous or
  the new conversation, never half (`corrupt` must be 0), and the sessions go on after the restart.
- sigterm: in-flight requests each end with one `done` or `error`; exit status 0 within shutdown_grace_s + 5 s.
- full_disk: a full (tmpfs) or unwritable state directory: clear session errors, no corrupted session, chats
  without sessions served.
- memory: VmRSS (MiB) of the daemon on the embedded model after each of 10 rounds of load.
- loop_stall: stats `loop.max_stall_ms` while a 1 MiB summary (fake engine) and a 32 KiB one (embedded model: a
  1 MiB summary takes ~20 minutes on 2 cores) run next to a session-heavy chat; target < 20 ms.
The scripted-engine sections run with the safety guard off (exact timing); memory and loop_stall with defaults.
--quick: reduced sizes, memory on the scripted engine and no embedded-model loop_stall (a smoke test, < 60 s).
The last line is one JSON object with every figure. Exit status 1 when anything unexpected or corrupt was seen.

    .venv/bin/python tools/bench/reliability.py [--quick] [--seed 1] [--only sigkill,sigterm]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from reliability_common import Lab
from reliability_disk import full_disk
from reliability_faults import concurrency, disconnect, sigkill, sigterm
from reliability_fuzz import parser_fuzz, socket_fuzz
from reliability_model import loop_stall, memory

FULL = {"parser_frames": 5000, "socket_frames": 3000, "clients": 16, "requests": 10, "disconnect_reps": 5,
        "kills": 20, "kill_sessions": 4, "term_clients": 6, "memory_rounds": 10, "memory_tokens": 48,
        "fake_doc_bytes": 1 << 20, "fake_turns": 60, "real_doc_bytes": 32 << 10, "real_turns": 20, "real": 1}
QUICK = {"parser_frames": 200, "socket_frames": 150, "clients": 8, "requests": 2, "disconnect_reps": 1,
         "kills": 2, "kill_sessions": 2, "term_clients": 4, "memory_rounds": 2, "memory_tokens": 16,
         "fake_doc_bytes": 128 << 10, "fake_turns": 5, "real_doc_bytes": 0, "real_turns": 0, "real": 0}


def sections(lab: Lab, size: dict[str, int], seed: int, disk: str) -> dict[str, Callable[[], dict[str, Any]]]:
    out: dict[str, Callable[[], dict[str, Any]]] = {
        "parser_fuzz": lambda: parser_fuzz(size["parser_frames"], seed),
        "socket_fuzz": lambda: socket_fuzz(lab, size["socket_frames"], seed),
        "concurrency": lambda: concurrency(lab, size["clients"], size["requests"]),
        "disconnect": lambda: disconnect(lab, size["disconnect_reps"]),
        "sigkill": lambda: sigkill(lab, size["kills"], size["kill_sessions"], seed),
        "sigterm": lambda: sigterm(lab, size["term_clients"], grace_s=1.5),
        "full_disk": lambda: full_disk(lab, force_unwritable=disk == "unwritable"),
        "memory": lambda: memory(lab, size["memory_rounds"], size["memory_tokens"], real=bool(size["real"])),
        "loop_stall_fake": lambda: loop_stall(lab, False, size["fake_doc_bytes"], size["fake_turns"]),
    }
    if size["real_doc_bytes"]:
        out["loop_stall_real"] = lambda: loop_stall(lab, True, size["real_doc_bytes"], size["real_turns"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes: a smoke test of every section")
    parser.add_argument("--seed", type=int, default=1, help="fuzzing and kill timing are reproducible per seed")
    parser.add_argument("--only", help="comma-separated section names")
    parser.add_argument("--disk", choices=["auto", "unwritable"], default="auto",
                        help="full_disk: a tmpfs when possible (auto), or always the unwritable-directory fallback")
    parser.add_argument("--real-doc-kib", type=int, help="loop_stall_real's document size (KiB)")
    parser.add_argument("--keep", action="store_true", help="keep the lab directory (daemon logs, state) when "
                        "something unexpected was seen")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    if args.real_doc_kib is not None:
        size["real_doc_bytes"] = args.real_doc_kib << 10
    started = time.monotonic()
    lab = Lab()
    report: dict[str, Any] = {}
    try:
        todo = sections(lab, size, args.seed, args.disk)
        for name in args.only.split(",") if args.only else todo:
            t0 = time.monotonic()
            try:
                report[name] = todo[name]()
            except Exception as exc:  # noqa: BLE001 - a section that breaks is reported; the others still run
                traceback.print_exc()
                report[name] = {"failed": f"{type(exc).__name__}: {exc}", "unexpected": 1}
            summary = {k: v for k, v in report[name].items() if not isinstance(v, (dict, list))}
            print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(summary)}", file=sys.stderr, flush=True)
    finally:
        unexpected = sum(int(section.get("unexpected", 0)) for section in report.values())
        corrupt = int(report.get("sigkill", {}).get("corrupt", 0))
        lab.close(keep=args.keep and bool(unexpected or corrupt))
        if args.keep and (unexpected or corrupt):
            print(f"logs kept in {lab.root}", file=sys.stderr)
    print(json.dumps({**report, "unexpected": unexpected, "corrupt": corrupt, "quick": args.quick,
                      "seed": args.seed, "seconds": round(time.monotonic() - started, 1)}))
    return 1 if unexpected or corrupt else 0


if __name__ == "__main__":
    raise SystemExit(main())
