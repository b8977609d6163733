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
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    tik = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.model_cls_file is not None or args.build_config is not None or args.speculative_decoding_mode:
        raise NotImplementedError("stand-in trtllm-build: --model_cls_file, --build_config and speculative "
                                  "decoding are not modelled")

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

    if args.multiple_profiles == "enable" and args.opt_num_tokens is not None:
        raise RuntimeError("multiple_profiles is enabled, while opt_num_tokens is set. "
                           "They are not supposed to be working in the same time for now.")

    # build.py (BEFORE): rotary scaling factor, used for the default max_seq_len.
    rotary_scaling = model_config.get("rotary_scaling")
    if rotary_scaling is not None:
        rotary_type = rotary_scaling['type']
        rotary_factor = rotary_scaling['factor'] if rotary_type != 'su' else 1
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

    # builder.py (BEFORE) build(): the plugin dtype follows the model; paged context FMHA vs quantized KV cache.
    plugin_config["dtype"] = model_config.get("dtype", RUNTIME_PRETRAINED_DEFAULTS["dtype"])
    quant = model_config.get("quantization") or {}
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
        "speculative_decoding_mode": 1,  # SpeculativeDecodingMode.NONE = auto() = 1, an IntFlag: json writes 1
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
        "_standin": {"filled_pretrained_config": filled,
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
