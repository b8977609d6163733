"""The daemon's counters (`Stats`), and `GET /metrics`: them in Prometheus text format, rendered by prometheus_client.

What is counted lives in `Stats` as plain Python (a `Buckets` histogram is a list of integers), so
the daemon pays nothing for metrics until they are scraped, and prometheus_client is imported only then. Every
scrape builds the metric families from a snapshot of those counters; nothing is registered globally.
"""

from __future__ import annotations

import bisect
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_llama import __version__
from edge_llama.engine.base import Engine
from edge_llama.service.scheduler import Outcome, Scheduler

PREFIX = "edge_llama"
# Time to first token, seconds: a 135M model on 2 cores starts in ~30 ms; a 1B on a loaded Orin in up to seconds.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Decode rate, tokens per second after the first: an Orin Nano at 1B does ~20-60, a CPU at 135M ~100-300.
DECODE_BUCKETS_TOK_S = (1.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0)


@dataclass
class Buckets:
    """A histogram as Prometheus counts it: per-bucket counts (upper bounds inclusive) plus sum and count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    requests: Counter[str] = field(default_factory=Counter)  # by op
    errors: Counter[str] = field(default_factory=Counter)  # by code
    finish: Counter[str] = field(default_factory=Counter)  # by finish_reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_timings: dict[str, float] = field(default_factory=dict)
    loop_max_stall_ms: float = 0.0  # the event loop's worst wake-up delay since start (daemon's loop monitor)
    # For GET /metrics: histograms, HTTP outcomes, safety verdicts, the running turn's KV use.
    ttft_s: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS_S))
    decode_tok_s: Buckets = field(default_factory=lambda: Buckets(DECODE_BUCKETS_TOK_S))
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, finish reason or error code)
    verdicts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (kind, action, category)
    kv_in_use: int = 0  # prompt + generated tokens of the engine turn running now

    def record(self, prompt_tokens: int, outcome: Outcome, timings: dict[str, float]) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += outcome.completion_tokens
        self.finish[outcome.finish] += 1
        self.last_timings = timings
        if outcome.completion_tokens:
            self.ttft_s.observe(outcome.ttft_ms / 1000)
        if outcome.decode_tok_s:
            self.decode_tok_s.observe(outcome.decode_tok_s)


def sessions_on_disk(root: Path) -> int:
    """Stored conversations, of every owner (blocks on the disk: call it in a worker thread)."""
    try:
        return sum(1 for _ in root.rglob("*.json"))
    except OSError:
        return 0


def snapshot(s: Stats, sched: Scheduler, engine: Engine, state: str) -> dict[str, Any]:
    """Everything a scrape reports, copied on the event loop (the counters change there)."""
    return {
        "info": {"version": __version__, "backend": engine.name, "model": engine.model_name},
        "ready": float(state == "ready" and sched.fault() is None),
        "uptime_s": time.monotonic() - s.started,
        "requests": dict(s.requests), "outcomes": dict(s.outcomes), "errors": dict(s.errors),
        "finish": dict(s.finish), "tokens": {"prompt": s.prompt_tokens, "completion": s.completion_tokens},
        "ttft": s.ttft_s.cumulative(), "ttft_sum": s.ttft_s.total,
        "decode": s.decode_tok_s.cumulative(), "decode_sum": s.decode_tok_s.total,
        "queue": {"admitted": sched.admitted, "waiting": sched.waiting}, "queue_limit": sched.max_queue + 1,
        "kv_budget": engine.capacity.kv_tokens, "kv_in_use": s.kv_in_use,
        "verdicts": dict(s.verdicts),
        "engine_stalled_s": sched.stalled_for(), "engine_faulted": float(sched.fault() is not None),
        "loop_max_stall_s": s.loop_max_stall_ms / 1000,
        "prompt_cache": engine.prompt_cache_stats(),
    }


class _Families:
    """A prometheus_client collector over one snapshot."""

    def __init__(self, snap: dict[str, Any], sessions: int) -> None:
        self.snap = snap
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.snap

        def gauge(name: str, doc: str, value: float) -> Any:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def by(kind: type, name: str, doc: str, labels: Sequence[str], rows: dict[Any, float]) -> Any:
            fam = kind(f"{PREFIX}_{name}", doc, labels=list(labels))
            for key, value in sorted(rows.items()):
                fam.add_metric(list(key) if isinstance(key, tuple) else [key], value)
            return fam

        yield by(GaugeMetricFamily, "info", "The daemon's version, engine backend and model (always 1)",
                 list(s["info"]), {tuple(s["info"].values()): 1})
        yield gauge("ready", "1 when the daemon accepts work (not stopping, engine not faulted)", s["ready"])
        yield gauge("uptime_seconds", "Seconds since the daemon started", s["uptime_s"])
        yield by(CounterMetricFamily, "requests", "Requests received, by op (protocol v1 and HTTP)", ["op"],
                 s["requests"])
        yield by(CounterMetricFamily, "request_outcomes", "HTTP requests ended, by op and outcome (a finish reason "
                 "or an error code)", ["op", "outcome"], s["outcomes"])
        yield by(CounterMetricFamily, "errors", "Error replies, by code (protocol v1 and HTTP)", ["code"],
                 s["errors"])
        yield by(CounterMetricFamily, "generations", "Engine generations ended, by finish reason (a summary makes "
                 "several)", ["finish_reason"], s["finish"])
        yield by(CounterMetricFamily, "tokens", "Tokens processed, by kind", ["kind"], s["tokens"])
        yield HistogramMetricFamily(f"{PREFIX}_ttft_seconds", "Engine start to first token", s["ttft"],
                                    s["ttft_sum"])
        yield HistogramMetricFamily(f"{PREFIX}_decode_tokens_per_second", "Decode rate after the first token",
                                    s["decode"], s["decode_sum"])
        queue = s["queue"]
        yield by(GaugeMetricFamily, "queue_requests", "Requests admitted, by state", ["state"],
                 {"waiting": queue["waiting"], "running": queue["admitted"] - queue["waiting"]})
        yield gauge("queue_limit_requests", "Requests admitted at most (more get busy / 429)", s["queue_limit"])
        yield gauge("kv_budget_tokens", "The KV budget: prompt + reply of one request", s["kv_budget"])
        yield gauge("kv_tokens_in_use", "Prompt + generated tokens of the running generation", s["kv_in_use"])
        yield by(CounterMetricFamily, "safety_verdicts", "Safety verdicts that flagged, blocked or failed, by kind "
                 "(input/output), action and category", ["kind", "action", "category"], s["verdicts"])
        yield gauge("engine_stall_seconds", "How long the running engine call has made no progress (0 when idle)",
                    s["engine_stalled_s"])
        yield gauge("engine_faulted", "1 when the engine is out of service (a stall beyond server.engine_stall_s, "
                    "or a backend fault)", s["engine_faulted"])
        yield gauge("event_loop_max_stall_seconds", "The event loop's worst wake-up delay since start",
                    s["loop_max_stall_s"])
        yield gauge("sessions_on_disk", "Stored conversations", self.sessions)
        cache = s["prompt_cache"]
        if cache is not None:
            yield gauge("prompt_cache_bytes", "Host RAM the prompt cache's KV states take", cache["bytes"])
            yield gauge("prompt_cache_limit_bytes", "engine.prompt_cache_mib in bytes", cache["limit_bytes"])
            yield gauge("prompt_cache_states", "KV states the prompt cache keeps", cache["states"])
            for name, doc in (("saves", "KV states saved into the prompt cache"),
                              ("evictions", "KV states dropped to keep within engine.prompt_cache_mib"),
                              ("restores", "KV states restored instead of evaluating their prompt again"),
                              ("restored_tokens", "Prompt tokens whose evaluation restores spared")):
                yield CounterMetricFamily(f"{PREFIX}_prompt_cache_{name}", doc, value=cache[name])


def render(snap: dict[str, Any], sessions: int) -> tuple[bytes, str]:
    """The text exposition of a snapshot and its content type. Imports prometheus_client (call it off the loop
    the first time: the import takes ~50 ms)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(_Families(snap, sessions)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]
