"""Stand-in for `tensorrt_llm.bindings.executor` (the pybind11 module of TRT-LLM 0.12.0-jetson).

Citations: "@20a7cec" is NVIDIA/TensorRT-LLM commit 20a7cec991b83dace860bfc32e57eb59d65a6ad3 (v0.12.0-jetson).
- executor.cpp L<n> = cpp/tensorrt_llm/pybind/executor/executor.cpp@20a7cec (the Python binding of Executor)
- executor.h L<n>   = cpp/include/tensorrt_llm/executor/executor.h@20a7cec (the C++ API and its doc comments)
- stub = tensorrt_llm/bindings/executor.pyi generated from a 0.12.0.dev2024080600 build, in the public fork
  Qcompiler/MixQ_Tensorrt_LLM@766cc5b277600216e392818e1747b7d051265a06. The Python keyword names and defaults of
  Request, ExecutorConfig, ExternalDraftTokensConfig, KvCacheConfig, OutputConfig and SamplingConfig come from it:
  the binding that defines them (cpp/tensorrt_llm/pybind/executor/bindings.cpp) is NOT STORED at 20a7cec, and the
  stub matches executor.h@20a7cec (Request has clientId and returnAllGeneratedTokens, L273-274; ExecutorConfig has
  maxQueueSize and extendedRuntimePerfKnobConfig, L703-704) except for use_mmap, which only this jetson tree binds
  (executor.cpp L111-116).
- later = the open-sourced executor of later versions (cpp/tensorrt_llm/executor/executorImpl.cpp, index id
  571425092; cpp/include/tensorrt_llm/batch_manager/llmRequest.h, index id 5862269913, the nearest EARLIER
  readable version, 0.11 era; cpp/tensorrt_llm/batch_manager/trtGptModel.h, index id 36894874673). The 0.12
  executor itself is prebuilt (cpp/tensorrt_llm/executor/aarch64-l4t-gnu/libtensorrt_llm_executor_static.a), so
  behaviour taken from these is the nearest public evidence, not proof for 0.12; each use says so.
What no public source shows is marked ASSUMPTION: response timing, what a cancelled request produces (see
EDGE_LLAMA_STANDIN_CANCEL), id numbering, error texts of the 0.12 executor. The 0.13 release notes fix "the hang
caused by race condition when canceling requests" (docs/source/release-notes.md).
The "model" is in _model.py.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from ._model import VOCAB, WORD_IDS, knobs

__all__ = ["WORD_IDS", "VOCAB", "knobs", "ModelType", "SamplingConfig", "OutputConfig", "ExternalDraftTokensConfig",
           "KvCacheConfig", "SchedulerConfig", "DecodingConfig", "ExtendedRuntimePerfKnobConfig", "ExecutorConfig",
           "PromptTuningConfig", "Request", "Result", "Response", "Executor", "CALLS"]

CALLS: list[dict[str, Any]] = []  # stand-in only: every recorded call, in order (see record())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "as_dict"):
        return _jsonable(value.as_dict())
    return repr(value)


def record(call: str, kwargs: dict[str, Any]) -> None:
    """Stand-in only: append a call to CALLS and, when EDGE_LLAMA_STANDIN_RECORD names a file, as a JSON line there
    (for tests that drive a daemon subprocess)."""
    entry = {"call": call, "kwargs": _jsonable(kwargs)}
    CALLS.append(entry)
    path = os.environ.get("EDGE_LLAMA_STANDIN_RECORD", "").strip()
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# ---------------------------------------------------------------------------------------------- config types

class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


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


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"incompatible function arguments: {name}={value!r} is not a bool (pybind11 conversion)")


def _check_tokens(name: str, value: Any, optional: bool = False) -> None:
    """VecTokens (std::vector<int32>): a list of ints."""
    if value is None and optional:
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise TypeError(f"incompatible function arguments: {name} must be a list of int, not {value!r}")


class SamplingConfig:
    """executor.h L52-65 `SamplingConfig(SizeType32 beamWidth = 1, std::optional<SizeType32> const& topK, ...)`;
    keyword names from the stub (the same ModelRunnerCpp.generate builds, model_runner_cpp.py@20a7cec L419-440).
    RandomSeedType is std::uint64_t in the nearest earlier readable types.h (index id 5845225840). The header's
    private check functions (checkBeamWidth, checkTopK, ...) are in the prebuilt library: no value range is
    enforced here."""

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
        if random_seed is not None and random_seed >= 2**64:
            raise TypeError(f"incompatible function arguments: random_seed={random_seed} does not fit uint64")
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
    """executor.h L161-162 `OutputConfig(bool returnLogProbs = false, bool returnContextLogits = false,
    bool returnGenerationLogits = false, bool excludeInputFromOutput = false, bool returnEncoderOutput = false)`."""

    def __init__(self, return_log_probs: bool = False, return_context_logits: bool = False,
                 return_generation_logits: bool = False, exclude_input_from_output: bool = False,
                 return_encoder_output: bool = False) -> None:
        self.return_log_probs = return_log_probs
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class ExternalDraftTokensConfig:
    """executor.h L177-197: "Configuration for speculative decoding with external draft tokens"
    `ExternalDraftTokensConfig(VecTokens tokens, std::optional<Tensor> logits = std::nullopt,
    std::optional<FloatType> const& acceptanceThreshold = std::nullopt)`; keywords from the stub."""

    def __init__(self, tokens: Sequence[int], logits: Any = None, acceptance_threshold: float | None = None) -> None:
        _check_tokens("tokens", tokens)
        _check_float("acceptance_threshold", acceptance_threshold)
        self._tokens = list(tokens)
        self._logits = logits
        self._acceptance_threshold = acceptance_threshold

    # The stub binds these read-only.
    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def logits(self) -> Any:
        return self._logits

    @property
    def acceptance_threshold(self) -> float | None:
        return self._acceptance_threshold

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "acceptance_threshold": self.acceptance_threshold}


class KvCacheConfig:
    """executor.h L408-415 `KvCacheConfig(bool enableBlockReuse = false, std::optional<SizeType32> const& maxTokens,
    std::optional<SizeType32> const& maxAttentionWindow, std::optional<SizeType32> const& sinkTokenLength,
    std::optional<FloatType> const& freeGpuMemoryFraction, ...)`. Header comment (L440-441): "If both mMaxTokens and
    mFreeGpuMemoryFraction are specified, memory corresponding to the minimum will be allocated." """

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

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class SchedulerConfig:
    """executor.h: `SchedulerConfig(CapacitySchedulerPolicy = kGUARANTEED_NO_EVICT, ...)` (not modelled further)."""

    def as_dict(self) -> dict[str, Any]:
        return {}


