"""The TensorRT-LLM backend on 0.12's Executor: the guarantees it keeps (per-request waits, cancel within a token,
the bounded wait for a cancel the executor never ends, shutdown on close, seeds, end tokens), constrained decoding
through a logits post-processor, and prompt-lookup drafts -- against the stand-in executor (tests/trtllm_standin),
which calls the post-processor as the real binding does and samples from what it leaves."""

from __future__ import annotations

import json
import logging
import threading
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_trtllm_checkpoint, put_trtllm_build_on_path, wait_until

from edge_llama.config import EngineConfig
from edge_llama.engine.base import GenParams
from edge_llama.errors import InternalError, Unavailable
from edge_llama.pipeline.build import build
from edge_llama.pipeline.plan import PlanOptions, plan

torch = pytest.importorskip("torch", reason="the post-processor edits torch tensors (JetPack ships torch)")
END, EOM, EOT = 128001, 128008, 128009
VOCAB = 128256  # Llama 3.2's tokens; a mask has VOCAB / 32 words


@pytest.fixture
def trtllm_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", put_trtllm_build_on_path(tmp_path / "bin")["PATH"])


def engine_dir(tmp_path: Path, name: str = "engine", **options: Any) -> tuple[Path, dict]:
    checkpoint = tmp_path / "ckpt"
    if not checkpoint.exists():
        make_trtllm_checkpoint(checkpoint)
    p = plan(PlanOptions(device="orin-nano-8gb", **options))
    plan_file = tmp_path / f"plan-{name}.json"
    plan_file.write_text(json.dumps(p))
    build(checkpoint, plan_file, tmp_path / name)
    return tmp_path / name, p


def open_engine(folder: Path, kv_tokens: int):  # type: ignore[no-untyped-def]
    from edge_llama.engine.trtllm import TrtLlmEngine

    engine = TrtLlmEngine(EngineConfig(backend="trtllm", model=str(folder), kv_tokens=kv_tokens))
    engine.load()
    return engine


@pytest.fixture
def engine(tmp_path: Path, trtllm_build: None, standin: types.SimpleNamespace, standin_knobs: None):  # type: ignore[no-untyped-def]
    folder, p = engine_dir(tmp_path)
    engine = open_engine(folder, p["kv_tokens"])
    yield engine
    engine.close()


def run(engine, ids: list[int], params: GenParams, cancel: threading.Event | None = None,  # type: ignore[no-untyped-def]
        cancel_after: int = 0) -> tuple[list[str], str | None]:
    """(token texts, finish); with `cancel_after`, the flag is set when that many token chunks arrived."""
    cancel = cancel or threading.Event()
    texts: list[str] = []
    finish = None
    for chunk in engine.generate(ids, params, cancel):
        if chunk.finish is not None:
            finish = chunk.finish
            break
        texts.append(chunk.text)
        if cancel_after and len(texts) == cancel_after:
            cancel.set()
    return texts, finish


