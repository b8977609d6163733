"""Load, disconnects and signals, on the scripted engine (exact timing): N clients x M requests against admission
control, disconnects mid-prefill and mid-stream, SIGKILL during session writes, SIGTERM under load."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from reliability_common import (
    Lab,
    RawConnection,
    chat_request,
    fake,
    own_sessions,
    percentile,
    stats,
    wait_idle,
)

from edge_llama.client import Client
from edge_llama.errors import Busy, EdgeLlamaError, Unavailable

MAX_RETRIES = 500  # a client honouring retry_after_ms that still is not served after this many tries: a failure


def run_clients(sock: Path, clients: int, requests: int, honour: bool) -> list[dict[str, Any]]:
    """`clients` threads, each on its own connection sending `requests` chats one after another. With `honour`, a
    `busy` answer is retried after its retry_after_ms. One result per request: outcome, latency (ms, from the
    first send to the last answer, retries included), retries, the retry_after_ms hints it got."""
    results: list[dict[str, Any]] = []

    def client(n: int) -> None:
        try:
            with Client(sock, timeout=60) as c:
                for i in range(requests):
                    first, retries, hints = time.monotonic(), 0, []
                    while True:
                        try:
                            done = c.call(chat_request(f"client {n} request {i}"))
                            outcome = "done" if done["finish_reason"] in ("stop", "length") else done["finish_reason"]
                        except Busy as exc:
                            hints.append(exc.retry_after_ms or 0)
                            if not exc.retry_after_ms or exc.retry_after_ms <= 0:
                                outcome = "busy without retry_after_ms"
                            elif honour and retries < MAX_RETRIES:
                                retries += 1
                                time.sleep(exc.retry_after_ms / 1000)
                                continue
                            else:
                                outcome = "busy"
                        except EdgeLlamaError as exc:
                            outcome = f"error {exc.code}"
                        results.append({"outcome": outcome, "ms": (time.monotonic() - first) * 1000,
                                        "retries": retries, "hints": hints})
                        break
        except Exception as exc:  # noqa: BLE001 - counted: the request got no proper answer
            results.append({"outcome": f"client failed: {type(exc).__name__}: {exc}", "ms": 0.0, "retries": 0,
                            "hints": []})

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def concurrency(lab: Lab, clients: int, requests: int) -> dict[str, Any]:
    """Every request ends `done` or `busy` with retry_after_ms; clients that honour the hint all finish."""
    # 24 tokens x 2 ms: ~50 ms per answer, so 16 clients overrun 1 running + 4 queued places at once.
    d = lab.start(fake(reply="x" * 24, token_delay_ms=2, server={"max_queue": 4}), name="load")
    out: dict[str, Any] = {"clients": clients, "requests_each": requests, "max_queue": 4, "unexpected": 0}
    for mode, honour in (("plain", False), ("honouring", True)):
        started = time.monotonic()
        results = run_clients(d.socket, clients, requests, honour)
        outcomes = Counter(r["outcome"] for r in results)
        allowed = ("done",) if honour else ("done", "busy")
        bad = {k: v for k, v in outcomes.items() if k not in allowed}
        out["unexpected"] += sum(bad.values()) + clients * requests - len(results)
        done_ms = [r["ms"] for r in results if r["outcome"] == "done"]
        hints = [hint for r in results for hint in r["hints"]]
        out[mode] = {
            "done": outcomes["done"], "busy": outcomes["busy"], "other": bad,
            "retries": sum(r["retries"] for r in results), "max_retries": max(r["retries"] for r in results),
            "latency_ms_p50": percentile(done_ms, 0.5), "latency_ms_p99": percentile(done_ms, 0.99),
            "busy_answer_ms_p50": percentile([r["ms"] for r in results if r["outcome"] == "busy"], 0.5),
            # what `busy` told clients to wait (ms), next to the ~50 ms a place takes to free up
            "retry_after_ms_p50": percentile(hints, 0.5), "retry_after_ms_max": max(hints, default=None),
            "seconds": round(time.monotonic() - started, 1),
        }
    out["leaked_admissions"] = wait_idle(d.socket)
    out["unexpected"] += out["leaked_admissions"]
    return out


TOKEN_MS = 20  # the scripted engine's time per generated token ...
PROMPT_MS = 5  # ... and per prompt token: a 210-token prompt takes ~1 s of prefill
FREE_SLACK_MS = 30  # the freed engine reaching the next request: EOF seen, a loop hop, a thread hand-over


def disconnect(lab: Lab, reps: int) -> dict[str, Any]:
    """A client closes its connection mid-prefill or after its first token; the next request's queue_ms (from its
    arrival to the engine starting it) is how long the engine took to be freed."""
    d = lab.start(fake(reply="w" * 400, token_delay_ms=TOKEN_MS, prompt_delay_ms=PROMPT_MS), name="cut")
    freed: dict[str, list[float]] = {"prefill": [], "stream": []}
    for phase, times in freed.items():
        for _ in range(reps):
            with Client(d.socket, timeout=30) as leaving:
                rid = leaving.send(chat_request("p" * 200))
                if phase == "prefill":
                    time.sleep(0.3)  # ~60 of the prompt's ~210 tokens evaluated
                else:
                    leaving.next_event(rid)  # its first token
            with Client(d.socket, timeout=30) as following:
                times.append(following.call(chat_request("next", max_tokens=2))["timings"]["queue_ms"])
    leaked = wait_idle(d.socket)
    cancelled = stats(d.socket)["finish_reasons"].get("cancelled", 0)
    bound = {"prefill": PROMPT_MS + FREE_SLACK_MS, "stream": TOKEN_MS + FREE_SLACK_MS}
    return {
        "reps": reps, "token_ms": TOKEN_MS, "prompt_token_ms": PROMPT_MS,
        **{f"freed_ms_{phase}": [round(t, 1) for t in times] for phase, times in freed.items()},
        "freed_ms_max": {phase: round(max(times), 1) for phase, times in freed.items()},
        "within_a_token": all(max(times) <= bound[phase] for phase, times in freed.items()),
        "cancelled": cancelled, "leaked_admissions": leaked,
        "unexpected": leaked + abs(2 * reps - cancelled),
    }


SESSION_REPLY = "r" * 200
SESSION_MESSAGES = 40  # server.max_session_messages: files stay small, and the bounding is exercised too


def converse(sock: Path, session: str, committed: dict[str, list[list[str]]], inflight: dict[str, str],
             errors: list[str]) -> None:
    """Session turns one after another until the daemon dies. `committed`: the conversation as of the last
    `done`; `inflight`: the turn sent but not answered."""
    try:
        with Client(sock, timeout=30) as c:
            while True:
                text = f"{session} turn {len(committed[session]) // 2} " + "u" * 600
                inflight[session] = text
                done = c.call({**chat_request(text), "session": session, "stream": False, "max_tokens": 256})
                if done["text"] != SESSION_REPLY:
                    errors.append(f"{session}: reply {done['text'][:40]!r}")
                committed[session] = (committed[session] + [["user", text], ["assistant", done["text"]]]
                                      )[-SESSION_MESSAGES:]
                del inflight[session]
    except Unavailable:  # killed (ConnectionLost), or not accepting any more
        return
    except (EdgeLlamaError, OSError) as exc:
        errors.append(f"{session}: {type(exc).__name__}: {exc}")


def check_session(path: Path, previous: list[list[str]], inflight: str | None) -> tuple[str, list[list[str]]]:
    """("previous" | "new" | "corrupt", the conversation to go on from)."""
    if not path.exists():
        return ("previous" if not previous else "corrupt"), previous
    try:
        stored = [[m["role"], m["content"]] for m in json.loads(path.read_text(encoding="utf-8"))["messages"]]
    except (ValueError, KeyError, TypeError):
        return "corrupt", previous
    if stored == previous:
        return "previous", previous
    if inflight is not None and stored == (previous + [["user", inflight], ["assistant", SESSION_REPLY]]
                                           )[-SESSION_MESSAGES:]:
        return "new", stored
    return "corrupt", previous


def sigkill(lab: Lab, kills: int, sessions: int, seed_value: int) -> dict[str, Any]:
    """`sessions` clients chat in their sessions while the daemon is SIGKILLed at random moments; after each kill
    every session file holds the conversation as of the last `done`, or with the turn in flight (never half), and
    the restarted daemon carries on."""
    rng = random.Random(seed_value)
    state = lab.root / "kill-state"
    session_dir = own_sessions(state)  # where this process's sessions are saved
    config = fake(reply=SESSION_REPLY, kv_tokens=8192, server={"max_session_messages": SESSION_MESSAGES})
    committed: dict[str, list[list[str]]] = {f"s{i}": [] for i in range(sessions)}
    verdicts: Counter[str] = Counter()
    errors: list[str] = []
    during_write = turns = 0
    for _ in range(kills):
        d = lab.start(config, name="kill", state_dir=state)
        temps = set(session_dir.glob(".*.tmp"))
        inflight: dict[str, str] = {}
        before = sum(len(c) for c in committed.values())
        threads = [threading.Thread(target=converse, args=(d.socket, s, committed, inflight, errors))
                   for s in committed]
        for thread in threads:
            thread.start()
        time.sleep(rng.uniform(0.05, 0.5))
        d.stop(timeout=10, sig=signal.SIGKILL)
        for thread in threads:
            thread.join(timeout=30)
        turns += (sum(len(c) for c in committed.values()) - before) // 2
        # A temp file left behind: the kill landed inside a save (after mkstemp, before the rename).
        during_write += bool(set(session_dir.glob(".*.tmp")) - temps)
        for session in committed:
            verdict, committed[session] = check_session(session_dir / f"{session}.json", committed[session],
                                                        inflight.get(session))
            verdicts[verdict] += 1
    d = lab.start(config, name="kill", state_dir=state)  # the last restart: every session goes on
    with Client(d.socket, timeout=30) as c:
        continued = sum(c.call({**chat_request("and now?"), "session": s, "stream": False, "max_tokens": 256}
                               ).get("finish_reason") == "stop" for s in committed)
    for session, previous in committed.items():  # the new turn follows the whole history kept through the kills
        verdict, _ = check_session(session_dir / f"{session}.json", previous, "and now?")
        continued -= verdict != "new"
    return {"kills": kills, "kills_during_write": during_write, "turns_answered": turns,
            "sessions_checked": sum(verdicts.values()), "previous": verdicts["previous"], "new": verdicts["new"],
            "corrupt": verdicts["corrupt"], "continued_after_restart": continued, "errors": errors[:5],
            "unexpected": len(errors) + len(committed) - continued}


def sigterm(lab: Lab, clients: int, grace_s: float) -> dict[str, Any]:
    """SIGTERM while one answer streams and others wait: each request ends with exactly one `done` (stop, length
    or cancelled) or `error` (unavailable, cancelled) line, and the daemon exits 0 within the grace period plus a
    bound."""
    bound_s = 5.0  # cancelled requests end within a token; the rest is closing connections and freeing the engine
    # 100 tokens x 10 ms: ~1 s per answer, so with a 1.5 s grace one finishes, one is cut, the rest never start.
    d = lab.start(fake(reply="t" * 100, token_delay_ms=10,
                       server={"max_queue": clients, "shutdown_grace_s": grace_s}), name="term")
    streaming = threading.Event()
    ends: dict[int, list[tuple[dict[str, Any], float]]] = {}

    def client(n: int) -> None:
        ends[n] = []
        conn = RawConnection(d.socket, timeout=60)
        try:
            conn.send(json.dumps({**chat_request(f"client {n}"), "id": f"t{n}", "max_tokens": 100}).encode() + b"\n")
            while (event := conn.line(time.monotonic() + 60)) is not None:
                if event.get("event") == "token":
                    streaming.set()
                if event.get("event") in ("done", "error"):
                    ends[n].append((event, time.monotonic()))
        except OSError:  # the daemon closed the connection (ConnectionError) as it exited
            pass
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
        time.sleep(0.02)  # first come, first served: client 0 runs, the others queue in order
    streaming.wait(10)
    signalled = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    status = d.proc.wait(timeout=grace_s + 30)
    exit_s = time.monotonic() - signalled
    for thread in threads:
        thread.join(timeout=30)
    outcomes: Counter[str] = Counter()
    unexpected = 0
    for lines in ends.values():
        for event, _ in lines:
            outcomes[f"done {event.get('finish_reason')}" if event["event"] == "done" else
                     f"error {event.get('code')}"] += 1
        proper = len(lines) == 1 and (
            lines[0][0].get("finish_reason") in ("stop", "length", "cancelled")
            or lines[0][0].get("code") in ("unavailable", "cancelled"))
        unexpected += not proper
    unexpected += len(threads) - len(ends) + (status != 0) + (exit_s > grace_s + bound_s)
    return {"clients": clients, "grace_s": grace_s, "outcomes": dict(outcomes), "exit_status": status,
            "exit_s": round(exit_s, 2), "bound_s": bound_s,
            "end_s": sorted(round(t - signalled, 2) for lines in ends.values() for _, t in lines),
            "unexpected": unexpected}
