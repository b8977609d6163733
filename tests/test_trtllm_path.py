"""The TensorRT-LLM path as an operator walks it, for every device profile: `edge-llama plan` -> `edge-llama build`
(against the stand-in trtllm-build, which writes the engine config.json its flags imply) -> `edge-llama serve
--backend trtllm` (against the stand-in executor, which enforces 0.12.0-jetson's signatures and checks) -> a streamed
chat -> a cancelled one -> another chat. All through the real command line and a real daemon on a socket, with
the safety guard on as shipped. Not verified on hardware: see README, Jetson deployment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STANDIN, Daemons, make_trtllm_checkpoint, put_trtllm_build_on_path

from edge_llama.client import Client
from edge_llama.errors import Unavailable
from edge_llama.pipeline.plan import devices

pytest.importorskip("torch", reason="the trtllm backend builds its inputs with torch (JetPack ships it)")


def cli(*argv: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-m", "edge_llama", *argv], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def planned_and_built(workdir: Path, device: str) -> tuple[Path, int]:
    """`edge-llama plan` then `edge-llama build` through the command line: the engine folder and its KV budget."""
    env = put_trtllm_build_on_path(workdir / "bin")
    checkpoint = make_trtllm_checkpoint(workdir / "ckpt")
    plan_file = workdir / "plan.json"
    plan_file.write_text(cli("plan", "--device", device, "--json", env=env))
    engine = workdir / "engine"
    cli("build", "--checkpoint", str(checkpoint), "--plan", str(plan_file), "--out", str(engine), env=env)
    return engine, json.loads(plan_file.read_text())["kv_tokens"]


@pytest.mark.parametrize("device", sorted(devices()))
def test_plan_build_serve_stream_and_cancel(device: str, daemons: Daemons, workdir: Path) -> None:
    engine, kv_tokens = planned_and_built(workdir, device)

    record = workdir / "calls.jsonl"
    runtime_env = {"PYTHONPATH": str(STANDIN), "EDGE_LLAMA_STANDIN_RECORD": str(record),
                   "EDGE_LLAMA_STANDIN_TOKEN_MS": "10", "EDGE_LLAMA_STANDIN_REPLY_TOKENS": "40",
                   "EDGE_LLAMA_STANDIN_END_TOKEN": "128009"}  # the model ends its turn with <|eot_id|>
    d = daemons.start({"engine": {"backend": "trtllm", "model": str(engine), "kv_tokens": kv_tokens}},
                      env=runtime_env)
    with Client(d.socket, timeout=30) as c:
        health = c.call({"op": "health"})
        assert (health["backend"], health["kv_tokens"], health["state"]) == ("trtllm", kv_tokens, "ready")
        events = list(c.events(c.send({"op": "chat", "messages": [{"role": "user", "content": "Hello!"}]})))
        text = "".join(e["text"] for e in events if e["event"] == "token")
        assert len(text.split()) == 40 and events[-1]["finish_reason"] == "stop"  # streamed, stopped at <|eot_id|>

        request = c.send({"op": "chat", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 200})
        assert c.next_event(request)["event"] == "token"
        c.send({"op": "cancel", "target": request})
        last = list(c.events(request))[-1]
        assert last["event"] == "done" and last["finish_reason"] == "cancelled"
        assert last["usage"]["completion_tokens"] < 40

        events = list(c.events(c.send({"op": "chat", "messages": [{"role": "user", "content": "Again"}]})))
        assert events[-1]["finish_reason"] == "stop"  # the cancelled request left nothing in the executor's queue
    assert d.stop() == 0
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    executor = next(call["kwargs"] for call in calls if call["call"] == "Executor")
    assert executor["use_mmap"] is True and executor["executor_config"]["kv_cache_config"]["max_tokens"] == kv_tokens
    seeds = [call["kwargs"]["request"]["sampling_config"]["random_seed"] for call in calls
             if call["call"] == "enqueue_request"]
    assert len(seeds) >= 4 and len(set(seeds)) > 2  # warm-up, three chats: each its own seed
    assert "Traceback" not in daemons.log(d)


def test_an_engine_the_executor_never_ends_a_cancel_for_is_reported_and_faulted(daemons: Daemons,
                                                                               workdir: Path) -> None:
    engine, _ = planned_and_built(workdir, "orin-nano-8gb")
    d = daemons.start({"engine": {"backend": "trtllm", "model": str(engine), "kv_tokens": 4096},
                       "safety": {"enabled": False}},
                      env={"PYTHONPATH": str(STANDIN), "EDGE_LLAMA_STANDIN_TOKEN_MS": "10",
                           "EDGE_LLAMA_STANDIN_REPLY_TOKENS": "400", "EDGE_LLAMA_STANDIN_CANCEL": "lost"})
    with Client(d.socket, timeout=30) as c:
        request = c.send({"op": "chat", "messages": [{"role": "user", "content": "Go on"}], "max_tokens": 500})
        c.next_event(request)
        c.send({"op": "cancel", "target": request})
        last = list(c.events(request))[-1]
        assert last["finish_reason"] == "cancelled"  # never `internal`, never a hang (bounded at 5 s)
        try:
            health = c.call({"op": "health"})
        except Unavailable:  # the daemon may already be on its way out (checked once a second)
            pass
        else:
            assert health["state"] == "faulted" and "0.12 executor race" in health["fault"]
    assert d.proc.wait(timeout=20) == 1  # no systemd watchdog here: the daemon exits for a restart
    assert "has not ended cancelled request" in daemons.log(d)


def test_a_json_schema_reply_through_the_daemon(daemons: Daemons, workdir: Path) -> None:
    """OpenAI's response_format json_schema on the TensorRT-LLM backend: the daemon builds the constraint from the
    engine's vocabulary, the executor calls our logits post-processor, and the reply is the schema's JSON."""
    pytest.importorskip("llguidance", reason="structured output needs llguidance (pyproject: the structured extra)")
    import httpx

    engine, _ = planned_and_built(workdir, "orin-nano-8gb")
    record = workdir / "calls.jsonl"
    d = daemons.start({"engine": {"backend": "trtllm", "model": str(engine), "kv_tokens": 4096}},
                      env={"PYTHONPATH": str(STANDIN), "EDGE_LLAMA_STANDIN_TOKEN_MS": "1",
                           "EDGE_LLAMA_STANDIN_RECORD": str(record)})
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}, "ok": {"type": "boolean"}},
              "required": ["city", "ok"], "additionalProperties": False}
    body = {"model": "any", "messages": [{"role": "user", "content": "Where?"}], "temperature": 0, "max_tokens": 60,
            "response_format": {"type": "json_schema", "json_schema": {"name": "where", "schema": schema}}}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket)), base_url="http://localhost",
                      timeout=60) as http:
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        choice = reply.json()["choices"][0]
        value = json.loads(choice["message"]["content"])
        assert choice["finish_reason"] == "stop"
        assert value["city"] in ("Paris", "Lyon") and isinstance(value["ok"], bool)
        plain = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if k != "response_format"})
        assert plain.status_code == 200 and not plain.json()["choices"][0]["message"]["content"].startswith("{")
    assert d.stop() == 0
    requests = [json.loads(line)["kwargs"]["request"] for line in record.read_text().splitlines()
                if json.loads(line)["call"] == "enqueue_request"]
    named = [r["logits_post_processor_name"] for r in requests]
    assert named.count("edge_llama_constraint") == 1 and named[-1] is None  # only the constrained request
    assert "Traceback" not in daemons.log(d)
