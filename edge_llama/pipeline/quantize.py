"""`edge-llama quantize`: a Hugging Face Llama checkpoint -> an INT4-AWQ TensorRT-LLM checkpoint + manifest.

nvidia-modelopt's INT4_AWQ_CFG (awq_lite: per-channel activation-aware scales searched on calibration text, then
4-bit symmetric weights in groups of `block_size` input channels) is applied to every linear layer of the decoder,
and with `--lm-head int4` the same search quantizes lm_head (awq_head); `export_tensorrt_llm_checkpoint` writes
config.json + rank0.safetensors, the input of `trtllm-build`. q/k/v and gate/up are calibrated as the fused layers
TensorRT-LLM runs them as, and AWQ's clip search follows (awq_fused), so the exported checkpoint computes exactly
what was calibrated. Runs on CUDA when present, else on the CPU (slower, same result format). Checks that need no
heavy import run first, so a wrong folder fails in a second, not after loading torch.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import Any

from edge_llama import __version__
from edge_llama.errors import ConfigError, ModelError
from edge_llama.manifest import file_entries, hash_files, write_manifest
from edge_llama.pipeline.awq_fused import clip_search, fuse_shared_inputs, round_pre_quant_scales, unfuse
from edge_llama.pipeline.awq_head import quantize_head

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# awq_lite fake-quantizes every weight once per alpha per forward call, whatever the batch holds: several
# sequences per call made it 1.5x faster on a 2-core CPU (381 s -> 245 s), with the same statistics.
TOKENS_PER_FORWARD = 2048
MODELOPT_VERSION = "0.47.0"  # export_tensorrt_llm_checkpoint is deprecated in 0.48 and removed in 0.49

# How TensorRT-LLM 0.12 decides which layers of a W4A16_AWQ checkpoint are quantized (tensorrt_llm/quantization/
# quantize.py quantize_layers, L26-33 of 0.12.0.dev2024080600; quotes and sources in
# tests/data/trtllm_0_12_build.json): `exclude_modules = quant_config.exclude_modules or [defaults]`, matched with
# fnmatchcase against module names. An EMPTY list therefore means the defaults, which exclude '*lm_head'.
# modelopt 0.47 writes `exclude_modules: []` when every linear layer is quantized, so 0.12 would build an FP16
# lm_head and then fail to load the INT4 one. With a quantized lm_head we write 0.12's defaults without '*lm_head'.
TRTLLM_0_12_DEFAULT_EXCLUDES = ["*lm_head", "*router", "*vocab_embedding", "*position_embedding",
                                "*block_embedding", "*shared_expert_gate"]
LM_HEAD_CHOICES = ("fp16", "int8", "int4")
# Why --lm-head int8 is refused (sources in tests/data/trtllm_0_12_build.json): a 0.12 checkpoint has ONE
# quant_algo (QuantConfig); MIXED_PRECISION with per-layer quant_cfg.json, which an INT8 lm_head next to INT4-AWQ
# layers needs, is absent from 0.12's QuantAlgo (0.15 release notes: "Added AutoQ (mixed precision) support"), and
# under W4A16_AWQ 0.12's preprocess_weights reads every int8 `*weight` as packed INT4.
LM_HEAD_INT8_REFUSED = (
    "--lm-head int8: TensorRT-LLM 0.12 cannot load an INT8 lm_head next to INT4-AWQ layers: its checkpoint has one "
    "quant_algo (W4A16_AWQ here), the MIXED_PRECISION algorithm with per-layer configs arrived in 0.15, and 0.12 "
    "would read an int8 lm_head weight as packed INT4. Use --lm-head int4 (quantized like the other layers) or fp16")


@dataclass(frozen=True)
class QuantizeOptions:
    model: Path
    out: Path
    block_size: int = 128
    calib: str = "builtin"  # "builtin" or a UTF-8 text file
    calib_size: int = 32  # sequences (TRT-LLM's own script caps AWQ at 32)
    calib_seq_len: int = 512  # tokens per sequence
    kv_int8: bool = False
    alpha_step: float = 0.05  # awq_lite's grid over alpha in [0, 1]; modelopt's default 0.1 halves the search time
    clip: bool = True  # AWQ's per-group weight-clip search after the scale search (seconds; see awq_fused)
    lm_head: str = "fp16"  # fp16 | int4 (AWQ like the other layers) | int8 (refused: TensorRT-LLM 0.12 cannot load it)
    device: str = "auto"  # auto | cuda | cpu
    force: bool = False  # overwrite a non-empty output folder

    @property
    def method(self) -> str:
        return (f"awq_lite (alpha step {self.alpha_step:g}) with one scale per fused group"
                + (" + clip search" if self.clip else ""))


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a Llama-family checkpoint with its tokenizer; ModelError naming what is wrong."""
    config_path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir} is not a folder (expected a Hugging Face checkpoint folder)")
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{model_dir} has no config.json: not a Hugging Face checkpoint") from None
    except ValueError as exc:
        raise ModelError(f"{config_path} is not valid JSON: {exc}") from exc
    archs = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ModelError(f"{model_dir} is a {config.get('model_type') or archs or 'unknown'} model, not a Llama "
                         "(model_type 'llama'): only Llama-architecture models are supported")
    if not any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy it from the "
                         "original model folder")
    if not list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin")):
        raise ModelError(f"{model_dir} has no weights (*.safetensors)")
    return config


