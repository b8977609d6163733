"""TensorRT-LLM backend (Jetson, TRT-LLM 0.12.0-jetson): an INT4-AWQ engine built by `edge-llama build`, run by
TensorRT-LLM's C++ Executor through its Python binding (`tensorrt_llm.bindings.executor`).

NOT VERIFIED ON HARDWARE: this machine has no GPU. Every call below was written against the v0.12.0-jetson
sources (NVIDIA/TensorRT-LLM 20a7cec; tests/data/trtllm_0_12_jetson.json quotes them) and is tested against a
stand-in executor that enforces the same signatures, asserts and checks (tests/trtllm_standin/).

- Why the Executor itself: 0.12's ModelRunnerCpp refuses a logits processor and its from_dir cannot pass a
  post-processor map (constrained decoding needs one), and its streaming generator reads the executor's ONE shared
  response queue with no timeout. The Executor gives per-request waits with a timeout and cancel by request id.
- Executor(engine_dir, ModelType.DECODER_ONLY, config, use_mmap=True) with the ExecutorConfig ModelRunnerCpp
  .from_dir builds (model_runner_cpp.py@20a7cec L216-258) from the settings we used to pass it: max_beam_width 1,
  KvCacheConfig(free_gpu_memory_fraction 0.9, max_tokens = engine.kv_tokens, enable_block_reuse as the engine's
  paged context FMHA allows: True unless an INT8-KV build), a default
  DecodingConfig, gpu_weights_percent 1, enable_chunked_context from the manifest, default perf knobs; plus
  max_batch_size 1 (from_dir only checked that in Python) and our logits post-processor.
- KV cache: max_tokens = engine.kv_tokens, an explicit token count. Never a fraction of free memory alone: on
  Jetson's unified memory that starves the OS (and free-memory readings ignore page cache). The fraction is still
  set (0.9), because when both are set TensorRT-LLM allocates the smaller (executor.h@20a7cec L440-441).
- use_mmap=True: the engine file is mapped instead of read into a heap buffer. Without it the process holds a
  second copy of the weights (NVIDIA's README4Jetson: 12.3 GB total vs 7.3 GB for an INT4 8B engine); with it the
  file's pages are clean page cache the kernel can drop, which is why the plan does not count them as resident.
- Block reuse keeps a conversation's earlier turns in the paged cache. Tokenization is ours (`tokenizers` + the
  model's chat template); the executor only sees ids.
- Sampling: SamplingConfig(beam_width 1, top_k 1 for greedy else 40, top_p, temperature, random_seed); each
  request gets its own seed (`seed` is 0.13+), else a random one, so sampled replies differ.
- Limits: the executor refuses (with an error response) a prompt longer than its own maximum input length:
  max_seq_len - 1 with chunked context, else min(max_seq_len - 1, max_num_tokens) (trtGptModel.h, a later open
  version), so load() refuses a KV budget whose prompts could exceed it. It clamps max_new_tokens to what
  max_seq_len leaves (minus the draft length per step on a draft engine), so load() keeps kv_tokens within that.
- Streaming and cancel: enqueue_request, then await_responses(id, timeout) until the request's final response.
  The waits are short, so the engine thread sees the cancel flag within a token and calls cancel_request(id). An
  error response for a cancelled request ends it as cancelled. If a cancelled request does not end within
  CANCEL_WAIT_S (0.12 has a cancel race, fixed in 0.13), it still ends as cancelled here and the engine reports a
  fault until the executor's final response for it arrives: with one batch slot nothing else can run meanwhile,
  so requests get `unavailable`, `health` shows it, and the systemd watchdog is not pinged (the service restarts
  if it never does).
- Constrained decoding (GenParams.constraint): one logits post-processor registered in the ExecutorConfig's map;
  a constrained request names it and carries a client_id that keys its constraint in a table, set BEFORE the
  request is enqueued (the executor may call the post-processor before enqueue_request returns the request id).
  The callback runs on the executor's thread, before each token is chosen: it accepts the tokens chosen since its
  last call, then sets every token the constraint's mask disallows (the padded tail too) to -inf in place, on the
  executor's CUDA stream. A complete structure (constraint.done) forces end_id; so does a constraint that raises,
  whose error the engine thread then reports. Unconstrained requests name no post-processor: no callback.
- Prompt-lookup drafts, only on an engine built with `--speculative_decoding_mode draft_tokens_external
  --max_draft_len N` and only for greedy unconstrained requests: the request's draft tokens (Request
  external_draft_tokens_config, executor.h@20a7cec L177-197 and L269) are the continuation of the latest earlier
  occurrence of the last tokens (engine/ngram.py). 0.12 takes drafts per request, so such a generation is a series
  of requests over prompt + output so far: one per draft (len + 1 new tokens), DRAFT_ROUND_TOKENS at a time when
  nothing matches. Exact by construction: the executor keeps a draft token only where greedy decoding produces it.
  NOT VERIFIED ON HARDWARE that it is faster: each request re-reads the prompt's KV blocks through block reuse.
- close() shuts the executor down, waiting at most SHUTDOWN_WAIT_S (its shutdown waits for every request to end,
  which a lost cancel never does).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llama.config import EngineConfig
from edge_llama.engine.base import (
    Capacity,
    Chunk,
    Engine,
    GenParams,
    TokenConstraint,
    Vocabulary,
    tokenizer_config_info,
)
from edge_llama.engine.ngram import NgramDrafter
from edge_llama.errors import ConfigError, InternalError, ModelError, Unavailable
from edge_llama.manifest import verify_manifest

log = logging.getLogger("edge_llama.engine")

KV_FRACTION_CEILING = 0.9  # TRT-LLM uses min(this x free memory, the KV token budget)
CANCEL_WAIT_S = 5.0  # a cancelled request must end on the executor within this, else the engine is faulted
POLL_S = 0.02  # the longest wait for a response before the engine thread looks at the cancel flag again
SHUTDOWN_WAIT_S = 10.0  # close() waits this long for the executor's shutdown
TOP_K = 40  # sampled replies draw from the 40 likeliest tokens, as the llama.cpp backend does
POST_PROCESSOR = "edge_llama_constraint"  # the one logits post-processor we register
DRAFT_ROUND_TOKENS = 8  # tokens per request on a draft engine while no draft matches
DRAFT_TOKENS_EXTERNAL = 2  # SpeculativeDecodingMode.DRAFT_TOKENS_EXTERNAL (IntFlag: NONE 1, this 2) in config.json


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted piece by piece without ever splitting a character.

    Byte-level BPE tokens can end inside a UTF-8 character, and some tokenizers change earlier text when later
    tokens arrive; decoding a short window (from `prefix` to the end) and emitting only what follows the part
    already sent handles both (the approach of text-generation-inference).
    """

    def __init__(self, decode: Any) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:read] are already emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""


