"""Stand-in for `tensorrt_llm.bindings`: GptJsonConfig (the engine config.json reader), ModelConfig, WorldConfig.

ModelRunnerCpp.from_dir reads `<engine_dir>/config.json` with `GptJsonConfig.parse_file` and takes the engine
limits from `json_config.model_config` (model_runner_cpp.py@20a7cec L199-201, L229-247; "@20a7cec" is
NVIDIA/TensorRT-LLM commit 20a7cec991b83dace860bfc32e57eb59d65a6ad3, v0.12.0-jetson).

GptJsonConfig is C++ (cpp/tensorrt_llm/runtime/gptJsonConfig.cpp). NO STORED COPY AT 20a7cec. Bracketed with:
- before: the 2023 version (commit 027cd518e3b63809a5c5799187991e7f1164fb12), old "builder_config" format only,
  where `parse(path)` starts with TLLM_CHECK_WITH_INFO(std::filesystem::exists(path), "File does not exist: ...");
- after: a later version (index id 2724516238, has kv_cache_type, so >= 0.14) whose parseJson takes
  `json.at("build_config")` when "version" is present, requires pretrained_config.{architecture, dtype,
  mapping.tp_size, num_hidden_layers, num_attention_heads, vocab_size, hidden_size} and
  build_config.plugin_config.{gpt_attention_plugin, remove_input_padding, paged_kv_cache, tokens_per_block,
  context_fmha, use_paged_context_fmha, lora_plugin} and build_config.lora_config (json.at: throws if missing), and
  reads the limits with defaults: parseJsonFieldOr(builderConfig, "max_batch_size", 0), "max_beam_width" 0,
  "max_input_len" 0, "max_seq_len" 0, max_num_tokens optional; it checks
  TLLM_CHECK_WITH_INFO(!removeInputPadding || modelConfig.getMaxNumTokens(), "Padding removal requires
  max_num_tokens to be set.").
The stand-in applies the checks both brackets share with 0.12's engine format. Error texts: the nlohmann::json
out_of_range text and the TLLM_CHECK prefix are INFERRED (pybind11 turns a std::exception into RuntimeError).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"
    INT8 = "int8"
    INT32 = "int32"
    INT64 = "int64"
    BOOL = "bool"
    UINT8 = "uint8"


def _at(obj: Any, key: str) -> Any:
    """nlohmann::json::at: a missing key throws out_of_range 403."""
    if not isinstance(obj, dict) or key not in obj:
        raise RuntimeError(f"[json.exception.out_of_range.403] key '{key}' not found")
    return obj[key]


class ModelConfig:
    def __init__(self, **fields: Any) -> None:
        self.max_batch_size: int = 0
        self.max_beam_width: int = 0
        self.max_input_len: int = 0
        self.max_seq_len: int = 0
        self.max_num_tokens: int | None = None
        self.vocab_size: int = 0
        self.hidden_size: int = 0
        self.num_heads: int = 0
        self.data_type: DataType = DataType.HALF
        self.use_packed_input: bool = True
        self.use_paged_context_fmha: bool = False
        self.tokens_per_block: int = 64
        self.max_prompt_embedding_table_size: int = 0
        self.compute_context_logits: bool = False
        self.compute_generation_logits: bool = False
        self.context_fmha: bool = True
        self.max_draft_len: int = 0
        self.speculative_decoding_mode: int = 1  # SpeculativeDecodingMode.NONE (an IntFlag, auto() from 1)
        for key, value in fields.items():
            setattr(self, key, value)

    def vocab_size_padded(self, world_size: int) -> int:
        """The logits width: the vocabulary padded to a multiple of the tensor-parallel size (ModelRunnerCpp's
        vocab_size_padded property calls this with world_config.size, model_runner_cpp.py@20a7cec L304-306; the
        rounding is runtime/modelConfig.h's, not read: INFERRED)."""
        return (self.vocab_size + world_size - 1) // world_size * world_size


class WorldConfig:
    """WorldConfig.mpi(...) in a single process: rank 0 (from_dir asserts `rank == world_config.rank`)."""

    def __init__(self, tensor_parallelism: int = 1, pipeline_parallelism: int = 1, gpus_per_node: int = 8,
                 rank: int = 0) -> None:
        self.tensor_parallelism = tensor_parallelism
        self.pipeline_parallelism = pipeline_parallelism
        self.gpus_per_node = gpus_per_node
        self.rank = rank
        self.size = tensor_parallelism * pipeline_parallelism

    @classmethod
    def mpi(cls, tensor_parallelism: int = 1, pipeline_parallelism: int = 1, gpus_per_node: int = 8) -> WorldConfig:
        if tensor_parallelism * pipeline_parallelism != 1:
            # 0.12.0-jetson is built with -DENABLE_MULTI_DEVICE=0 (README4Jetson.md@20a7cec).
            raise RuntimeError("[stand-in] a multi-rank engine cannot run on a single Jetson")
        return cls(tensor_parallelism, pipeline_parallelism, gpus_per_node, rank=0)


class GptJsonConfig:
    def __init__(self, raw: dict[str, Any], model_config: ModelConfig, tp: int, pp: int, gpus_per_node: int) -> None:
        self.raw = raw
        self.model_config = model_config
        self.tensor_parallelism = tp
        self.pipeline_parallelism = pp
        self.gpus_per_node = gpus_per_node

    @classmethod
    def parse_file(cls, path: str | Path) -> GptJsonConfig:
        path = Path(path)
        if not path.exists():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: File does not exist: {path}")
        raw = json.loads(path.read_text())
        if "version" not in raw:
            # Old builder API engine ("builder_config"): not what 0.12's trtllm-build writes; not modelled further.
            _at(raw, "builder_config")
            raise RuntimeError("[stand-in] engines of the old builder API (no 'version') are not modelled")
        build = _at(raw, "build_config")
        pretrained = _at(raw, "pretrained_config")
        _at(pretrained, "architecture")
        mapping = _at(pretrained, "mapping")
        tp = int(_at(mapping, "tp_size"))
        pp = int(mapping.get("pp_size", 1))
        gpus_per_node = int(mapping.get("gpus_per_node", 8))
        dtype = _at(pretrained, "dtype")
        if dtype not in ("float32", "float16", "bfloat16"):
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Model data type '{dtype}' not supported")
        for key in ("num_hidden_layers", "num_attention_heads", "vocab_size", "hidden_size"):
            _at(pretrained, key)
        plugin = _at(build, "plugin_config")
        for key in ("gpt_attention_plugin", "remove_input_padding", "paged_kv_cache", "tokens_per_block",
                    "context_fmha", "use_paged_context_fmha", "lora_plugin"):
            _at(plugin, key)
        _at(build, "lora_config")
        max_num_tokens = build.get("max_num_tokens")
        remove_input_padding = bool(plugin["remove_input_padding"])
        if remove_input_padding and not max_num_tokens:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Padding removal requires max_num_tokens to "
                               "be set.")
        model_config = ModelConfig(
            max_batch_size=int(build.get("max_batch_size", 0)),
            max_beam_width=int(build.get("max_beam_width", 0)),
            max_input_len=int(build.get("max_input_len", 0)),
            max_seq_len=int(build.get("max_seq_len", 0)),
            max_num_tokens=max_num_tokens,
            vocab_size=int(pretrained["vocab_size"]),
            hidden_size=int(pretrained["hidden_size"]) // tp,
            num_heads=int(pretrained["num_attention_heads"]) // tp,
            data_type=DataType(dtype),
            use_packed_input=remove_input_padding,
            use_paged_context_fmha=bool(plugin["use_paged_context_fmha"]),
            tokens_per_block=int(plugin["tokens_per_block"]),
            max_prompt_embedding_table_size=int(build.get("max_prompt_embedding_table_size", 0)),
            compute_context_logits=bool(build.get("gather_context_logits", False)),
            compute_generation_logits=bool(build.get("gather_generation_logits", False)),
            context_fmha=bool(plugin["context_fmha"]),
            max_draft_len=int(build.get("max_draft_len", 0)),
            speculative_decoding_mode=int(build.get("speculative_decoding_mode", 1)),
        )
        return cls(raw, model_config, tp, pp, gpus_per_node)