class DecodingConfig:
    def __init__(self, decoding_mode: Any = None, lookahead_decoding_config: Any = None,
                 medusa_choices: list[list[int]] | None = None) -> None:
        self.decoding_mode = decoding_mode
        self.lookahead_decoding_config = lookahead_decoding_config
        self.medusa_choices = medusa_choices

    def as_dict(self) -> dict[str, Any]:
        return {"decoding_mode": self.decoding_mode, "medusa_choices": self.medusa_choices}


class ExtendedRuntimePerfKnobConfig:
    """executor.h L468: `ExtendedRuntimePerfKnobConfig(bool multiBlockMode, bool enableContextFMHAFP32Acc)`."""

    def __init__(self, multi_block_mode: bool = False, enable_context_fmha_fp32_acc: bool = False) -> None:
        self.multi_block_mode = multi_block_mode
        self.enable_context_fmha_fp32_acc = enable_context_fmha_fp32_acc

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


LogitsPostProcessor = Callable[[int, Any, list[list[int]], int, "int | None"], None]


class ExecutorConfig:
    """executor.h L692-704 (`ExecutorConfig(SizeType32 maxBeamWidth = 1, SchedulerConfig const& schedulerConfig,
    KvCacheConfig const& kvCacheConfig, bool enableChunkedContext = false, ..., std::optional<SizeType32>
    maxBatchSize, std::optional<SizeType32> maxNumTokens, ..., std::optional<LogitsPostProcessorMap>
    logitsPostProcessorMap, std::optional<LogitsPostProcessorBatched> logitsPostProcessorBatched,
    std::optional<DecodingConfig> decodingConfig, float gpuWeightsPercent = 1, std::optional<SizeType32>
    maxQueueSize, ExtendedRuntimePerfKnobConfig const& extendedRuntimePerfKnobConfig)`), keyword names from the
    stub. The stub types the map as dict[str, Callable[[int, torch.Tensor, list[list[int]], int, int | None], None]]:
    pybind11's std::function caster refuses anything that is not callable."""

    def __init__(self, max_beam_width: int = 1, scheduler_config: SchedulerConfig | None = None,
                 kv_cache_config: KvCacheConfig | None = None, enable_chunked_context: bool = False,
                 normalize_log_probs: bool = True, iter_stats_max_iterations: int = 1000,
                 request_stats_max_iterations: int = 0, batching_type: BatchingType = BatchingType.INFLIGHT,
                 max_batch_size: int | None = None, max_num_tokens: int | None = None, parallel_config: Any = None,
                 peft_cache_config: Any = None,
                 logits_post_processor_map: dict[str, LogitsPostProcessor] | None = None,
                 logits_post_processor_batched: Any = None, decoding_config: DecodingConfig | None = None,
                 gpu_weights_percent: float = 1.0, max_queue_size: int | None = None,
                 extended_runtime_perf_knob_config: ExtendedRuntimePerfKnobConfig | None = None) -> None:
        _check_int("max_beam_width", max_beam_width, optional=False)
        _check_int("max_batch_size", max_batch_size)
        _check_int("max_num_tokens", max_num_tokens)
        _check_int("max_queue_size", max_queue_size)
        _check_bool("enable_chunked_context", enable_chunked_context)
        if logits_post_processor_map is not None:
            if not isinstance(logits_post_processor_map, dict) or not all(
                    isinstance(k, str) and callable(v) for k, v in logits_post_processor_map.items()):
                raise TypeError("incompatible function arguments: logits_post_processor_map must be a dict of str "
                                "to callables")
        if parallel_config is not None:
            raise NotImplementedError("stand-in: ParallelConfig is not modelled (0.12.0-jetson is single-device)")
        self.max_beam_width = max_beam_width
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.kv_cache_config = kv_cache_config or KvCacheConfig()
        self.enable_chunked_context = enable_chunked_context
        self.normalize_log_probs = normalize_log_probs
        self.iter_stats_max_iterations = iter_stats_max_iterations
        self.request_stats_max_iterations = request_stats_max_iterations
        self.batching_type = batching_type
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.parallel_config = parallel_config
        self.peft_cache_config = peft_cache_config
        self.logits_post_processor_map = logits_post_processor_map
        self.logits_post_processor_batched = logits_post_processor_batched
        self.decoding_config = decoding_config
        self.gpu_weights_percent = gpu_weights_percent
        self.max_queue_size = max_queue_size
        self.extended_runtime_perf_knob_config = extended_runtime_perf_knob_config or ExtendedRuntimePerfKnobConfig()

    def as_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out["logits_post_processor_map"] = sorted(self.logits_post_processor_map or {}) or None
        return out