@dataclass(frozen=True)
class EngineLimits:
    """What the engine was built with (its config.json, written by trtllm-build)."""

    max_batch_size: int
    max_beam_width: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int | None
    context_fmha: bool
    packed_input: bool  # remove_input_padding
    vocab_size_padded: int  # the logits width (tensor-parallel size 1: the checkpoint's vocab_size)
    max_draft_len: int  # > 0 on an engine built for external draft tokens

    @classmethod
    def read(cls, folder: Path) -> EngineLimits:
        try:
            config = json.loads((folder / "config.json").read_text())
            build, plugin = config["build_config"], config["build_config"]["plugin_config"]
            drafts = int(build.get("max_draft_len") or 0)
            if int(build.get("speculative_decoding_mode") or 1) != DRAFT_TOKENS_EXTERNAL:
                drafts = 0
            return cls(int(build["max_batch_size"]), int(build["max_beam_width"]), int(build["max_input_len"]),
                       int(build["max_seq_len"]), build.get("max_num_tokens"), bool(plugin["context_fmha"]),
                       bool(plugin["remove_input_padding"]), int(config["pretrained_config"]["vocab_size"]), drafts)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{folder}/config.json is not a TensorRT-LLM engine config ({exc!r}): rebuild the "
                             "engine with `edge-llama build`") from None

    def executor_max_input_len(self, chunked_context: bool) -> int:
        """The longest prompt the executor takes (trtGptModel.h, later open version: TRTGptModel's maxInputLen)."""
        if chunked_context:
            return self.max_seq_len - 1
        if self.context_fmha and self.packed_input and self.max_num_tokens:
            return min(self.max_seq_len - 1, int(self.max_num_tokens))
        return self.max_input_len


class _Constrained:
    """A request's constraint as the post-processor drives it (on the executor's thread)."""

    __slots__ = ("constraint", "seen", "forced_end", "error")

    def __init__(self, constraint: TokenConstraint, seen: int) -> None:
        self.constraint = constraint
        self.seen = seen  # token_ids[0][:seen] (the prompt, then each chosen token) were accepted
        self.forced_end = False  # the structure was complete: the callback forced end_id
        self.error: BaseException | None = None


