"""The TensorRT-LLM backend against TensorRT-LLM 0.12.0-jetson's behaviour, without a GPU.

Everything runs against the stand-in in tests/trtllm_standin, which applies the real source's checks (the
executor binding's signatures and keyword names, the executor's own limits read from the engine's config.json,
error responses, per-request waits with timeouts, cancel; cited in tests/data/trtllm_0_12_jetson.json), and its
trtllm-build, an argparse port of 0.12's that writes the engine config.json its flags imply. An earlier release
passed keyword names that existed with values from_dir asserted against: loading failed on every device plan.
Where tensorrt_llm itself imports (a Jetson), the real binding's signatures are checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import make_trtllm_checkpoint, put_trtllm_build_on_path

from edge_llama.config import EngineConfig
from edge_llama.engine.base import GenParams
from edge_llama.errors import Unavailable
from edge_llama.manifest import ManifestError, verify_manifest
from edge_llama.pipeline.build import build
from edge_llama.pipeline.plan import PlanOptions, devices, plan

pytest.importorskip("torch", reason="the trtllm backend builds its inputs with torch (JetPack ships it)")
CONTRACT = json.loads((Path(__file__).parent / "data" / "trtllm_0_12_jetson.json").read_text())
EOT = 128009


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return make_trtllm_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def trtllm_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", put_trtllm_build_on_path(tmp_path / "bin")["PATH"])


def engine_for(device: str, checkpoint: Path, out: Path) -> tuple[Path, dict]:
    p = plan(PlanOptions(device=device))
    plan_file = out.parent / f"plan-{device}.json"
    plan_file.write_text(json.dumps(p))
    build(checkpoint, plan_file, out)
    return out, p


def open_engine(engine_dir: Path, kv_tokens: int):  # type: ignore[no-untyped-def]
    from edge_llama.engine.trtllm import TrtLlmEngine

    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(engine_dir), kv_tokens=kv_tokens))
    engine.load()
    return engine


@pytest.mark.parametrize("device", sorted(devices()))
def test_every_device_plan_builds_and_loads_through_from_dirs_asserts(
        device: str, checkpoint: Path, tmp_path: Path, trtllm_build: None, standin: types.SimpleNamespace,
        standin_knobs: None) -> None:
    engine_dir, p = engine_for(device, checkpoint, tmp_path / "engine")
    built = json.loads((engine_dir / "config.json").read_text())["build_config"]  # what trtllm-build wrote
    assert (built["max_seq_len"], built["max_input_len"]) == (p["max_seq_len"], p["max_seq_len"] - 1)
    assert built["max_batch_size"] == 1 and built["max_num_tokens"] == 512
    assert "Total time of building" in (engine_dir / "build.log").read_text()  # the streamed log, kept
    manifest = verify_manifest(engine_dir, kind="trtllm-engine", backend="trtllm")
    assert manifest["plan"]["device"]["key"] == device

    engine = open_engine(engine_dir, p["kv_tokens"])
    executor = engine._executor
    assert executor.use_mmap is True  # no heap copy of the engine next to its weights
    assert executor.config.kv_cache_config.max_tokens == p["kv_tokens"]  # an explicit token budget
    assert executor.max_input_len >= p["kv_tokens"] - 1  # the executor takes every prompt the budget allows
    assert engine.capacity.max_seq_len == built["max_seq_len"]
    chunks = list(engine.generate(engine.tokenize("Hello"), GenParams(max_tokens=8, temperature=0),
                                  threading.Event()))
    assert chunks[-1].finish in ("stop", "length") and "".join(c.text for c in chunks).strip()


def test_a_kv_budget_the_engine_cannot_take_is_refused_before_loading(checkpoint: Path, tmp_path: Path,
                                                                     trtllm_build: None,
                                                                     standin: types.SimpleNamespace) -> None:
    from edge_llama.errors import ConfigError

    engine_dir, p = engine_for("orin-nano-8gb", checkpoint, tmp_path / "engine")
    with pytest.raises(ConfigError, match="is more than the plan this engine was built for allows"):
        open_engine(engine_dir, p["kv_tokens"] * 2)


@pytest.fixture
def engine(checkpoint: Path, tmp_path: Path, trtllm_build: None, standin: types.SimpleNamespace,
           standin_knobs: None, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    # The model ends its turn with <|eot_id|>, which is not end_id (128001): only our stop words stop it.
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_TOKEN", str(EOT))
    engine_dir, p = engine_for("orin-nano-8gb", checkpoint, tmp_path / "engine")
    return open_engine(engine_dir, p["kv_tokens"])


def run(engine, text: str, params: GenParams, cancel: threading.Event | None = None,  # type: ignore[no-untyped-def]
        cancel_after: int = 0) -> tuple[str, str | None, int]:
    """(text, finish, tokens) of one generation; with `cancel_after`, the flag is set after that many chunks."""
    cancel = cancel or threading.Event()
    chunks = []
    for chunk in engine.generate(engine.tokenize(text), params, cancel):
        chunks.append(chunk)
        if cancel_after and len(chunks) == cancel_after:
            cancel.set()
    return "".join(c.text for c in chunks), chunks[-1].finish, sum(c.finish is None for c in chunks)


def test_streaming_detokenizes_stops_on_eot_and_reports_length(engine) -> None:  # type: ignore[no-untyped-def]
    text, finish, tokens = run(engine, "Tell me a story", GenParams(max_tokens=50, temperature=0))
    assert finish == "stop" and tokens == 12  # the stand-in says 12 words, then <|eot_id|> (a stop word)
    assert len(text.split()) == 12 and "\ufffd" not in text
    text, finish, tokens = run(engine, "Tell me a story", GenParams(max_tokens=5, temperature=0))
    assert finish == "length" and tokens == 5
    ids = engine.tokenize(engine.template_info.bos_token + "<|start_header_id|>user<|end_header_id|>")
    assert ids[:2] == [128000, 128006]  # template text: special tokens parsed as such
    assert EOT not in engine.tokenize("typed <|eot_id|>", special=False)  # ... but not in what users write


def seeds_sent(engine) -> list[int]:  # type: ignore[no-untyped-def]
    return [request.sampling_config.random_seed for _, request in engine._executor.enqueued]


def test_sampled_replies_use_random_seed_per_request(engine) -> None:  # type: ignore[no-untyped-def]
    sampled = GenParams(max_tokens=12, temperature=0.8)
    replies = {run(engine, "Pick words", sampled)[0] for _ in range(3)}
    assert len(replies) > 1  # without a seed, sampled replies differ
    assert len(set(seeds_sent(engine))) == 3  # each request its own random_seed (0.12 has no `seed`)
    seeded = GenParams(max_tokens=12, temperature=0.8, seed=42)
    assert len({run(engine, "Pick words", seeded)[0] for _ in range(2)}) == 1  # the request's seed repeats it
    assert seeds_sent(engine)[-2:] == [42, 42]


@pytest.mark.parametrize("mode", ["final", "error"])
def test_a_cancel_ends_as_cancelled_and_the_next_request_is_clean(engine, mode: str,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", mode)  # error: an error response, which 0.12's stream raises
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "200")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_TOKEN_MS", "5")
    text, finish, tokens = run(engine, "Go on", GenParams(max_tokens=300, temperature=0), cancel_after=3)
    assert finish == "cancelled" and tokens < 20  # stopped at once, not run to max_tokens
    assert engine._executor.cancelled_ids  # on the executor, so the engine is freed
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "12")
    assert run(engine, "Again", GenParams(max_tokens=50, temperature=0))[1:] == ("stop", 12)  # no stray response


def test_a_cancel_the_executor_never_ends_is_bounded_and_faults_the_engine(engine, monkeypatch: pytest.MonkeyPatch
                                                                          ) -> None:  # type: ignore[no-untyped-def]
    from edge_llama.engine import trtllm

    monkeypatch.setattr(trtllm, "CANCEL_WAIT_S", 0.5)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "lost")  # 0.12's race: no final response, ever
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "200")
    started = time.monotonic()
    _, finish, _ = run(engine, "Go on", GenParams(max_tokens=300, temperature=0), cancel_after=2)
    assert finish == "cancelled" and time.monotonic() - started < 2.5  # bounded: never waits forever
    assert "has not ended cancelled request" in (engine.fault() or "")
    with pytest.raises(Unavailable, match="0.12 executor race"):  # it holds the engine's only batch slot
        run(engine, "Next", GenParams(max_tokens=5, temperature=0))


def test_build_without_tensorrt_llm_says_where_to_build(checkpoint: Path, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan(PlanOptions(device="orin-nano-8gb"))))
    out = subprocess.run([sys.executable, "-m", "edge_llama", "build", "--checkpoint", str(checkpoint), "--plan",
                          str(plan_file), "--out", str(tmp_path / "e")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert out.returncode == 2
    assert "must be built on the Jetson that runs them" in out.stderr and "Traceback" not in out.stderr


def flip_first_byte(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # same size, other content


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: flip_first_byte(d / "rank0.engine"), "does not match its sha256"),
    (lambda d: (d / "rank0.engine").write_bytes((d / "rank0.engine").read_bytes()[:3]),
     "the file changed or is truncated"),
    (lambda d: (d / "rank0.engine").unlink(), "listed in the manifest but missing"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"schema": 99})), "schema 99 is not supported"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
])
def test_daemon_refuses_a_bad_engine_with_one_clear_error(checkpoint: Path, tmp_path: Path, trtllm_build: None,
                                                         damage, message: str) -> None:  # type: ignore[no-untyped-def]
    engine_dir, _ = engine_for("orin-nano-8gb", checkpoint, tmp_path / "engine")
    damage(engine_dir)
    out = subprocess.run([sys.executable, "-m", "edge_llama", "serve", "--backend", "trtllm", "--model",
                          str(engine_dir), "--socket", str(tmp_path / "s.sock")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_backend_mismatch_is_refused(checkpoint: Path) -> None:
    with pytest.raises(ManifestError, match="is a 'trtllm-checkpoint', expected a 'trtllm-engine'"):
        verify_manifest(checkpoint, kind="trtllm-engine", backend="trtllm")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    (checkpoint / "manifest.json").write_text(json.dumps({**manifest, "backend": "onnx"}))
    with pytest.raises(ManifestError, match="made for the 'onnx' backend"):
        verify_manifest(checkpoint, kind="trtllm-checkpoint", backend="trtllm")


def test_the_contract_data_cites_the_012_jetson_sources() -> None:
    assert CONTRACT["commit"] == "20a7cec991b83dace860bfc32e57eb59d65a6ad3"
    for entry in CONTRACT["entries"]:  # each behaviour we rely on: where it was read, and the words themselves
        assert entry["path"] and entry["commit"], entry["what"]
        assert entry["quote"] or entry["status"] == "binary at this commit", entry["what"]
        assert entry["status"] == "read at this commit" or entry["note"], entry["what"]  # else: which version
    assert CONTRACT["not_found"]  # and what no stored source shows


REAL_BINDING_CHECK = """
import tensorrt_llm.bindings.executor as trtllm
# pybind11 writes each overload's signature, keyword names included, into the function's docstring.
for fn, names in ((trtllm.Executor.__init__, ["model_path", "model_type", "executor_config", "use_mmap"]),
                  (trtllm.ExecutorConfig.__init__, ["max_beam_width", "kv_cache_config", "decoding_config",
                                                    "gpu_weights_percent", "max_batch_size",
                                                    "logits_post_processor_map"]),
                  (trtllm.KvCacheConfig.__init__, ["free_gpu_memory_fraction", "max_attention_window",
                                                   "sink_token_length", "max_tokens", "enable_block_reuse"]),
                  (trtllm.SamplingConfig.__init__, ["beam_width", "top_k", "top_p", "temperature", "random_seed"]),
                  (trtllm.OutputConfig.__init__, ["exclude_input_from_output"]),
                  (trtllm.Request.__init__, ["input_token_ids", "max_new_tokens", "streaming", "sampling_config",
                                             "output_config", "end_id", "pad_id", "stop_words",
                                             "external_draft_tokens_config", "logits_post_processor_name",
                                             "client_id"]),
                  (trtllm.ExternalDraftTokensConfig.__init__, ["tokens"]),
                  (trtllm.Executor.await_responses, ["id", "timeout"]),
                  (trtllm.Executor.cancel_request, ["id"])):
    missing = [name for name in names if name + ":" not in (fn.__doc__ or "")]
    assert not missing, (fn.__qualname__, missing, fn.__doc__)
print("ok")
"""


def test_real_tensorrt_llm_binding_takes_our_keywords() -> None:
    """On a machine with the real tensorrt_llm (a Jetson), in a fresh interpreter without the stand-in."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES")}
    probe = subprocess.run([sys.executable, "-c", "import tensorrt_llm"], capture_output=True, text=True,
                           timeout=120, env=env)
    if probe.returncode != 0:
        pytest.skip("needs a GPU: tensorrt_llm imports only on a Jetson/CUDA machine")
    out = subprocess.run([sys.executable, "-c", REAL_BINDING_CHECK], capture_output=True, text=True, timeout=120,
                         env=env)
    # (importing tensorrt_llm prints its version banner first: the verdict is the last line)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == ["ok"], out.stdout + out.stderr
