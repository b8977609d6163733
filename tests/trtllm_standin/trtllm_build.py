#!/usr/bin/env python3
"""Stand-in `trtllm-build` of TensorRT-LLM 0.12.0-jetson: its argparse options, its build-time checks, and the
engine config.json it writes (plus a dummy rank0.engine). Standard library only; `main(argv)` returns 0 or raises
like the real one (argparse errors exit with status 2).

SOURCES. tensorrt_llm/commands/build.py, tensorrt_llm/plugin/plugin.py and tensorrt_llm/builder.py have NO STORED
COPY at the v0.12.0-jetson commit 20a7cec991b83dace860bfc32e57eb59d65a6ad3 (the index holds, for that commit,
only the files the jetson commit touched). They are bracketed by:
- BEFORE (0.11 era; index ids): build.py 2604873117 (still has --tp_size/--pp_size and the deprecated
  --max_output_len), plugin.py 2747049588 (still has use_custom_all_reduce, multi_block_mode,
  context_fmha_fp32_acc), builder.py 3063623504 (BuildConfig with builder_opt and use_fused_mlp; __post_init__
  calls check_max_num_tokens), tensorrt_llm/_common.py (check_max_num_tokens, same text in the stored versions);
- AFTER: build.py 387653565 / commit 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc (kv_cache_type, help texts
  rewritten), builder.py 205252225 (_init_max_seq_len moved into builder.py), plugin.py 4216063708;
- and the 0.12.0 release notes (docs/source/release-notes.md, index id 683127886), "API Changes":
  "[BREAKING CHANGE] `max_output_len` is removed from `trtllm-build` command, if you want to limit sequence length
  on engine build stage, specify `max_seq_len`." / "The `use_custom_all_reduce` argument is removed" / "The
  `multi_block_mode` argument is moved from build stage (`trtllm-build` and builder API) to the runtime." / "The
  build time argument `context_fmha_fp32_acc` is moved to runtime for decoder models." / "The arguments `tp_size`,
  `pp_size` and `cp_size` is removed from `trtllm-build` command." / "Added the flag `--fast_build` to
  `trtllm-build` command (experimental)." / Fixed: "the engine build failure when deduced `max_seq_len` is not an
  integer. (#2018)".
This file = the BEFORE versions with exactly those release-note changes applied. Anything else 0.12 may have
changed is unknown (marked UNKNOWN in tests/data/trtllm_0_12_jetson.json).

CHECKPOINT LOADING (load_checkpoint below: PretrainedConfig / LLaMAConfig / QuantConfig / Mapping, QuantMode's
asserts, preprocess_weights and PretrainedModel.load) and the paged-context-FMHA checks of build() are ported from
a nearer copy: TensorRT-LLM 0.12.0.dev2024080600, the tensorrt_llm tree vendored in Qcompiler/MixQ_Tensorrt_LLM
(commit 06e3cbff69053952b0fcc591eb48cd2517f91622; its revised_history.md records its own edits as a diff against
the installed wheel, and the files it edited are read with that diff reversed). Every rule is quoted with file and
lines in tests/data/trtllm_0_12_build.json and enforced by tests/test_trtllm_build_contract.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import sys
import time
from typing import Any

VERSION = "0.12.0"  # tensorrt_llm/version.py at 20a7cec is not stored: INFERRED from the tag name

# plugin.py (BEFORE, 2747049588): DEFAULT_PLUGIN_DTYPE_OPTIONS / PLUGIN_DTYPE_OPTIONS_MAP
DEFAULT_PLUGIN_DTYPE_OPTIONS: list[str | None] = ["auto", "float16", "float32", "bfloat16", "int32", None]
PLUGIN_DTYPE_OPTIONS_MAP: dict[str, list[str | None]] = {
    "gemm_swiglu_plugin": ["fp8", None],
    "gemm_plugin": ["auto", "float16", "float32", "bfloat16", "int32", "fp8", None],
}

# plugin.py (BEFORE): PluginConfig fields in declaration order (type, default), without the three fields 0.12 moved
# out of the build (context_fmha_fp32_acc, use_custom_all_reduce, multi_block_mode). manage_weights: the AFTER
# version sets it for --fast_build (`if args.fast_build: plugin_config.manage_weights = True`); --fast_build came in
# 0.12, so INFERRED to exist in 0.12 (not a CLI option).
PLUGIN_FIELDS: list[tuple[str, type, Any]] = [
    ("dtype", str, "float16"),
    ("bert_attention_plugin", str, "auto"),
    ("gpt_attention_plugin", str, "auto"),
    ("gemm_plugin", str, None),
    ("gemm_swiglu_plugin", str, None),
    ("smooth_quant_gemm_plugin", str, None),
    ("identity_plugin", str, None),
    ("layernorm_quantization_plugin", str, None),
    ("rmsnorm_quantization_plugin", str, None),
    ("nccl_plugin", str, "auto"),
    ("lookup_plugin", str, None),
    ("lora_plugin", str, None),
    ("weight_only_groupwise_quant_matmul_plugin", str, None),
    ("weight_only_quant_matmul_plugin", str, None),
    ("quantize_per_token_plugin", bool, False),
    ("quantize_tensor_plugin", bool, False),
    ("moe_plugin", str, "auto"),
    ("mamba_conv1d_plugin", str, "auto"),
    ("context_fmha", bool, True),
    ("paged_kv_cache", bool, True),
    ("remove_input_padding", bool, True),
    ("reduce_fusion", bool, False),
    ("enable_xqa", bool, True),
    ("tokens_per_block", int, 64),
    ("use_paged_context_fmha", bool, False),
    ("use_fp8_context_fmha", bool, False),
    ("multiple_profiles", bool, False),
    ("paged_state", bool, True),
    ("streamingllm", bool, False),
    ("manage_weights", bool, False),
]

# plugin.py (BEFORE): cli_plugin_args, minus the three removed in 0.12.
CLI_PLUGIN_ARGS = [
    "bert_attention_plugin", "gpt_attention_plugin", "gemm_plugin", "gemm_swiglu_plugin", "lookup_plugin",
    "lora_plugin", "moe_plugin", "mamba_conv1d_plugin", "nccl_plugin",
    "context_fmha", "paged_kv_cache", "remove_input_padding", "enable_xqa", "tokens_per_block",
    "use_paged_context_fmha", "use_fp8_context_fmha", "multiple_profiles", "paged_state", "streamingllm",
    "reduce_fusion",
]

# The numeric defaults of build.py (BEFORE; the 0.12 release notes change none of them; 0.14 later sets
# max_batch_size to 2048 per its notes).
DEFAULTS = {"max_batch_size": 256, "max_input_len": 1024, "max_seq_len": None, "max_beam_width": 1,
            "max_num_tokens": 8192, "opt_num_tokens": None, "max_encoder_input_len": 1024,
            "max_prompt_embedding_table_size": 0}


def log(level: str, message: str) -> None:
    # tensorrt_llm/logger.py not read: the "[TRT-LLM] [X] " prefix is the one its logs show; INFERRED.
    print(f"[TRT-LLM] [{level}] {message}", flush=True)


def add_plugin_argument(parser: argparse._ArgumentGroup) -> None:
    """plugin.py (BEFORE) add_plugin_argument: one option per cli_plugin_args field, in field order."""
    for name, ftype, default in PLUGIN_FIELDS:
        if name not in CLI_PLUGIN_ARGS:
            continue
        if ftype is str:
            options = PLUGIN_DTYPE_OPTIONS_MAP.get(name, DEFAULT_PLUGIN_DTYPE_OPTIONS)
            parser.add_argument("--" + name, type=str, default=default if default else "disable",
                                choices=[x if x else "disable" for x in options],
                                help=f"Whether to enable/disable {name} and the dtype.")
        elif ftype is bool:
            parser.add_argument("--" + name, type=str, default="enable" if default else "disable",
                                choices=["enable", "disable"], help=f"Whether to enable/disable {name}.")
        else:
            parser.add_argument("--" + name, type=ftype, default=default, help=f"{name}.")


def build_parser() -> argparse.ArgumentParser:
    """build.py (BEFORE) parse_arguments, without --max_output_len/--tp_size/--pp_size, with --fast_build."""
    p = argparse.ArgumentParser(prog="trtllm-build", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--checkpoint_dir', type=str, default=None)
    p.add_argument('--model_config', type=str, default=None)
    p.add_argument('--build_config', type=str, default=None)
    p.add_argument('--model_cls_file', type=str, default=None)
    p.add_argument('--model_cls_name', type=str, default=None)
    p.add_argument('--input_timing_cache', type=str, default=None)
    p.add_argument('--output_timing_cache', type=str, default='model.cache')
    p.add_argument('--log_level', type=str, default='info')
    p.add_argument('--profiling_verbosity', type=str, default='layer_names_only',
                   choices=['layer_names_only', 'detailed', 'none'])
    p.add_argument('--enable_debug_output', default=False, action='store_true')
    p.add_argument('--output_dir', type=str, default='engine_outputs')
    p.add_argument('--workers', type=int, default='1')
    p.add_argument('--max_batch_size', type=int, default=256)
    p.add_argument('--max_input_len', type=int, default=1024)
    p.add_argument('--max_seq_len', '--max_decoder_seq_len', dest='max_seq_len', type=int, default=None)
    p.add_argument('--max_beam_width', type=int, default=1)
    p.add_argument('--max_num_tokens', type=int, default=8192)
    p.add_argument('--opt_num_tokens', type=int, default=None)
    p.add_argument('--max_prompt_embedding_table_size', '--max_multimodal_len', type=int, default=0)
    p.add_argument('--use_fused_mlp', default=False, action='store_true')
    p.add_argument('--gather_all_token_logits', action='store_true', default=False)
    p.add_argument('--gather_context_logits', action='store_true', default=False)
    p.add_argument('--gather_generation_logits', action='store_true', default=False)
    p.add_argument('--builder_opt', type=int, default=None)
    p.add_argument('--logits_dtype', type=str, default=None, choices=['float16', 'float32'])
    p.add_argument('--weight_sparsity', default=False, action='store_true')
    p.add_argument('--max_draft_len', type=int, default=0)
    p.add_argument('--lora_dir', type=str, default=None, nargs="+")
    p.add_argument('--lora_ckpt_source', type=str, default="hf", choices=["hf", "nemo"])
    # BEFORE: choices=LoraManager.LORA_MODULE_IDS.keys() -- that table (lora_manager.py) was not read.
    p.add_argument('--lora_target_modules', nargs='+', default=None)
    p.add_argument('--max_lora_rank', type=int, default=64)
    p.add_argument('--auto_parallel', type=int, default=1)
    p.add_argument('--gpus_per_node', type=int, default=8)
    # BEFORE: choices=cluster_infos.keys() (auto_parallel/cluster_info.py, not read).
    p.add_argument('--cluster_key', type=str, default=None)
    p.add_argument('--strip_plan', default=False, action='store_true')
    p.add_argument('--max_encoder_input_len', type=int, default=1024)
    p.add_argument('--visualize_network', default=False, action='store_true')
    p.add_argument('--dry_run', default=False, action='store_true')
    # BEFORE has the first three; "explicit_draft_tokens" INFERRED from the 0.12 notes ("Supported ReDrafter").
    p.add_argument('--speculative_decoding_mode', default=None,
                   choices=["draft_tokens_external", "lookahead_decoding", "medusa", "explicit_draft_tokens"])
    p.add_argument('--weight_streaming', default=False, action='store_true')
    p.add_argument('--fast_build', default=False, action='store_true')  # 0.12 release notes
    plugin_config_parser = p.add_argument_group("plugin_config")
    add_plugin_argument(plugin_config_parser)
    return p


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    # build.py (BEFORE) parse_arguments, after parse_args:
    if args.gather_all_token_logits:
        args.gather_context_logits = True
        args.gather_generation_logits = True
    if args.gather_context_logits and args.max_draft_len > 0:
        raise RuntimeError(
            "Gather context logits is not support with draft len > 0. "
            "If want to get the accepted tokens' logits from target model, please just enable gather_generation_logits"
        )
    return args


def plugin_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """plugin.py (BEFORE) PluginConfig.from_arguments -> update_from_dict: "enable"/"disable" become booleans for
    bool fields, "disable" becomes None for the others; to_dict() strips the "_" of the storage names."""
    config = {name: default for name, _, default in PLUGIN_FIELDS}
    for name, ftype, _ in PLUGIN_FIELDS:
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if ftype is bool:
            value = True if value == "enable" else False if value == "disable" else value
        elif value == "disable":
            value = None
        config[name] = value
    return config


def check_max_num_tokens(max_num_tokens: int | None, opt_num_tokens: int | None, max_batch_size: int,
                         max_input_len: int, max_seq_len: int, max_beam_width: int, remove_input_padding: bool,
                         enable_context_fmha: bool, tokens_per_block: int,
                         multiple_profiles: bool) -> tuple[int | None, int | None]:
    """tensorrt_llm/_common.py check_max_num_tokens (same text in the stored versions): warnings and clamps,
    never an error."""
    if not remove_input_padding:
        if max_num_tokens is not None or opt_num_tokens is not None:
            max_num_tokens = max_batch_size * max_seq_len
            log("W", "remove_input_padding is not enabled, the specified max_num_tokens/opt_num_tokens will be "
                     "ignored.")
        return max_num_tokens, opt_num_tokens
    else:
        if max_num_tokens is None:
            max_num_tokens = max_seq_len * max_batch_size
            log("W", "remove_input_padding is enabled, while max_num_tokens is not set, setting to "
                     "max_batch_size*max_seq_len.")
        if opt_num_tokens is None and not multiple_profiles:
            opt_num_tokens = min(max_batch_size * max_beam_width, max_num_tokens)
            log("W", "remove_input_padding is enabled, while opt_num_tokens is not set, setting to "
                     "max_batch_size*max_beam_width.")
        if max_num_tokens > 16384:
            log("W", "Specifying a `max_num_tokens` larger than 16384 is usually not recommended, we do not expect "
                     "perf gain with that and too large `max_num_tokens` could possibly exceed the TensorRT tensor "
                     f"volume, causing runtime errors. Got `max_num_tokens` = {max_num_tokens}")
    if max_num_tokens > max_seq_len * max_batch_size:
        log("W", f"max_num_tokens ({max_num_tokens}) shouldn't be greater than max_seq_len * max_batch_size "
                 f"({max_seq_len * max_batch_size}), specifying to max_seq_len * max_batch_size "
                 f"({max_seq_len * max_batch_size}).")
        max_num_tokens = max_seq_len * max_batch_size
    if max_num_tokens < max_input_len and not enable_context_fmha:
        log("W", f"When enable_context_fmha is not turned on, max_num_tokens ({max_num_tokens}) should be at least "
                 f"max_input_len ({max_input_len}), specifying to max_input_len ({max_input_len}).")
        max_num_tokens = max_input_len
    elif max_num_tokens < tokens_per_block and enable_context_fmha:
        log("W", f"When enable_context_fmha is turned on, max_num_tokens ({max_num_tokens}) should be at least "
                 f"tokens_per_block ({tokens_per_block}), specifying to tokens_per_block ({tokens_per_block}). At "
                 "this time, you also need to enable context chunking at runtime, otherwise you may encounter errors.")
        max_num_tokens = tokens_per_block
    if opt_num_tokens is not None and opt_num_tokens > max_num_tokens:
        log("W", f"opt_num_tokens ({opt_num_tokens}) shouldn't be greater than max_num_tokens ({max_num_tokens}), "
                 f"specifying to max_num_tokens ({max_num_tokens}).")
        opt_num_tokens = max_num_tokens
    return max_num_tokens, opt_num_tokens


# pretrained_config keys the runtime's GptJsonConfig reads with json.at (see tensorrt_llm/bindings/__init__.py).
# The real trtllm-build refuses a checkpoint without them (PretrainedConfig); the stand-in fills them in so a
# minimal test checkpoint still gives a loadable engine, and lists what it filled under "_standin".
RUNTIME_PRETRAINED_DEFAULTS = {"dtype": "float16", "hidden_size": 2048, "num_hidden_layers": 16,
                               "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


# ---------------------------------------------------------------------------------------------- checkpoint loading
# Sources: 0.12.0.dev2024080600 (see the module docstring); lines in tests/data/trtllm_0_12_build.json.
# quantization/mode.py QuantAlgo: no MIXED_PRECISION in 0.12 (0.15 release notes: "Added AutoQ (mixed precision)").
QUANT_ALGOS = ("W8A16", "W4A16", "W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
               "W8A8_SQ_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN",
               "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN", "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN", "FP8",
               "FP8_PER_CHANNEL_PER_TOKEN", "INT8")
QUANT_ALGO_LIST = tuple(a for a in QUANT_ALGOS if a != "INT8")  # list(set(QuantAlgo) - {QuantAlgo.INT8})
KV_CACHE_QUANT_ALGO_LIST = ("FP8", "INT8")
GROUPWISE_ALGOS = ("W4A16_AWQ", "W4A8_AWQ", "W4A16_GPTQ")  # QuantMode.use_weight_only(per_group=True)
# models/modeling_utils.py QuantConfig (a dataclass: from_dict is cls(**config), so any other key is a TypeError).
QUANT_CONFIG_FIELDS = ("quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                       "has_zero_point", "pre_quant_scale", "exclude_modules")
# mapping.py Mapping.__init__ (from_dict is cls(**mapping)).
MAPPING_FIELDS = ("world_size", "rank", "gpus_per_node", "cp_size", "tp_size", "pp_size", "moe_tp_size",
                  "moe_ep_size")
# PretrainedConfig.__init__ keyword-only parameters; the first five have no default. Any other key goes through
# `setattr(self, key, value)` with the warning "Implicitly setting ..." -- an AttributeError for a read-only
# property (kv_dtype, quant_mode).
PRETRAINED_REQUIRED = ("architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads")
PRETRAINED_FIELDS = PRETRAINED_REQUIRED + (
    "vocab_size", "hidden_act", "logits_dtype", "norm_epsilon", "position_embedding_type", "max_position_embeddings",
    "num_key_value_heads", "intermediate_size", "mapping", "quantization", "use_parallel_embedding",
    "embedding_sharding_dim", "share_embedding_table", "head_size", "qk_layernorm")
PRETRAINED_PROPERTIES = ("kv_dtype", "quant_mode")
# models/llama/config.py LLaMAConfig.__init__ (+ the legacy moe_* keys it pops).
LLAMA_FIELDS = ("mlp_bias", "attn_bias", "rotary_base", "rotary_scaling", "residual_mlp",
                "disable_weight_only_quant_plugin", "moe", "remove_duplicated_kv_heads", "moe_num_experts",
                "moe_top_k", "moe_normalization_mode")
MOE_FIELDS = ("num_experts", "top_k", "normalization_mode", "tp_mode")  # layers/moe.py MoeConfig
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope_gptj", "rope_gpt_neox", "long_rope", "alibi",
                            "alibi_with_scale", "relative", "chatglm")  # functional.py PositionEmbeddingType
ROTARY_SCALING_TYPES = ("none", "linear", "dynamic", "longrope", "llama3")  # functional.py RotaryScalingType
# quantization/quantize.py quantize_layers: `quant_config.exclude_modules or [...]` -- an empty list means these.
DEFAULT_EXCLUDE_MODULES = ("*lm_head", "*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                           "*shared_expert_gate")
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "F64": 8, "I64": 8, "BOOL": 1, "F8_E4M3": 1}


def _check_fields(cls_name: str, given: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in given:
        if key not in known:
            raise TypeError(f"{cls_name}.__init__() got an unexpected keyword argument '{key}'")


def load_pretrained_config(config: dict[str, Any]) -> list[str]:
    """PretrainedConfig.from_dict -> LLaMAConfig(**config): raises as 0.12 does for what it cannot read; returns the
    keys it sets implicitly (each logged with 0.12's warning)."""
    architecture = config.get("architecture")
    if architecture != "LlamaForCausalLM":  # MODEL_MAP[config['architecture']] -- only Llama is modelled here
        raise NotImplementedError(f"stand-in trtllm-build models LlamaForCausalLM only, not {architecture!r}")
    moe = config.get("moe")
    if isinstance(moe, dict):
        _check_fields("MoeConfig", moe, MOE_FIELDS)
    position = config.get("position_embedding_type", "learned_absolute")
    if position not in POSITION_EMBEDDING_TYPES:
        raise ValueError(f"Unsupported position embedding type: {position}")
    mapping = config.get("mapping") or {}
    _check_fields("Mapping", mapping, MAPPING_FIELDS)
    sizes = [mapping.get(k, 1) for k in ("pp_size", "cp_size", "tp_size")]
    if sizes[0] * sizes[1] * sizes[2] != mapping.get("world_size", 1):
        raise ValueError(f"world_size must equal to pp_size * cp_size * tp_size, but got {mapping.get('world_size', 1)}"
                         f" != {sizes[0]} * {sizes[1]} * {sizes[2]}")
    quantization = config.get("quantization") or {}
    _check_fields("QuantConfig", quantization, QUANT_CONFIG_FIELDS)
    implicit = [k for k in config if k not in PRETRAINED_FIELDS + LLAMA_FIELDS]
    for key in implicit:
        if key in PRETRAINED_PROPERTIES:
            raise AttributeError(f"property '{key}' of 'LLaMAConfig' object has no setter")
        log("W", f"Implicitly setting LLaMAConfig.{key} = {config[key]}")
    return implicit


def quant_mode_asserts(quantization: dict[str, Any]) -> None:
    """QuantMode.from_quant_algo, reached through QuantConfig.quant_mode when the model is quantized: bare asserts."""
    quant_algo, kv_cache_quant_algo = quantization.get("quant_algo"), quantization.get("kv_cache_quant_algo")
    assert quant_algo is None or quant_algo in QUANT_ALGO_LIST
    assert kv_cache_quant_algo is None or kv_cache_quant_algo in KV_CACHE_QUANT_ALGO_LIST


def rotary_scaling_type(config: dict[str, Any]) -> None:
    """layers/attention.py: Attention reads rotary_scaling["type"] (or "rope_type") through
    RotaryScalingType.from_string when the model is built."""
    scaling = config.get("rotary_scaling")
    if scaling is not None:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ROTARY_SCALING_TYPES:
            raise ValueError(f"Unsupported rotary scaling type: {kind}")


def read_safetensors_header(path: str) -> dict[str, Any] | None:
    """The tensor table of a .safetensors file (8-byte little-endian length, then JSON); None when the file is
    missing or is no safetensors file (the placeholders other tests use)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= os.path.getsize(path) - 8:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None


def expected_llama_parameters(config: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every weight LLaMAForCausalLM (models/llama/model.py) asks the
    checkpoint for after quantize() (quantization/quantize.py) has replaced the layers it quantizes, tp_size 1."""
    dtype = SAFETENSORS_DTYPES[config["dtype"]]
    hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_size = config.get("head_size") or hidden // heads
    inter = config.get("intermediate_size") or hidden * 4
    vocab = config["vocab_size"]
    q = config.get("quantization") or {}
    algo = q.get("quant_algo")
    if algo not in (None, *GROUPWISE_ALGOS) or algo == "W4A8_AWQ":
        raise NotImplementedError(f"stand-in trtllm-build checks the weights of unquantized and W4A16 group-wise "
                                  f"checkpoints only, not {algo}")
    excludes = q.get("exclude_modules") or DEFAULT_EXCLUDE_MODULES
    params: dict[str, tuple[str, tuple[int, ...]]] = {"transformer.vocab_embedding.weight": (dtype, (vocab, hidden)),
                                                      "transformer.ln_f.weight": (dtype, (hidden,))}
    linears = {"lm_head": (hidden, vocab, False)}
    for i in range(layers):
        p = f"transformer.layers.{i}"
        params[f"{p}.input_layernorm.weight"] = (dtype, (hidden,))
        params[f"{p}.post_layernorm.weight"] = (dtype, (hidden,))
        linears[f"{p}.attention.qkv"] = (hidden, (heads + 2 * kv_heads) * head_size, bool(config.get("attn_bias")))
        linears[f"{p}.attention.dense"] = (heads * head_size, hidden, bool(config.get("attn_bias")))
        for name, (n_in, n_out) in (("fc", (hidden, inter)), ("gate", (hidden, inter)), ("proj", (inter, hidden))):
            linears[f"{p}.mlp.{name}"] = (n_in, n_out, bool(config.get("mlp_bias")))
        if q.get("kv_cache_quant_algo"):  # kv_cache_quantize: Parameter(shape=(1, ), dtype='float32')
            params[f"{p}.attention.kv_cache_scaling_factor"] = ("F32", (1,))
    for name, (n_in, n_out, bias) in linears.items():
        if bias:
            params[f"{name}.bias"] = (dtype, (n_out,))
        if algo in GROUPWISE_ALGOS and not any(fnmatch.fnmatchcase(name, e) for e in excludes):
            # quantization/layers.py WeightOnlyGroupwiseQuantLinear
            group = q.get("group_size", 128)
            params[f"{name}.weight"] = (dtype, (n_in, n_out // 4))
            params[f"{name}.weights_scaling_factor"] = (dtype, (n_in // group, n_out))
            if q.get("pre_quant_scale"):
                params[f"{name}.prequant_scaling_factor"] = (dtype, (1, n_in))
            if q.get("has_zero_point"):
                params[f"{name}.zero"] = (dtype, (n_in // group, n_out))
        else:
            params[f"{name}.weight"] = (dtype, (n_out, n_in))
    return params


def preprocessed(config: dict[str, Any], name: str, dtype: str, shape: list[int]) -> tuple[str, tuple[int, ...]]:
    """models/modeling_utils.py preprocess_weights for W4A16_AWQ: every int8 `*weight` is packed INT4 [out/2, in],
    transposed and viewed as the model dtype [in, out/4]; scales transposed and cast; pre-quant scales [1, in]."""
    if (config.get("quantization") or {}).get("quant_algo") != "W4A16_AWQ":
        return dtype, tuple(shape)
    model_dtype = SAFETENSORS_DTYPES[config["dtype"]]
    if name.endswith("weight") and dtype == "I8":
        return model_dtype, (shape[1], shape[0] // 2)
    if name.endswith("weights_scaling_factor"):
        return model_dtype, (shape[1], shape[0])
    if name.endswith("prequant_scaling_factor"):
        return dtype, (1, math.prod(shape))
    return dtype, tuple(shape)


def load_checkpoint_weights(ckpt_dir: str, config: dict[str, Any]) -> bool:
    """PretrainedModel.from_checkpoint -> preprocess_weights -> load: every parameter the model asks for must be
    provided with its shape (RuntimeError otherwise); extra tensors are a warning; a dtype mismatch is a warning.
    Returns False when rank0.safetensors is missing or a placeholder (then nothing is checked; 0.12 would fail)."""
    path = os.path.join(ckpt_dir, "rank0.safetensors")  # rank 0 of a single-rank checkpoint (see main)
    header = read_safetensors_header(path)
    if header is None:
        log("W", f"[stand-in] {path} is missing or no safetensors file: weights NOT checked")
        return False
    expected = expected_llama_parameters(config)
    provided = {name: preprocessed(config, name, t["dtype"], t["shape"]) for name, t in header.items()}
    missing = set(expected) - set(provided)
    if missing:
        raise RuntimeError(f"Required but not provided tensors:{missing}")
    extra = set(provided) - set(expected)
    if extra:
        log("W", f"Provided but not expected tensors: {extra}")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = provided[name]
        if got_shape != shape:
            raise RuntimeError(f"Encounter error 'The value updated is not the same shape as the original. Updated: "
                               f"{got_shape}, original: {shape}' for parameter '{name}'")
        if got_dtype != dtype:
            log("W", f"Parameter was initialized as {dtype} but set to {got_dtype}")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    tik = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.model_cls_file is not None or args.build_config is not None or \
            args.speculative_decoding_mode not in (None, "draft_tokens_external"):
        raise NotImplementedError("stand-in trtllm-build: --model_cls_file, --build_config and speculative "
                                  "decoding other than draft_tokens_external are not modelled")

    plugin_config = plugin_config_from_args(args)
    if args.fast_build:
        plugin_config["manage_weights"] = True  # AFTER version; INFERRED for 0.12 (see PLUGIN_FIELDS)

    # build.py (BEFORE) main: --checkpoint_dir, else --model_config (a .json) -- with neither, `None.lower()` fails.
    ckpt_dir_or_model_config = args.checkpoint_dir if args.checkpoint_dir is not None else args.model_config
    if ckpt_dir_or_model_config.lower().endswith('.json'):
        config_path = ckpt_dir_or_model_config
    else:
        config_path = os.path.join(ckpt_dir_or_model_config, 'config.json')
    with open(config_path, encoding="utf-8") as f:
        model_config: dict[str, Any] = json.load(f)
    implicit = load_pretrained_config(model_config)  # PretrainedConfig.from_json_file(config_path)

    if args.multiple_profiles == "enable" and args.opt_num_tokens is not None:
        raise RuntimeError("multiple_profiles is enabled, while opt_num_tokens is set. "
                           "They are not supposed to be working in the same time for now.")

    # build_model -> from_checkpoint (weights), then the model's __post_init__ quantizes it (QuantMode asserts) and
    # builds its attention layers (rotary scaling type). Weights need the shape keys the stand-in fills otherwise.
    weights_checked = (args.checkpoint_dir is not None and all(k in model_config for k in PRETRAINED_REQUIRED)
                       and "vocab_size" in model_config
                       and load_checkpoint_weights(args.checkpoint_dir, model_config))
    quant = model_config.get("quantization") or {}
    quant_mode_asserts(quant)
    rotary_scaling_type(model_config)

    # Rotary scaling factor, used for the default max_seq_len: builder.py _init_max_seq_len of 0.12.0.dev2024080600
    # (L709-717; the BEFORE build.py indexed ['type'] and ['factor'] directly).
    rotary_scaling = model_config.get("rotary_scaling")
    if rotary_scaling is not None:
        rotary_type = rotary_scaling.get('type', rotary_scaling.get('rope_type'))
        rotary_factor = rotary_scaling.get('factor', 1.0) if rotary_type != 'su' else 1
    else:
        rotary_factor = 1
    max_position_embeddings = model_config.get("max_position_embeddings")
    if args.max_seq_len is None:
        # Step 1: Find the upper bound of max_seq_len
        deduced_max_seq_len = 2048
        if max_position_embeddings is not None:
            deduced_max_seq_len = max_position_embeddings
        # Step 2: Scale max_seq_len with rotary scaling. 0.12 fixed non-integer results (#2018): math.ceil + int as
        # in the AFTER version (INFERRED for 0.12).
        if rotary_factor != 1:
            deduced_max_seq_len = math.ceil(deduced_max_seq_len * rotary_factor)
            log("W", f"max_seq_len is scaled to {deduced_max_seq_len} by rotary scaling {rotary_factor}")
        # Step 3: Assign the new max_seq_len
        args.max_seq_len = int(deduced_max_seq_len)
        log("I", f"max_seq_len is not specified, using value {deduced_max_seq_len}")
    elif not plugin_config["streamingllm"] and max_position_embeddings is not None and \
            model_config.get("position_embedding_type") != "relative" and \
            args.max_seq_len > max_position_embeddings * rotary_factor:
        log("W", f"max_seq_len {args.max_seq_len} is larger than max_position_embeddings {max_position_embeddings} "
                 f"* rotary scaling {rotary_factor}, the model accuracy might be affected")

    # build.py (BEFORE) and builder.py (AFTER) alike: a too large max_input_len is CLIPPED, not refused.
    if args.max_input_len > args.max_seq_len:
        log("W", f"max_input_len is {args.max_input_len} is larger than max_seq_len {args.max_seq_len}, clipping "
                 "it to max_seq_len")
        args.max_input_len = args.max_seq_len

    # builder.py (BEFORE) BuildConfig.__post_init__
    max_num_tokens, opt_num_tokens = check_max_num_tokens(
        max_num_tokens=args.max_num_tokens, opt_num_tokens=args.opt_num_tokens, max_batch_size=args.max_batch_size,
        max_input_len=args.max_input_len, max_seq_len=args.max_seq_len, max_beam_width=args.max_beam_width,
        remove_input_padding=plugin_config["remove_input_padding"], enable_context_fmha=plugin_config["context_fmha"],
        tokens_per_block=plugin_config["tokens_per_block"], multiple_profiles=plugin_config["multiple_profiles"])
    if plugin_config["remove_input_padding"] and plugin_config["context_fmha"]:
        if args.max_input_len:
            log("W", "padding removal and fMHA are both enabled, max_input_len is not required and will be ignored")
    else:
        assert args.max_input_len is not None, \
            'padding removal and fMHA aren\'t both enabled, max_input_len is required'
        if args.max_seq_len:
            assert args.max_input_len <= args.max_seq_len, 'max_input_len should not be larger than max_seq_len'

    # builder.py build(), 0.12.0.dev2024080600 L842-856 (same text in BEFORE): the plugin dtype follows the model;
    # paged context FMHA vs a quantized KV cache (the attention plugin checks the INT8 case again at run time:
    # gptAttentionCommon.cpp TLLM_CHECK_WITH_INFO, same message).
    plugin_config["dtype"] = model_config.get("dtype", RUNTIME_PRETRAINED_DEFAULTS["dtype"])
    # builder.py build() (BEFORE, index id 3063623504), between the two: speculative decoding adds max_draft_len to
    # max_seq_len ("Maximum number of generated tokens remains the same") and raises max_num_tokens to
    # max_batch_size * (max_draft_len + 1). SpeculativeDecodingMode (models/modeling_utils.py, from_arguments) is an
    # IntFlag of auto() values: NONE 1, DRAFT_TOKENS_EXTERNAL 2, MEDUSA 4, LOOKAHEAD_DECODING 8, ...
    speculative = {None: 1, "draft_tokens_external": 2}[args.speculative_decoding_mode]
    if speculative != 1:
        log("I", f"Increasing max_seq_len ({args.max_seq_len}) by max_draft_len ({args.max_draft_len}) to account "
                 "for speculative decoding implementation specifics. Maximum number of generated tokens remains the "
                 f"same. New max_seq_len is set to {args.max_seq_len + args.max_draft_len}")
        args.max_seq_len += args.max_draft_len
        num_tokens = args.max_batch_size * (args.max_draft_len + 1)
        if max_num_tokens < num_tokens:
            log("I", f"max_num_tokens ({max_num_tokens}) is smaller than max_batch_size * (max_draft_len + 1) = "
                     f"({args.max_batch_size} * ({args.max_draft_len} + 1)). New max_num_tokens is set to "
                     f"{num_tokens}.")
            max_num_tokens = num_tokens
    if plugin_config["use_paged_context_fmha"]:
        kv_algo, algo = quant.get("kv_cache_quant_algo"), quant.get("quant_algo")
        if kv_algo == "FP8" and algo != "FP8":
            raise RuntimeError("FP8 Paged Context FMHA only works with fp8 quantization workflow currently.")
        if kv_algo == "FP8" and not plugin_config["use_fp8_context_fmha"]:
            plugin_config["use_fp8_context_fmha"] = True
            log("W", "FP8 Context FMHA is enabled by default to support FP8 Paged Context FMHA.")
        if kv_algo == "INT8":
            raise RuntimeError("Paged Context FMHA doesn't work with int8 kv cache currently.")

    # builder.py (BEFORE) BuildConfig field order; EngineConfig.to_dict drops dry_run and visualize_network.
    build_config: dict[str, Any] = {
        "max_input_len": args.max_input_len,
        "max_seq_len": args.max_seq_len,
        "opt_batch_size": None,
        "max_batch_size": args.max_batch_size,
        "max_beam_width": args.max_beam_width,
        "max_num_tokens": max_num_tokens,
        "opt_num_tokens": opt_num_tokens,
        "max_prompt_embedding_table_size": args.max_prompt_embedding_table_size,
        "gather_context_logits": args.gather_context_logits,
        "gather_generation_logits": args.gather_generation_logits,
        "strongly_typed": True,
        "builder_opt": args.builder_opt,
        "profiling_verbosity": args.profiling_verbosity,
        "enable_debug_output": args.enable_debug_output,
        "max_draft_len": args.max_draft_len,
        "speculative_decoding_mode": speculative,  # an IntFlag: json writes the int
        "use_refit": False,
        "input_timing_cache": args.input_timing_cache,
        "output_timing_cache": args.output_timing_cache,
        # LoraConfig.to_dict / AutoParallelConfig.to_dict were not read: these two dicts are NOT from source.
        "lora_config": {"lora_dir": args.lora_dir or [], "lora_ckpt_source": args.lora_ckpt_source,
                        "max_lora_rank": args.max_lora_rank, "lora_target_modules": args.lora_target_modules or []},
        "auto_parallel_config": {"world_size": args.auto_parallel, "gpus_per_node": args.gpus_per_node},
        "weight_sparsity": args.weight_sparsity,
        "weight_streaming": args.weight_streaming,
        "plugin_config": plugin_config,
        "use_strip_plan": args.strip_plan,
        "max_encoder_input_len": args.max_encoder_input_len,
        "use_fused_mlp": args.use_fused_mlp,
    }

    pretrained = dict(model_config)
    filled = [key for key in RUNTIME_PRETRAINED_DEFAULTS if key not in pretrained]
    for key in filled:
        pretrained[key] = RUNTIME_PRETRAINED_DEFAULTS[key]
    mapping = pretrained.setdefault("mapping", {})
    if "tp_size" not in mapping:
        filled.append("mapping")
    mapping.setdefault("world_size", 1)
    mapping.setdefault("tp_size", 1)
    mapping.setdefault("pp_size", 1)
    if mapping["world_size"] != 1:
        raise NotImplementedError("stand-in trtllm-build builds rank 0 of a single-rank checkpoint only")

    engine_config = {
        "version": VERSION,
        "pretrained_config": pretrained,
        "build_config": build_config,
        "_standin": {"filled_pretrained_config": filled, "implicit_pretrained_config": implicit,
                     "weights_checked": bool(weights_checked),
                     "not_from_source": ["build_config.lora_config", "build_config.auto_parallel_config"]},
    }
    # builder.py (BEFORE) Engine.save: rank 0 writes config.json (json.dump indent=4), each rank rank{N}.engine.
    with open(os.path.join(args.output_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(engine_config, f, indent=4)
    with open(os.path.join(args.output_dir, "rank0.engine"), "wb") as f:
        f.write(b"stand-in TensorRT engine\n")

    t = time.strftime('%H:%M:%S', time.gmtime(time.time() - tik))
    log("I", f"Total time of building all engines: {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