def mask_of(tokens: list[int], words: int = VOCAB // 32) -> np.ndarray:
    bits = np.zeros(words * 32, dtype=np.uint8)
    bits[tokens] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


class Script:
    """A TokenConstraint: the text is free for `free` tokens, then exactly `tokens`, one after the other; done once
    all are chosen (unless `open_end`, where the last token must be an end token the model picks itself)."""

    def __init__(self, tokens: list[int], free: int = 0, open_end: bool = False, fail_at: int | None = None) -> None:
        self.tokens, self.free, self.open_end, self.fail_at = tokens, free, open_end, fail_at
        self.accepted: list[int] = []
        self.threads: set[str] = set()

    def mask(self) -> Any:
        self.threads.add(threading.current_thread().name)
        if self.fail_at is not None and len(self.accepted) == self.fail_at:
            raise ValueError("a mask that allows nothing")
        if len(self.accepted) < self.free:
            return None
        return mask_of([self.tokens[len(self.accepted) - self.free]])

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    @property
    def done(self) -> bool:
        return not self.open_end and len(self.accepted) >= self.free + len(self.tokens)


# --------------------------------------------------------------------------------------------------- the executor

def test_the_executor_config_is_the_one_from_dir_builds(engine, standin: types.SimpleNamespace) -> None:  # type: ignore[no-untyped-def]
    from edge_llama.engine.trtllm import POST_PROCESSOR

    limits = engine._limits
    # What the backend passed ModelRunnerCpp.from_dir before (model_runner_cpp.py@20a7cec builds the executor).
    runner = standin.runtime.ModelRunnerCpp.from_dir(
        str(engine._dir), max_batch_size=1, max_beam_width=1, max_input_len=limits.max_input_len,
        max_output_len=limits.max_seq_len - limits.max_input_len,
        max_tokens_in_paged_kv_cache=engine.capacity.kv_tokens, kv_cache_free_gpu_memory_fraction=0.9,
        kv_cache_enable_block_reuse=True, enable_chunked_context=True, use_mmap=True)
    theirs, ours = runner.session.config.as_dict(), engine._executor.config.as_dict()
    assert ours.pop("max_batch_size") == 1 and ours.pop("logits_post_processor_map") == [POST_PROCESSOR]
    for differs in ("max_batch_size", "logits_post_processor_map"):
        theirs.pop(differs)
    assert {k: standin.executor._jsonable(v) for k, v in ours.items()} == \
        {k: standin.executor._jsonable(v) for k, v in theirs.items()}
    assert (engine._executor.use_mmap, engine._executor.model_type.name) == (True, "DECODER_ONLY")
    runner.session.shutdown()


def test_a_prompt_longer_than_the_executor_takes_is_an_error_response(engine) -> None:  # type: ignore[no-untyped-def]
    limit = engine._executor.max_input_len
    with pytest.raises(InternalError, match=rf"Prompt length \({limit + 1}\) exceeds maximum input length"):
        run(engine, [279] * (limit + 1), GenParams(max_tokens=4, temperature=0))
    assert run(engine, [279] * 8, GenParams(max_tokens=4, temperature=0))[1] == "length"  # and it serves on


def test_executor_input_limit_follows_chunked_context() -> None:
    from edge_llama.engine.trtllm import EngineLimits

    limits = EngineLimits(1, 1, 1000, 4096, 512, True, True, VOCAB, 0)
    assert limits.executor_max_input_len(chunked_context=True) == 4095
    assert limits.executor_max_input_len(chunked_context=False) == 512  # context FMHA + packed input: max_num_tokens
    assert EngineLimits(1, 1, 1000, 4096, 512, False, True, VOCAB, 0).executor_max_input_len(False) == 1000


def test_another_requests_responses_never_reach_our_stream(engine, standin: types.SimpleNamespace,  # type: ignore[no-untyped-def]
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """0.12's ModelRunnerCpp read one shared queue and failed on a foreign response; per-request waits do not."""
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_TOKEN", str(EOT))
    ex = standin.executor
    other = engine._executor.enqueue_request(ex.Request([1, 2, 3], 5, streaming=True, end_id=END))
    texts, finish = run(engine, engine.tokenize("Hello"), GenParams(max_tokens=50, temperature=0))
    assert (len(texts), finish) == (12, "stop")
    assert engine._executor.get_num_responses_ready(other) == 5  # still there for whoever awaits them


@pytest.mark.parametrize(("end_token", "in_output"), [(EOT, False), (EOM, False), (None, False), (None, True)])
def test_every_end_token_stops_the_reply(engine, end_token: int | None, in_output: bool,  # type: ignore[no-untyped-def]
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    if end_token is not None:  # <|eot_id|> / <|eom_id|>: stop words; else the model says end_id itself
        monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_TOKEN", str(end_token))
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_END_IN_OUTPUT", "1" if in_output else "0")
    texts, finish = run(engine, engine.tokenize("Hello"), GenParams(max_tokens=50, temperature=0))
    assert (len(texts), finish) == (12, "stop")
    assert all(t.strip() for t in texts) and "<|" not in "".join(texts)  # twelve words, no end token as text
    request = engine._executor.enqueued[-1][1]
    assert request.end_id == END and request.stop_words == [[EOM], [EOT]]
    assert run(engine, engine.tokenize("Hello"), GenParams(max_tokens=5, temperature=0)) == (texts[:5], "length")


def test_seeds(engine) -> None:  # type: ignore[no-untyped-def]
    ids = engine.tokenize("Pick words")
    sampled = GenParams(max_tokens=12, temperature=0.8)
    assert len({"".join(run(engine, ids, sampled)[0]) for _ in range(3)}) > 1  # no seed: a fresh one each time
    seeded = GenParams(max_tokens=12, temperature=0.8, seed=7)
    assert len({"".join(run(engine, ids, seeded)[0]) for _ in range(2)}) == 1
    sent = [r.sampling_config for _, r in engine._executor.enqueued]
    assert [c.random_seed for c in sent[-2:]] == [7, 7] and len({c.random_seed for c in sent[:3]}) == 3
    assert sent[-1].top_k == 40 and run(engine, ids, GenParams(max_tokens=2, temperature=0)) and \
        engine._executor.enqueued[-1][1].sampling_config.top_k == 1  # greedy


# --------------------------------------------------------------------------------------------------- cancel

def test_cancel_before_the_first_token(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    cancel = threading.Event()
    cancel.set()
    assert run(engine, [1, 2], GenParams(max_tokens=5), cancel) == ([], "cancelled")
    assert engine._executor.enqueued == []  # never enqueued
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_TOKEN_MS", "300")  # a slow prompt
    cancel = threading.Event()
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(run(engine, [1, 2], GenParams(max_tokens=5), cancel)))
    worker.start()
    wait_until(lambda: engine._executor.enqueued, what="the request reaching the executor")
    cancel.set()
    worker.join(timeout=10)
    assert result == [([], "cancelled")] and engine._executor.cancelled_ids  # during the prompt, on the executor


def test_cancel_within_a_token_even_when_tokens_come_in_bursts(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_TOKEN_MS", "0")  # several tokens per await
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "5000")
    texts, finish = run(engine, [1, 2], GenParams(max_tokens=4000, temperature=0), cancel_after=3)
    assert (len(texts), finish) == (3, "cancelled")


def test_a_lost_cancel_faults_until_the_executor_ends_it(engine, standin: types.SimpleNamespace,  # type: ignore[no-untyped-def]
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from edge_llama.engine import trtllm

    monkeypatch.setattr(trtllm, "CANCEL_WAIT_S", 0.3)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "lost")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "200")
    _, finish = run(engine, [1, 2], GenParams(max_tokens=300, temperature=0), cancel_after=2)
    assert finish == "cancelled" and "0.12 executor race" in (engine.fault() or "")
    with pytest.raises(Unavailable):
        run(engine, [1, 2], GenParams(max_tokens=3, temperature=0))
    engine._executor.end_lost_requests()  # the executor's final response comes, late
    assert engine.fault() is None
    assert run(engine, [1, 2], GenParams(max_tokens=3, temperature=0))[1] == "length"


def test_close_shuts_the_executor_down(engine) -> None:  # type: ignore[no-untyped-def]
    executor = engine._executor
    run(engine, [1, 2], GenParams(max_tokens=3, temperature=0))
    engine.close()
    assert engine._executor is None and engine.fault() is None
    with pytest.raises(RuntimeError, match="Shutdown called"):
        executor.enqueue_request(executor.enqueued[0][1])
    with pytest.raises(InternalError, match="before load"):
        run(engine, [1, 2], GenParams(max_tokens=3))


def test_close_is_bounded_when_the_executor_never_ends_a_cancel(engine, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from edge_llama.engine import trtllm

    monkeypatch.setattr(trtllm, "CANCEL_WAIT_S", 0.2)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_CANCEL", "lost")  # its shutdown() then waits forever
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "200")
    run(engine, [1, 2], GenParams(max_tokens=300, temperature=0), cancel_after=2)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="edge_llama.engine"):
        engine.close()
    assert time.monotonic() - started < 3 and "did not shut down" in caplog.text  # not SHUTDOWN_WAIT_S: known


# --------------------------------------------------------------------------------------------------- constraints

def test_a_constraint_steers_every_token_on_the_executors_thread(engine) -> None:  # type: ignore[no-untyped-def]
    from edge_llama.engine.trtllm import POST_PROCESSOR

    wanted = engine.tokenize('{"answer": "yes"}', special=False)
    for temperature in (0.0, 0.8):  # greedy and sampled alike draw from what the post-processor left
        script = Script(wanted)
        texts, finish = run(engine, engine.tokenize("Answer in JSON"), GenParams(max_tokens=50,
                                                                                temperature=temperature,
                                                                                constraint=script))
        assert ("".join(texts), finish) == ('{"answer": "yes"}', "stop")  # done: ended as if by an end token
        assert script.accepted == wanted  # each chosen token once, the forced end not among them
        assert script.threads == {"standin-executor"}  # the callback ran where the executor calls it
    request = engine._executor.enqueued[-1][1]
    assert request.logits_post_processor_name == POST_PROCESSOR and request.client_id is not None
    assert engine._constrained == {}  # the per-request table is emptied


def test_free_text_until_the_mask_starts_then_an_end_the_model_picks(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "500")
    ids = engine.tokenize("Hello")
    free, _ = run(engine, ids, GenParams(max_tokens=3, temperature=0))
    colon = engine.tokenize(":", special=False)
    for end in (EOT, END):  # a stop word stays in the output; end_id does not: accepted either way
        script = Script([*colon, end], free=3, open_end=True)
        texts, finish = run(engine, ids, GenParams(max_tokens=20, temperature=0, constraint=script))
        assert (texts, finish) == ([*free, ":"], "stop")
        assert script.accepted[3:] == [*colon, end]


def test_unconstrained_requests_never_call_the_post_processor(engine) -> None:  # type: ignore[no-untyped-def]
    run(engine, [1, 2], GenParams(max_tokens=5, temperature=0))
    assert engine._executor.enqueued[-1][1].logits_post_processor_name is None
    assert engine._executor.post_processor_calls == 0


def test_a_failing_constraint_fails_its_request_only(engine) -> None:  # type: ignore[no-untyped-def]
    script = Script(engine.tokenize(" one two three four five", special=False), fail_at=2)
    with pytest.raises(InternalError, match="constrained decoding failed"):
        run(engine, [1, 2], GenParams(max_tokens=20, temperature=0, constraint=script))
    assert run(engine, [1, 2], GenParams(max_tokens=3, temperature=0))[1] == "length"
    assert engine._constrained == {}


def test_the_mask_disallows_the_padded_tail_and_accepts_new_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    from edge_llama.engine.trtllm import _Constrained

    script = Script([5, 128255, 7])
    engine._constrained[99] = _Constrained(script, seen=3)
    logits = torch.zeros(1, 1, VOCAB + 64)  # a vocabulary padded past the mask's width
    engine._post_process(1, logits, [[10, 11, 12]], 0, 99)
    assert script.accepted == [] and torch.isfinite(logits).nonzero()[:, 2].tolist() == [5]
    logits = torch.zeros(1, 1, VOCAB + 64)
    engine._post_process(1, logits, [[10, 11, 12, 5]], 0, 99)  # the executor chose 5
    assert script.accepted == [5] and torch.isfinite(logits).nonzero()[:, 2].tolist() == [128255]
    assert bool(torch.isinf(logits[0, 0, VOCAB:]).all())
    untouched = torch.zeros(1, 1, 8)
    engine._post_process(2, untouched, [[1]], 0, None)  # a request without a constraint
    assert bool((untouched == 0).all())


def test_a_json_schema_constraint_from_structured(engine, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("llguidance", reason="structured output needs llguidance (pyproject: the structured extra)")
    from edge_llama.protocol import ResponseFormat
    from edge_llama.structured.constraint import Structurer
    from edge_llama.structured.plan import plan_reply

    vocabulary = engine.vocabulary()
    assert vocabulary.tokenizer_json == (engine._dir / "tokenizer.json").read_text()
    assert (vocabulary.eos_ids, vocabulary.logits_size) == ((END, EOM, EOT), VOCAB)
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}, "ok": {"type": "boolean"}},
              "required": ["city", "ok"], "additionalProperties": False}
    reply_plan = plan_reply([], response_format=ResponseFormat("json_schema", schema=schema))
    structurer = Structurer(vocabulary)
    for temperature in (0.0, 0.7):
        texts, finish = run(engine, engine.tokenize("Where?"), GenParams(
            max_tokens=60, temperature=temperature, constraint=structurer.constraint(reply_plan)))
        value = json.loads("".join(texts))
        assert finish == "stop" and value["city"] in ("Paris", "Lyon") and isinstance(value["ok"], bool)