class _Outcome:
    """How one executor request ended, as _stream saw it."""

    __slots__ = ("final", "cancelled")

    def __init__(self) -> None:
        self.final = False
        self.cancelled = False


def _on_stream(logits: Any, stream_ptr: int) -> Any:
    """Run torch work on the executor's CUDA stream (the callback's stream_ptr), as TensorRT-LLM's examples do."""
    import torch

    if logits.is_cuda:
        return torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr))
    return contextlib.nullcontext()


_SHIFTS: dict[Any, Any] = {}  # device -> int32 tensor 0..31, to unpack a mask's words on that device


def mask_logits(logits: Any, mask: Any, stream_ptr: int) -> None:
    """Set, in place, every logit whose bit is clear in `mask` (int32 words, bit t of word t // 32) to -inf, and
    every logit past the mask's width too. `logits`: [1, beams, vocab_size_padded] (any leading shape)."""
    import numpy as np
    import torch

    with _on_stream(logits, stream_ptr):
        device = logits.device
        shifts = _SHIFTS.get(device)
        if shifts is None:
            shifts = _SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
        words = torch.from_numpy(np.asarray(mask).astype(np.int32)).to(device, non_blocking=True)  # uint32 too
        allowed = ((words.unsqueeze(1) >> shifts) & 1).flatten().bool()  # [32 * words]
        rows = logits.view(-1, logits.shape[-1])
        width = min(allowed.numel(), rows.shape[1])
        rows[:, :width].masked_fill_(~allowed[:width], float("-inf"))
        rows[:, width:] = float("-inf")


def allow_only(logits: Any, token: int, stream_ptr: int) -> None:
    """Make `token` the only choice left (in place)."""
    with _on_stream(logits, stream_ptr):
        logits.fill_(float("-inf"))
        logits[..., token] = 0.0