def layer_widths(config: dict[str, Any]) -> dict[str, int]:
    """Input widths of the quantized linear layers (the group size must divide each)."""
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    return {"hidden_size (q/k/v/gate/up input)": hidden,
            "num_attention_heads x head_dim (o_proj input)": config["num_attention_heads"] * head_dim,
            "intermediate_size (down_proj input)": config["intermediate_size"]}


def check_block_size(config: dict[str, Any], block_size: int) -> None:
    if block_size <= 0 or block_size & (block_size - 1):
        raise ConfigError(f"--block-size {block_size} must be a power of two (64 or 128)")
    for name, width in layer_widths(config).items():
        if width % block_size:
            fits = [b for b in (128, 64, 32) if all(w % b == 0 for w in layer_widths(config).values())]
            raise ConfigError(f"--block-size {block_size} does not divide {name} = {width}"
                              + (f"; use --block-size {fits[0]}" if fits else ""))


def check_lm_head(config: dict[str, Any], lm_head: str, block_size: int) -> None:
    if lm_head not in LM_HEAD_CHOICES:
        raise ConfigError(f"--lm-head {lm_head}: choose one of {', '.join(LM_HEAD_CHOICES)}")
    if lm_head == "int8":
        raise ConfigError(LM_HEAD_INT8_REFUSED)
    # modelopt 0.47 silently keeps lm_head unquantized when its rows are not a multiple of the group
    # (export/postprocess.py update_lm_head_quantization): say so instead.
    if lm_head == "int4" and config["vocab_size"] % block_size:
        raise ConfigError(f"--lm-head int4: vocab_size {config['vocab_size']} is not a multiple of --block-size "
                          f"{block_size}, and the exporter would keep lm_head in FP16")


def calibration_text(source: str) -> str:
    if source == "builtin":
        text = files("edge_llama").joinpath("data/calib_corpus.txt").read_text(encoding="utf-8")
        return "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    try:
        return Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--calib {source}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"--calib {source} is not UTF-8 text") from None