class PromptTuningConfig:
    def __init__(self, embedding_table: Any) -> None:
        self.embedding_table = embedding_table


def _check_words(name: str, words: Any) -> None:
    """Request stopWords/badWords are `std::optional<std::list<VecTokens>>` (executor.h L266-267): a list of token
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
    """executor.h L263-274 `Request(VecTokens inputTokenIds, SizeType32 maxNewTokens, bool streaming = false, ...,
    std::optional<ExternalDraftTokensConfig> externalDraftTokensConfig, ..., std::optional<std::string>
    logitsPostProcessorName ("Must correspond to one of the logits postprocessor name provided to the
    ExecutorConfig", L257-258), std::optional<VecTokens> encoderInputTokenIds, std::optional<IdType> clientId,
    bool returnAllGeneratedTokens = false, PriorityType priority)`. Keyword names and order from the stub, which binds
    no `priority` (0.12.0.dev; a later binding adds it). BATCHED_POST_PROCESSOR_NAME = kBatchedPostProcessorName
    "batched" (L277)."""

    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids: Sequence[int], max_new_tokens: int, streaming: bool = False,
                 sampling_config: SamplingConfig | None = None, output_config: OutputConfig | None = None,
                 end_id: int | None = None, pad_id: int | None = None, bad_words: Any = None, stop_words: Any = None,
                 embedding_bias: Any = None, external_draft_tokens_config: ExternalDraftTokensConfig | None = None,
                 prompt_tuning_config: PromptTuningConfig | None = None, lora_config: Any = None,
                 logits_post_processor_name: str | None = None,
                 encoder_input_token_ids: Sequence[int] | None = None, client_id: int | None = None,
                 return_all_generated_tokens: bool = False) -> None:
        _check_tokens("input_token_ids", input_token_ids)
        _check_int("max_new_tokens", max_new_tokens, optional=False)
        _check_int("end_id", end_id)
        _check_int("pad_id", pad_id)
        _check_int("client_id", client_id, unsigned=True)
        _check_words("stop_words", stop_words)
        _check_words("bad_words", bad_words)
        _check_tokens("encoder_input_token_ids", encoder_input_token_ids, optional=True)
        if logits_post_processor_name is not None and not isinstance(logits_post_processor_name, str):
            raise TypeError("incompatible function arguments: logits_post_processor_name must be a str")
        if external_draft_tokens_config is not None and \
                not isinstance(external_draft_tokens_config, ExternalDraftTokensConfig):
            raise TypeError("incompatible function arguments: external_draft_tokens_config must be an "
                            "ExternalDraftTokensConfig")
        if embedding_bias is not None or lora_config is not None:
            raise NotImplementedError("stand-in: embedding_bias and lora_config are not modelled")
        self.input_token_ids = list(input_token_ids)
        self.max_new_tokens = max_new_tokens
        self.streaming = streaming
        self.sampling_config = sampling_config or SamplingConfig()
        self.output_config = output_config or OutputConfig()
        self.end_id = end_id
        self.pad_id = pad_id
        self.bad_words = [list(w) for w in bad_words] if bad_words else []
        self.stop_words = [list(w) for w in stop_words] if stop_words else []
        self.external_draft_tokens_config = external_draft_tokens_config
        self.prompt_tuning_config = prompt_tuning_config
        self.logits_post_processor_name = logits_post_processor_name
        self.encoder_input_token_ids = encoder_input_token_ids
        self.client_id = client_id
        self.return_all_generated_tokens = return_all_generated_tokens

    @property
    def draft_tokens(self) -> list[int]:
        config = self.external_draft_tokens_config
        return config.tokens if config is not None else []

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Result:
    """executor.h L328-350 `struct Result { bool isFinal; BeamTokens outputTokenIds; ... }` (no FinishReason: that is
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
    """executor.h L352-383 `class Response` "holds either an error or a result": getRequestId, hasError,
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


# ---------------------------------------------------------------------------------------------- the executor

from ._executor import Executor  # noqa: E402 - the loop needs the types above