class TrtLlmEngine(Engine):
    name = "trtllm"

    def __init__(self, config: EngineConfig) -> None:
        if not config.model:
            raise ConfigError("engine.model must name the engine folder made by `edge-llama build`")
        self._config = config
        self._dir = Path(config.model).expanduser()
        self._manifest = verify_manifest(self._dir, kind="trtllm-engine", backend="trtllm")
        self._executor: Any = None
        self._trtllm: Any = None  # the tensorrt_llm.bindings.executor module
        self._limits: EngineLimits | None = None
        self._tokenizer: Any = None
        self._plain_tokenizer: Any = None  # the same vocabulary, special-token text encoded as plain text
        self._end_ids: list[int] = []
        self._end_set: frozenset[int] = frozenset()
        self._client_ids = itertools.count(1)
        self._constrained: dict[int, _Constrained] = {}  # client_id -> state, read by the post-processor
        self._fault_lock = threading.Lock()
        self._unfinished: tuple[int, float] | None = None  # (request id, cancelled at): a cancel never ended
        self._poll = datetime.timedelta(seconds=POLL_S)

    # ------------------------------------------------------------------------------------------------ loading
    def load(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ModelError("the trtllm backend needs `tokenizers`: pip install 'edge-llama[jetson]'") from None
        tokenizer_file = self._dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelError(f"{self._dir} has no tokenizer.json (`edge-llama build` copies it from the checkpoint)")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._plain_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._plain_tokenizer.encode_special_tokens = True  # tokenizers >= 0.19
        self._template = tokenizer_config_info(self._dir / "tokenizer_config.json")
        self._end_ids = self._end_token_ids()
        self._end_set = frozenset(self._end_ids)
        limits = self._limits = EngineLimits.read(self._dir)
        kv_tokens = self._config.kv_tokens
        planned = int(self._manifest.get("build", {}).get("max_kv_tokens", kv_tokens))
        if kv_tokens > planned:
            raise ConfigError(f"engine.kv_tokens={kv_tokens} is more than the plan this engine was built for "
                              f"allows ({planned}): re-plan or lower it")
        max_input = limits.executor_max_input_len(self.chunked_context)
        if kv_tokens - 1 > max_input:
            # The context policy may fill all but one token of the budget with prompt; the executor refuses a
            # longer prompt than its maximum input length.
            raise ConfigError(f"engine.kv_tokens={kv_tokens} needs prompts of up to {kv_tokens - 1} tokens; this "
                              f"engine's executor takes at most {max_input}: lower engine.kv_tokens")
        if kv_tokens + limits.max_draft_len > limits.max_seq_len:
            # The executor shortens max_new_tokens so that prompt + reply + draft length fits max_seq_len.
            raise ConfigError(f"engine.kv_tokens={kv_tokens} plus the engine's {limits.max_draft_len} draft tokens "
                              f"exceed its max_seq_len {limits.max_seq_len}: lower engine.kv_tokens")
        self._capacity = Capacity(kv_tokens=kv_tokens, max_seq_len=limits.max_seq_len)
        try:
            import tensorrt_llm.bindings.executor as trtllm
        except ImportError:
            raise ModelError("tensorrt_llm is not importable: the trtllm backend runs on a Jetson with "
                             "TensorRT-LLM 0.12.0-jetson (see README, Jetson deployment)") from None
        self._trtllm = trtllm
        # model_runner_cpp.py@20a7cec L257-258: Executor(engine_dir, DECODER_ONLY, config, use_mmap).
        self._executor = trtllm.Executor(str(self._dir), trtllm.ModelType.DECODER_ONLY, self.executor_config(),
                                         True)

    @property
    def chunked_context(self) -> bool:
        return bool(self._manifest.get("build", {}).get("use_paged_context_fmha", True))

    def executor_config(self) -> Any:
        """The ExecutorConfig, built as ModelRunnerCpp.from_dir builds it (model_runner_cpp.py@20a7cec L216-221,
        L223, L249-255) from what we passed it, plus max_batch_size 1 and our logits post-processor."""
        trtllm = self._trtllm
        kv_cache_config = trtllm.KvCacheConfig(free_gpu_memory_fraction=KV_FRACTION_CEILING,
                                               max_attention_window=None, sink_token_length=None,
                                               max_tokens=self._config.kv_tokens,
                                               # KV block reuse needs paged context FMHA, which an INT8-KV engine
                                               # is built without (the plan says why); a later batch manager turns
                                               # it off itself with a warning, a 0.10-era one aborted.
                                               enable_block_reuse=self.chunked_context)
        config = trtllm.ExecutorConfig(max_beam_width=1, kv_cache_config=kv_cache_config,
                                       decoding_config=trtllm.DecodingConfig(), gpu_weights_percent=1,
                                       max_batch_size=1,
                                       logits_post_processor_map={POST_PROCESSOR: self._post_process})
        config.enable_chunked_context = self.chunked_context
        config.extended_runtime_perf_knob_config = trtllm.ExtendedRuntimePerfKnobConfig()
        return config

    def _end_token_ids(self) -> list[int]:
        """eos from tokenizer_config / generation_config, plus Llama 3's <|eot_id|> and <|eom_id|>."""
        ids: list[int] = []
        gen = self._dir / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        for text in (self._template.eos_token if self._template else "", "<|eot_id|>", "<|eom_id|>", "<|im_end|>"):
            token = self._tokenizer.token_to_id(text) if text else None
            if token is not None and token not in ids:
                ids.append(token)
        if not ids:
            raise ModelError(f"{self._dir}: no end-of-sequence token found in the tokenizer files")
        return ids

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        # Its shutdown waits for every request to end: with a cancel it never ended, that is never.
        wait = SHUTDOWN_WAIT_S if self._unfinished is None else 1.0
        done = threading.Event()

        def shut_down() -> None:
            try:
                executor.shutdown()
            except Exception as exc:  # noqa: BLE001 - logged: the daemon is stopping anyway
                log.warning("TensorRT-LLM's executor failed to shut down: %s", exc)
            finally:
                done.set()

        threading.Thread(target=shut_down, name="trtllm-shutdown", daemon=True).start()
        if not done.wait(wait):
            log.error("TensorRT-LLM's executor did not shut down within %.0f s (it waits for every request to end, "
                      "and a lost cancel never does): leaving it to the process exit", wait)

    def fault(self) -> str | None:
        with self._fault_lock:
            if self._unfinished is None or self._executor is None:
                return None
            request_id, since = self._unfinished
            # Its responses are awaited only here now: a late final (or error) response ends the fault.
            if any(r.has_error() or r.result.is_final
                   for r in self._executor.await_responses(request_id, datetime.timedelta(0))):
                self._unfinished = None
                return None
        return (f"TensorRT-LLM has not ended cancelled request {request_id} for {time.monotonic() - since:.0f} s "
                "(a known 0.12 executor race): it holds the engine's only batch slot, so no request can be served "
                "until it ends or the daemon restarts")

    # ------------------------------------------------------------------------------------------------ tokens
    @property
    def model_name(self) -> str:
        return str((self._manifest.get("model") or {}).get("name") or self._dir.name)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        tokenizer = self._tokenizer if special else self._plain_tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def vocabulary(self) -> Vocabulary:
        if self._limits is None:
            raise InternalError("engine used before load()")
        return Vocabulary(eos_ids=tuple(self._end_ids), logits_size=self._limits.vocab_size_padded,
                          tokenizer_json=(self._dir / "tokenizer.json").read_text(encoding="utf-8"))

    # ------------------------------------------------------------------------------------------------ generation
    def request(self, input_ids: Sequence[int], max_new_tokens: int, params: GenParams, seed: int,
                client_id: int | None = None, draft: Sequence[int] = ()) -> Any:
        """One executor Request (keywords of the 0.12 binding; see tests/trtllm_standin)."""
        trtllm = self._trtllm
        greedy = params.temperature == 0
        sampling = trtllm.SamplingConfig(beam_width=1, top_k=1 if greedy else TOP_K, top_p=params.top_p,
                                         # temperature 0 is not a valid value there: top_k 1 makes it greedy.
                                         temperature=max(params.temperature, 1e-5), random_seed=seed)
        return trtllm.Request(
            input_token_ids=list(input_ids), max_new_tokens=max_new_tokens, streaming=True, sampling_config=sampling,
            output_config=trtllm.OutputConfig(exclude_input_from_output=True),
            end_id=self._end_ids[0], pad_id=self._end_ids[0],
            # One request's stop words: a list of token sequences (executor.h@20a7cec L267).
            stop_words=[[i] for i in self._end_ids[1:]] or None,
            external_draft_tokens_config=trtllm.ExternalDraftTokensConfig(list(draft)) if draft else None,
            logits_post_processor_name=POST_PROCESSOR if client_id is not None else None, client_id=client_id)

    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        if self._executor is None or self._limits is None:
            raise InternalError("engine used before load()")
        fault = self.fault()
        if fault:
            raise Unavailable(fault)
        if cancel.is_set():
            yield Chunk("", "cancelled")
            return
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        drafting = self._limits.max_draft_len > 0 and params.temperature == 0 and params.constraint is None
        client_id = state = None
        if params.constraint is not None:
            client_id = next(self._client_ids)
            state = self._constrained[client_id] = _Constrained(params.constraint, len(prompt_ids))
        try:
            if drafting:
                yield from self._generate_drafted(prompt_ids, params, seed, cancel)
            else:
                yield from self._generate_once(prompt_ids, params, seed, cancel, client_id, state)
        finally:
            if client_id is not None:
                del self._constrained[client_id]

    def _generate_once(self, prompt_ids: Sequence[int], params: GenParams, seed: int, cancel: threading.Event,
                       client_id: int | None, state: _Constrained | None) -> Iterator[Chunk]:
        detok = IncrementalDetokenizer(self.detokenize)
        outcome = _Outcome()
        produced = 0
        ended = False  # an end token or max_tokens seen: the request is finishing on its own
        output: list[int] = []  # every token in the output (for the constraint)
        request = self.request(prompt_ids, params.max_tokens, params, seed, client_id)
        skipped = False  # tokens left unsent because the cancel flag was set
        for tokens in self._stream(request, cancel, outcome):
            output += tokens
            for token in tokens:
                if ended:
                    break
                if token in self._end_set:
                    ended = True
                    break
                if cancel.is_set():  # within a token, even inside a burst of them
                    skipped = True
                    break
                produced += 1
                yield Chunk(detok.add(token))
                ended = produced >= params.max_tokens
        # The end token itself may or may not be in the output: a request that ended short of max_tokens stopped.
        finish = "cancelled" if outcome.cancelled or skipped else \
            "stop" if produced < params.max_tokens else "length"
        if state is not None:
            self._settle(state, output[state.seen - len(prompt_ids):], finish)
        yield Chunk("", finish)  # type: ignore[arg-type]

    def _settle(self, state: _Constrained, tail: list[int], finish: str) -> None:
        """After the request, when the executor no longer calls the post-processor: report a constraint that
        failed, else let it accept the tokens chosen after the callback's last call (the end token included)."""
        if state.error is not None:
            raise InternalError(f"constrained decoding failed: {state.error!r}") from state.error
        if finish == "cancelled" or state.forced_end:
            return  # a forced end is ours (the structure was complete), not a token the model chose
        if finish == "stop" and not any(t in self._end_set for t in tail):
            tail = [*tail, self._end_ids[0]]  # end_id was chosen, and is not in the output
        try:
            for token in tail:
                state.constraint.accept(token)
        except Exception as exc:
            raise InternalError(f"constrained decoding failed: {exc!r}") from exc

    def _generate_drafted(self, prompt_ids: Sequence[int], params: GenParams, seed: int,
                          cancel: threading.Event) -> Iterator[Chunk]:
        """Greedy generation as a series of requests, each with the prompt-lookup draft of its start (if any)."""
        assert self._limits is not None
        detok = IncrementalDetokenizer(self.detokenize)
        drafter = NgramDrafter(list(prompt_ids))
        produced = 0
        finish: str | None = None
        while finish is None:
            if cancel.is_set():
                finish = "cancelled"
                break
            left = params.max_tokens - produced
            draft = drafter.draft(min(self._limits.max_draft_len, left - 1))
            asked = len(draft) + 1 if draft else min(DRAFT_ROUND_TOKENS, left)
            outcome = _Outcome()
            got = 0
            request = self.request(drafter.tokens, asked, params, seed, draft=draft)
            for tokens in self._stream(request, cancel, outcome):
                for token in tokens:
                    if finish is not None:
                        break
                    if cancel.is_set():
                        finish = "cancelled"
                        break
                    got += 1
                    if token in self._end_set:
                        finish = "stop"
                        break
                    produced += 1
                    drafter.append(token)
                    yield Chunk(detok.add(token))
                    if produced >= params.max_tokens:
                        finish = "length"
            if outcome.cancelled:
                finish = "cancelled"
            elif finish is None and got < asked:
                finish = "stop"  # ended by end_id, which is not in the output
        yield Chunk("", finish)  # type: ignore[arg-type]

    def _stream(self, request: Any, cancel: threading.Event, outcome: _Outcome) -> Iterator[list[int]]:
        """Enqueue `request`; yield the new tokens of each of its responses until its final one. On `cancel`,
        cancel it on the executor and wait (at most CANCEL_WAIT_S) for it to end; `outcome` says how it ended."""
        executor = self._executor
        try:
            request_id = executor.enqueue_request(request)
        except RuntimeError as exc:
            raise InternalError(f"TensorRT-LLM refused the request: {exc}") from exc
        cancelled_at: float | None = None
        try:
            while True:
                for response in executor.await_responses(request_id, self._poll):
                    if response.has_error():
                        if cancelled_at is not None:  # the executor's answer to the cancel: the request ended
                            log.debug("cancelled request %s ended with: %s", request_id, response.error_msg)
                            outcome.final = outcome.cancelled = True
                            return
                        outcome.final = True
                        raise InternalError(f"TensorRT-LLM failed: {response.error_msg}")
                    result = response.result
                    if cancelled_at is None:
                        yield result.output_token_ids[0]
                    if result.is_final:
                        outcome.final = True
                        outcome.cancelled = cancelled_at is not None
                        return
                if cancelled_at is None:
                    if cancel.is_set():
                        executor.cancel_request(request_id)
                        cancelled_at = time.monotonic()
                elif time.monotonic() - cancelled_at > CANCEL_WAIT_S:
                    with self._fault_lock:
                        self._unfinished = (request_id, cancelled_at)
                    log.error("%s", self.fault())
                    outcome.cancelled = True
                    return
        finally:
            if not outcome.final and cancelled_at is None:
                executor.cancel_request(request_id)  # the consumer stopped reading: free the engine

    # ------------------------------------------------------------------------------------------------ callback
    def _post_process(self, request_id: int, logits: Any, token_ids: list[list[int]], stream_ptr: int,
                      client_id: int | None) -> None:
        """The logits post-processor (executor thread, before each token is chosen): see the module docstring."""
        state = self._constrained.get(client_id) if client_id is not None else None
        if state is None:
            return
        if state.error is not None or state.forced_end:
            allow_only(logits, self._end_ids[0], stream_ptr)
            return
        try:
            tokens = token_ids[0]
            for token in tokens[state.seen:]:
                state.constraint.accept(token)
            state.seen = len(tokens)
            if state.constraint.done:
                state.forced_end = True
                allow_only(logits, self._end_ids[0], stream_ptr)
                return
            mask = state.constraint.mask()
            if mask is not None:
                mask_logits(logits, mask, stream_ptr)
        except Exception as exc:  # noqa: BLE001 - never into the executor: end the request, report on our thread
            state.error = exc
            allow_only(logits, self._end_ids[0], stream_ptr)
