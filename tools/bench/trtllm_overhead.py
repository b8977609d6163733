"""What our Python path costs per token on the TensorRT-LLM backend, with the stand-in executor (tests/trtllm_standin)
making tokens as fast as it can (EDGE_LLAMA_STANDIN_TOKEN_MS=0): on a Jetson the GPU takes ~10-20 ms a token, and
this is what we add on the CPU on top of it.

Three ways to read one long greedy reply (REPLY tokens, no end token), alternating, several rounds:
- executor: the stand-in executor alone, a bare enqueue_request / await_responses(id, timeout) loop -- its own rate;
- engine:   TrtLlmEngine.generate in this process (request, per-request waits, end checks, detokenization, chunks);
- daemon:   a real daemon on the stand-in (safety guard off, as tools/bench/overhead.py), a streamed chat over its
            socket, read with edge_llama.client: backend + scheduler + protocol + socket.
Cost per token = CPU time per token (all threads of the process: this one for executor and engine, the daemon's
for daemon) minus the executor's own; CPU time, not wall time, because a shared machine makes wall times swing
by 2-3x between rounds (the wall-clock rates are printed too). Medians over the rounds, which alternate the three.
Target: daemon_us_per_token <= 100 (backend + scheduler + socket, the client's own work not counted).

    .venv/bin/python tools/bench/trtllm_overhead.py [--rounds 5] [--tokens 3000] [--token-ms 0]

--token-ms 0 (the default): tokens come in bursts, several per response, as fast as the stand-in makes them.
--token-ms 1: every token its own response, as on a GPU (~10-20 ms a token there); fixed costs per response
(a wake-up, a chunk, a scheduler hand-off) are then paid per token.

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # the stand-in and its helpers live with the tests

from conftest import STANDIN, make_trtllm_checkpoint, put_trtllm_build_on_path  # noqa: E402

from edge_llama.client import Client  # noqa: E402
from edge_llama.config import EngineConfig  # noqa: E402
from edge_llama.engine.base import GenParams  # noqa: E402
from edge_llama.launch import DaemonProcess  # noqa: E402
from edge_llama.pipeline.build import build  # noqa: E402
from edge_llama.pipeline.plan import PlanOptions, plan  # noqa: E402

KV_TOKENS = 4096
PROMPT = "Tell me a long story."


def make_engine(workdir: Path) -> Path:
    os.environ["PATH"] = put_trtllm_build_on_path(workdir / "bin")["PATH"]
    checkpoint = make_trtllm_checkpoint(workdir / "ckpt")
    (workdir / "plan.json").write_text(json.dumps(plan(PlanOptions(device="orin-nano-8gb"))))
    build(checkpoint, workdir / "plan.json", workdir / "engine")
    return workdir / "engine"


def daemon_cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of a process (/proc schedstat: nanoseconds on a CPU)."""
    return sum(int((task / "schedstat").read_text().split()[0]) for task in Path(f"/proc/{pid}/task").iterdir()
               if (task / "schedstat").exists()) / 1e9


def measured(read, cpu) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds) of one reply, per token."""
    wall, used = time.perf_counter(), cpu()
    tokens = read()
    return (time.perf_counter() - wall) / tokens, (cpu() - used) / tokens


def executor_alone(engine, tokens: int) -> int:  # type: ignore[no-untyped-def]
    """The stand-in executor read by a bare loop (same engine folder, same config)."""
    import tensorrt_llm.bindings.executor as trtllm

    executor = engine._executor
    request = trtllm.Request(input_token_ids=engine.tokenize(PROMPT), max_new_tokens=tokens, streaming=True,
                             sampling_config=trtllm.SamplingConfig(beam_width=1, top_k=1), end_id=128001)
    wait = datetime.timedelta(milliseconds=20)
    request_id = executor.enqueue_request(request)
    got, final = 0, False
    while not final:
        for response in executor.await_responses(request_id, wait):
            got += len(response.result.output_token_ids[0])
            final = response.result.is_final
    assert got == tokens, got
    return tokens


def engine_path(engine, tokens: int) -> int:  # type: ignore[no-untyped-def]
    n = sum(chunk.finish is None for chunk in engine.generate(engine.tokenize(PROMPT), GenParams(
        max_tokens=tokens, temperature=0), threading.Event()))
    assert n == tokens, n
    return tokens


def daemon_path(client: Client, tokens: int) -> int:
    rid = client.send({"op": "chat", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                       "max_tokens": tokens})
    done = [e for e in client.events(rid) if e["event"] == "done"][0]
    assert done["usage"]["completion_tokens"] == tokens, done
    return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--token-ms", type=float, default=0.0, help="stand-in delay per token (ms)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="el-trtllm-", dir="/tmp"))
    knobs = {"EDGE_LLAMA_STANDIN_TOKEN_MS": str(args.token_ms), "EDGE_LLAMA_STANDIN_REPLY_TOKENS": "1000000"}
    os.environ.update(knobs)
    folder = make_engine(workdir)
    sys.path.insert(0, str(STANDIN))
    from edge_llama.engine.trtllm import TrtLlmEngine

    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(folder), kv_tokens=KV_TOKENS))
    engine.load()
    (workdir / "config.yaml").write_text(json.dumps({
        "engine": {"backend": "trtllm", "model": str(folder), "kv_tokens": KV_TOKENS},
        "safety": {"enabled": False}, "generation": {"max_tokens_ceiling": args.tokens}}))
    daemon = DaemonProcess(workdir / "s.sock", ["--state-dir", str(workdir / "state"), "--config",
                                                str(workdir / "config.yaml")], log=workdir / "daemon.log",
                           env={"PYTHONPATH": str(STANDIN), **knobs})
    rows: dict[str, list[tuple[float, float]]] = {"executor": [], "engine": [], "daemon": []}
    try:
        daemon.wait_ready()
        pid = daemon.proc.pid
        with Client(daemon.socket, timeout=120) as client:
            sides = {"executor": lambda: measured(lambda: executor_alone(engine, args.tokens), time.process_time),
                     "engine": lambda: measured(lambda: engine_path(engine, args.tokens), time.process_time),
                     "daemon": lambda: measured(lambda: daemon_path(client, args.tokens), lambda: daemon_cpu_s(pid))}
            for side in sides.values():  # warm-up
                side()
            for i in range(args.rounds):
                order = list(sides)[i % 3:] + list(sides)[:i % 3]
                for name in order:
                    time.sleep(0.2)  # let the other side's threads go idle
                    rows[name].append(sides[name]())
                print(f"round {i}: " + ", ".join(f"{name} {rows[name][-1][1] * 1e6:.1f} us CPU "
                                                 f"({rows[name][-1][0] * 1e6:.1f} wall)/token" for name in sides),
                      file=sys.stderr)
    finally:
        daemon.stop()
        engine.close()
    cpu = {name: statistics.median(r[1] for r in values) for name, values in rows.items()}
    wall = {name: statistics.median(r[0] for r in values) for name, values in rows.items()}
    result = {
        "tokens_per_reply": args.tokens, "rounds": args.rounds, "standin_token_ms": args.token_ms,
        "executor_us_per_token": round(cpu["executor"] * 1e6, 1),
        "engine_us_per_token": round((cpu["engine"] - cpu["executor"]) * 1e6, 1),
        "daemon_us_per_token": round((cpu["daemon"] - cpu["executor"]) * 1e6, 1),
        **{f"{name}_wall_us_per_token": round(value * 1e6, 1) for name, value in wall.items()},
        "target_us_per_token": 100,
    }
    result["ok"] = result["daemon_us_per_token"] <= result["target_us_per_token"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