# --------------------------------------------------------------------------------------------------- drafts

@pytest.fixture
def draft_engines(tmp_path: Path, trtllm_build: None, standin: types.SimpleNamespace, standin_knobs: None,  # type: ignore[no-untyped-def]
                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "100000")  # replies end at max_tokens
    plain_dir, p = engine_dir(tmp_path, "plain")
    drafted_dir, _ = engine_dir(tmp_path, "drafted", max_draft_len=4)
    engines = open_engine(plain_dir, p["kv_tokens"]), open_engine(drafted_dir, p["kv_tokens"])
    yield engines
    for e in engines:
        e.close()


def test_the_draft_engine_is_built_as_trtllm_build_does(draft_engines) -> None:  # type: ignore[no-untyped-def]
    plain, drafted = draft_engines
    built = json.loads((drafted._dir / "config.json").read_text())["build_config"]
    assert (built["speculative_decoding_mode"], built["max_draft_len"]) == (2, 4)
    assert built["max_seq_len"] == plain._limits.max_seq_len + 4  # "Maximum number of generated tokens remains"
    assert (plain._limits.max_draft_len, drafted._limits.max_draft_len) == (0, 4)


def test_prompt_lookup_drafts_give_the_greedy_text_in_fewer_steps(draft_engines) -> None:  # type: ignore[no-untyped-def]
    plain, drafted = draft_engines
    ids = plain.tokenize("Repeat after me: the quick brown fox jumps over the lazy dog")
    params = GenParams(max_tokens=200, temperature=0)
    expected = run(plain, ids, params)
    assert run(drafted, ids, params) == expected  # exact: every kept draft token is the greedy one
    requests = [r for _, r in drafted._executor.enqueued]
    assert any(r.draft_tokens for r in requests) and drafted._executor.accepted_draft_tokens > 20
    assert all(len(r.draft_tokens) <= 4 for r in requests)
    sampled = GenParams(max_tokens=20, temperature=0.8, seed=3)
    before = len(drafted._executor.enqueued)
    assert run(drafted, ids, sampled) == run(plain, ids, sampled)  # sampled: one request, no drafts
    assert len(drafted._executor.enqueued) == before + 1 and not drafted._executor.enqueued[-1][1].draft_tokens


def test_a_cancel_between_draft_rounds(draft_engines) -> None:  # type: ignore[no-untyped-def]
    _, drafted = draft_engines
    texts, finish = run(drafted, [1, 2, 3], GenParams(max_tokens=500, temperature=0), cancel_after=10)
    assert (len(texts), finish) == (10, "cancelled")
