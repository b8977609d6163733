"""The real daemon with the real llama.cpp backend and the embedded model, through the real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from importlib.resources import files

import pytest
from conftest import Daemons, chat

from edge_llama.client import Client
from edge_llama.errors import ContextOverflow

pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (pip install 'edge-llama[cpu]')")

REAL = {"engine": {"kv_tokens": 1024}}


def test_streamed_answer_equals_non_streamed(daemons: Daemons) -> None:
    d = daemons.start(REAL)
    with Client(d.socket) as c:
        streamed, done, events = chat(c, "What is the largest planet?", temperature=0, max_tokens=40)
        whole = c.call({"op": "chat", "messages": [{"role": "user", "content": "What is the largest planet?"}],
                        "temperature": 0, "max_tokens": 40, "stream": False})
    tokens = [e for e in events if e["event"] == "token"]
    assert len(tokens) >= 2 and streamed.strip()  # streamed in pieces (released window by window by the guard)
    assert whole["text"] == streamed
    assert done["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] <= 40
    assert done["timings"]["ttft_ms"] > 0 and done["timings"]["decode_tok_s"] > 0
    assert "planet" in streamed.lower()


def test_session_survives_restart_and_sigkill(daemons: Daemons) -> None:
    d = daemons.start(REAL)
    with Client(d.socket) as c:
        chat(c, "My name is Ana and my dog is called Pixel.", session="s1", temperature=0, max_tokens=30)
    d.stop(sig=signal.SIGKILL)  # no chance to clean up: the session must already be on disk
    d2 = daemons.start(REAL)  # the stale socket left by SIGKILL is replaced
    with Client(d2.socket) as c:
        _, done, _ = chat(c, "What is my dog called?", session="s1", temperature=0, max_tokens=30)
        assert done["usage"]["prompt_tokens"] > 40  # the first exchange is in the prompt again
        stored = (daemons.workdir / "state" / "sessions" / str(os.getuid()) / "s1.json").read_text()
    assert "Pixel" in stored and "What is my dog called?" in stored


def test_long_history_is_truncated_not_refused(daemons: Daemons) -> None:
    d = daemons.start({"engine": {"kv_tokens": 256}})
    with Client(d.socket) as c:
        for i in range(6):
            _, done, _ = chat(c, f"Fact {i}: the number {i} is interesting. Tell me why briefly.", session="long",
                              temperature=0, max_tokens=48)
        assert done["truncated"]["messages"] >= 2
        assert done["usage"]["prompt_tokens"] + 48 <= 256
        with pytest.raises(ContextOverflow):
            chat(c, "word " * 300, session="long")


def test_summarize_text_ten_times_the_kv_budget(daemons: Daemons) -> None:
    kv = 384
    d = daemons.start({"engine": {"kv_tokens": kv}, "summarize": {"summary_tokens": 48}})
    sample = files("edge_llama").joinpath("data/sample.txt").read_text(encoding="utf-8")
    text = "\n\n".join(f"Part {i}.\n\n{sample}" for i in range(7))
    with Client(d.socket) as c:
        events = list(c.events(c.send({"op": "summarize", "text": text, "max_tokens": 64})))
    progress = [e for e in events if e["event"] == "progress"]
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] >= 10 * kv  # the document really was far larger than the budget
    assert done["chunks"] >= 10
    assert [p["done"] for p in progress] == list(range(done["chunks"] + 2))
    assert "".join(e["text"] for e in events if e["event"] == "token").strip()


def test_speculative_decoding_changes_no_reply(daemons: Daemons) -> None:
    """engine.speculative only changes speed: the same replies, greedy and seeded-sampled, with and without it (on
    the batch-independent KV cache it needs)."""
    sample = files("edge_llama").joinpath("data/sample.txt").read_text(encoding="utf-8")
    replies = []
    for mode in ("off", "ngram"):
        d = daemons.start({"engine": {"kv_tokens": 2048, "kv_cache_type": "bf16", "speculative": mode}})
        with Client(d.socket) as c:
            replies.append([chat(c, f"{sample}\n\nSummarize this text.", max_tokens=96, **sampling)[0]
                            for sampling in ({"temperature": 0}, {"temperature": 0.7, "seed": 11})])
        d.stop()
    assert replies[0] == replies[1]
    assert all(reply.strip() for reply in replies[0])


def test_stats_and_metrics_show_the_prompt_cache_at_work(daemons: Daemons) -> None:
    """A conversation evicted by another comes back from RAM, and `stats` and /metrics say so (what tuning
    engine.prompt_cache_mib needs): one restore, sparing most of its long system prompt."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    d = daemons.start({"engine": {"kv_tokens": 1024, "prompt_cache_mib": 16}})
    house = {"role": "system", "content": "You are the house assistant. " * 20}

    def ask(c: Client, messages: list[dict]) -> dict:
        return c.call({"op": "chat", "messages": messages, "temperature": 0, "max_tokens": 8, "stream": False})

    with Client(d.socket) as c:
        before = c.call({"op": "stats"})["prompt_cache"]
        ask(c, [house, {"role": "user", "content": "Is the kitchen light on?"}])
        ask(c, [{"role": "user", "content": "Write one sentence about the moon."}])  # evicts the house prompt
        mid = c.call({"op": "stats"})["prompt_cache"]
        again = ask(c, [house, {"role": "user", "content": "And the bedroom light?"}])
        cache = c.call({"op": "stats"})["prompt_cache"]
    assert before == {"states": 0, "bytes": 0, "limit_bytes": 16 << 20, "saves": 0, "evictions": 0, "restores": 0,
                      "restored_tokens": 0}
    # (The moon question may itself restore the warm-up's state: both start with the template's default system turn.)
    assert cache["restores"] == mid["restores"] + 1 and cache["saves"] >= 2 and 0 < cache["bytes"] <= 16 << 20
    assert 100 < cache["restored_tokens"] - mid["restored_tokens"] < again["usage"]["prompt_tokens"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://localhost") as h:
        text = h.get("/metrics").text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["edge_llama_prompt_cache_restores_total"] == cache["restores"]
    assert samples["edge_llama_prompt_cache_restored_tokens_total"] == cache["restored_tokens"]
    assert samples["edge_llama_prompt_cache_limit_bytes"] == 16 << 20
    status = subprocess.run([sys.executable, "-m", "edge_llama", "status", "--socket", str(d.socket)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    states, restores, spared = cache["states"], cache["restores"], cache["restored_tokens"]
    assert f"of 16 MiB, {states} states; saves {cache['saves']}, evictions 0, restores {restores} (spared {spared}" \
           " prompt tokens)" in status