def calibration_batches(tokenizer: Any, text: str, count: int, seq_len: int) -> list[Any]:
    """`count` windows of `seq_len` consecutive tokens (fewer when the text is short), stacked into batches of
    [sequences, seq_len] with up to TOKENS_PER_FORWARD tokens each."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = min(count, len(ids) // seq_len)
    if n == 0:
        raise ConfigError(f"calibration text has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    if n < count:
        print(f"quantize: calibration text gives {n} sequences of {seq_len} tokens (asked for {count})",
              file=sys.stderr)
    windows = torch.as_tensor(ids[:n * seq_len]).reshape(n, seq_len)
    return list(windows.split(max(1, TOKENS_PER_FORWARD // seq_len)))


def awq_config(block_size: int, kv_int8: bool, alpha_step: float) -> dict[str, Any]:
    import copy

    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    cfg["algorithm"] = {**cfg["algorithm"], "method": "awq_lite", "alpha_step": alpha_step}
    for entry in cfg["quant_cfg"]:
        if entry.get("quantizer_name") == "*weight_quantizer":
            entry["cfg"]["block_sizes"][-1] = block_size
    if kv_int8:
        cfg["quant_cfg"].append({"quantizer_name": "*[kv]_bmm_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    return cfg


def fix_rope_config(model: Any, hf_config: dict[str, Any]) -> None:
    """transformers 5 moved rope_theta into config.rope_parameters, and modelopt's exporter then omits
    rotary_base (TRT-LLM would silently use 10000). Put it back before export."""
    rope = hf_config.get("rope_parameters") or {}
    theta = hf_config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    model.config.rope_theta = theta


def untie_lm_head(model: Any) -> None:
    """Give lm_head its own weight before AWQ edits it in place (modelopt's awq_lite copies the searched scale into
    the weight): tied to the embedding (Llama-3.2-1B, SmolLM2), that would rescale the embedding table too. The
    export stores lm_head and vocab_embedding separately either way."""
    import torch

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
        model.config.tie_word_embeddings = False


def patch_exported_config(out: Path, hf_config: dict[str, Any], lm_head: str = "fp16") -> dict[str, Any]:
    """Make the exported config carry the model's RoPE base and Llama-3 rope scaling, whatever the exporter did,
    and the exclude_modules that make TensorRT-LLM 0.12 quantize exactly the layers that were quantized."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    quantization = config.get("quantization") or {}
    if quantization.get("quant_algo") != "W4A16_AWQ" or (out / "quant_cfg.json").exists():
        raise ModelError(f"the exporter wrote quant_algo {quantization.get('quant_algo')!r}"
                         + (" with quant_cfg.json" if (out / "quant_cfg.json").exists() else "")
                         + "; TensorRT-LLM 0.12 needs one W4A16_AWQ format for every quantized layer")
    quantization["exclude_modules"] = (["lm_head"] if lm_head == "fp16" else
                                       [p for p in TRTLLM_0_12_DEFAULT_EXCLUDES if p != "*lm_head"])
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    config["rotary_base"] = float(hf_config.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = rope.get("rope_type") or rope.get("type")
    if kind and kind != "default":
        config["rotary_scaling"] = {"type": kind, **{k: v for k, v in rope.items()
                                                     if k not in ("rope_type", "type", "rope_theta")}}
    path.write_text(json.dumps(config, indent=2))
    return config


@dataclass
class Calibrated:
    """A model quantized in memory (modelopt fake-quant), ready for export."""

    model: Any
    tokenizer: Any
    hf_config: dict[str, Any]
    sequences: int
    device: str
    dtype: str
    seconds: float


def _heavy_imports() -> None:
    try:
        import modelopt.torch.quantization  # noqa: F401
        import torch  # noqa: F401
        import tqdm  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise ModelError(f"quantize needs the quantization extra ({exc.name} is missing): pip install torch==2.13.0 "
                         f"'edge-llama[quantize]' (nvidia-modelopt=={MODELOPT_VERSION} with --no-deps)") from None


def calibrate(opts: QuantizeOptions) -> Calibrated:
    """Load the checkpoint and run AWQ calibration (the slow part)."""
    hf_config = read_hf_config(opts.model)
    check_block_size(hf_config, opts.block_size)
    check_lm_head(hf_config, opts.lm_head, opts.block_size)
    if not 0 < opts.alpha_step <= 0.5:
        raise ConfigError(f"--alpha-step {opts.alpha_step:g} must be in (0, 0.5]")
    text = calibration_text(opts.calib)
    _heavy_imports()
    import modelopt.torch.quantization as mtq
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    cuda = torch.cuda.is_available() and opts.device != "cpu"
    if opts.device == "cuda" and not cuda:
        raise ConfigError("--device cuda: no CUDA device is available")
    device = "cuda" if cuda else "cpu"
    # fp16 on the GPU; fp32 on the CPU, where fp16 matmuls are slow and AWQ's scale search needs the precision.
    dtype = torch.float16 if cuda else torch.float32
    print(f"quantize: loading {opts.model} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype).to(device).eval()
    batches = calibration_batches(tokenizer, text, opts.calib_size, opts.calib_seq_len)
    sequences = sum(batch.shape[0] for batch in batches)

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            with tqdm(total=sequences, desc="calibration", unit="seq", file=sys.stderr) as bar:
                for batch in batches:
                    m(batch.to(device))
                    bar.update(batch.shape[0])

    if opts.lm_head == "int4":
        untie_lm_head(model)
    # One scale per fused group (q/k/v, gate/up), fp16-exact, then the clip search: see awq_fused.
    fuse_shared_inputs(model)
    mtq.quantize(model, awq_config(opts.block_size, opts.kv_int8, opts.alpha_step), forward_loop)
    unfuse(model)
    if opts.lm_head == "int4":  # awq_lite's search, scored from second moments (awq_head: ~10x cheaper here)
        quantize_head(model, batches, device, partial(tqdm, file=sys.stderr), opts.block_size, opts.alpha_step)
    round_pre_quant_scales(model)
    if opts.clip:
        clip_search(model, batches, device, partial(tqdm, file=sys.stderr))
    return Calibrated(model, tokenizer, hf_config, sequences, device, str(dtype).replace("torch.", ""),
                      time.monotonic() - started)


def export(calibrated: Calibrated, opts: QuantizeOptions) -> Path:
    """Write the TensorRT-LLM checkpoint, the tokenizer files and the manifest; returns the manifest path."""
    import modelopt
    import torch
    import transformers
    from modelopt.torch.export import export_tensorrt_llm_checkpoint
    from tqdm import tqdm

    started = time.monotonic()
    if opts.out.exists():
        shutil.rmtree(opts.out)
    opts.out.mkdir(parents=True)
    fix_rope_config(calibrated.model, calibrated.hf_config)
    with tqdm(total=2, desc="export", unit="step", file=sys.stderr) as bar, warnings.catch_warnings():
        # Expected and misleading here: without tensorrt_llm modelopt writes config.json itself (what we rely
        # on), and its lm_head warning fires whenever lm_head has quantizers, enabled (--lm-head int4) or not.
        warnings.filterwarnings("ignore", message="Cannot export tensorrt_llm checkpoint config")
        warnings.filterwarnings("ignore", message="Enable lm_head quantization")
        with torch.no_grad():
            export_tensorrt_llm_checkpoint(calibrated.model, "llama", dtype=torch.float16, export_dir=opts.out,
                                           inference_tensor_parallel=1, inference_pipeline_parallel=1)
        bar.update()
        trt_config = patch_exported_config(opts.out, calibrated.hf_config, opts.lm_head)
        for name in TOKENIZER_FILES:  # the runtime tokenizes with these (TRT-LLM does not)
            if (opts.model / name).exists():
                shutil.copy2(opts.model / name, opts.out / name)
        bar.update()
    source_files = sorted(p.name for p in opts.model.iterdir() if p.suffix in (".json", ".safetensors"))
    return write_manifest(opts.out, kind="trtllm-checkpoint", fields={
        "source_model": {"path": str(opts.model), "sha256": hash_files(opts.model, source_files)},
        "quantization": {"algo": trt_config.get("quantization", {}).get("quant_algo", "W4A16_AWQ"),
                         "group_size": opts.block_size, "method": opts.method,
                         "kv_cache": "int8" if opts.kv_int8 else "fp16", "lm_head": opts.lm_head},
        "calibration": {"source": opts.calib, "sequences": calibrated.sequences, "seq_len": opts.calib_seq_len,
                        "device": calibrated.device, "dtype": calibrated.dtype},
        "model": {k: trt_config.get(k) for k in ("architecture", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "vocab_size",
                                                  "max_position_embeddings", "rotary_base", "rotary_scaling")},
        "tools": {"edge-llama": __version__, "nvidia-modelopt": modelopt.__version__, "torch": torch.__version__,
                  "transformers": transformers.__version__},
        "timings_s": {"calibration": round(calibrated.seconds, 1),
                      "export": round(time.monotonic() - started, 1)},
        "files": file_entries(opts.out),
    })


def quantize(opts: QuantizeOptions) -> Path:
    """The whole step (checks, calibration, export); returns the manifest path."""
    check_lm_head(read_hf_config(opts.model), opts.lm_head, opts.block_size)
    if opts.out.exists() and any(opts.out.iterdir()) and not opts.force:
        raise ConfigError(f"{opts.out} is not empty (use --force to overwrite)")
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):  # modelopt prints its progress; stdout is for the result
        calibrated = calibrate(opts)
        manifest = export(calibrated, opts)
    print(f"quantize: {opts.out} in {math.ceil(time.monotonic() - started)} s "
          f"(calibration {calibrated.seconds:.0f} s)", file=sys.stderr)
    return manifest
