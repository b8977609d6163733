"""`edge-llama plan`: what fits on a given Jetson, and the engine build flags that get it there.

Every figure is computed from the model's shape and the device profile, and printed with its derivation:
- weights: INT4 linear layers (0.5 byte/parameter) + their FP16 group scales + AWQ pre-quant scales + norms,
  the FP16 embedding table and the lm_head: FP16 by default, INT4-AWQ with `--lm-head int4` (TRT-LLM stores it
  even when the model ties it to the embedding). For Llama-3.2-1B the FP16 lm_head is half of the bytes a decoded
  token reads, so the plan also prints the decode ceiling for each lm_head choice;
- activations: fixed at build time by max_num_tokens (TensorRT reserves them for the largest shapes);
- an INT8 KV cache cannot be built with paged context FMHA in TensorRT-LLM 0.12 (builder.py: "Paged Context FMHA
  doesn't work with int8 kv cache currently."), and without it the runtime has neither chunked context nor KV
  block reuse, so a whole prompt is one engine step: max_num_tokens becomes max_seq_len (more activations);
- KV cache: layers x 2 (K and V) x kv_heads x head_dim x bytes per value, per token;
- runtime overhead (CUDA/TensorRT) and the OS reserve come from the device profile;
- decode ceiling: a decode step reads every linear weight, the lm_head and the KV cache once, so
  tokens/s <= bandwidth / bytes read per token.
The KV budget is an explicit token count (max_batch x max_seq_len, if memory allows): a small fixed budget,
never "whatever is free".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from edge_llama.errors import ConfigError
from edge_llama.pipeline.quantize import LM_HEAD_CHOICES, LM_HEAD_INT8_REFUSED

GIB = 1024**3
MIB = 1024**2
GB = 1e9

# Llama-3.2-1B-Instruct, from its published config.json.
LLAMA_3_2_1B = {
    "name": "Llama-3.2-1B-Instruct", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": True,
}
PRESETS = {"llama-3.2-1b": LLAMA_3_2_1B}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int

    @classmethod
    def from_config(cls, c: dict[str, Any], name: str) -> ModelShape:
        try:
            heads = c["num_attention_heads"]
            return cls(name=c.get("name", name), hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                       layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads", heads),
                       head_dim=c.get("head_dim") or c.get("head_size") or c["hidden_size"] // heads,
                       vocab=c["vocab_size"], max_position=c.get("max_position_embeddings", 4096))
        except KeyError as exc:
            raise ConfigError(f"model config {name} lacks {exc.args[0]}") from None


@dataclass(frozen=True)
class Device:
    key: str
    name: str
    memory_gib: float
    bandwidth_gbs: float
    os_reserve_gib: float
    runtime_overhead_gib: float
    jetpack: str
    trtllm_0_12: bool
    cuda_arch: int


def devices() -> dict[str, Device]:
    data = json.loads(files("edge_llama").joinpath("data/devices.json").read_text())
    return {key: Device(key=key, **value) for key, value in data["devices"].items()}


def load_model(spec: str) -> ModelShape:
    """A preset name, a Hugging Face config.json, or a folder holding one (HF or TRT-LLM checkpoint)."""
    if spec in PRESETS:
        return ModelShape.from_config(PRESETS[spec], spec)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    try:
        return ModelShape.from_config(json.loads(path.read_text()), path.parent.name)
    except FileNotFoundError:
        raise ConfigError(f"--model {spec}: neither a preset ({', '.join(PRESETS)}) nor a config.json") from None
    except ValueError as exc:
        raise ConfigError(f"--model {spec}: not valid JSON ({exc})") from None


@dataclass(frozen=True)
class PlanOptions:
    device: str
    model: str = "llama-3.2-1b"
    memory_budget_gib: float | None = None  # default: device memory - OS reserve
    group_size: int = 128
    kv_dtype: str = "fp16"  # fp16 | int8
    max_batch: int = 1
    max_seq_len: int = 4096
    max_num_tokens: int = 512
    lm_head: str = "fp16"  # fp16 | int4 | int8 (a figure only: TensorRT-LLM 0.12 cannot load it)
    max_draft_len: int = 0  # > 0: an engine that takes prompt-lookup draft tokens (draft_tokens_external)


def lm_head_bytes(m: ModelShape, kind: str, group_size: int) -> tuple[int, str]:
    """Bytes of the lm_head weights ([vocab, hidden]) and how they add up."""
    weights = m.vocab * m.hidden
    if kind == "int4":  # W4A16_AWQ like the other layers: packed INT4, FP16 group scales, FP16 pre-quant scale
        return (weights // 2 + weights // group_size * 2 + m.hidden * 2,
                f"{m.vocab} x {m.hidden} x 0.5 B + scales / group {group_size} x 2 B + pre-quant {m.hidden} x 2 B")
    if kind == "int8":  # W8A16: one FP16 scale per output row
        return weights + m.vocab * 2, f"{m.vocab} x {m.hidden} x 1 B + {m.vocab} row scales x 2 B"
    return weights * 2, f"{m.vocab} x {m.hidden} x 2 bytes (not quantized)"


def plan(opts: PlanOptions) -> dict[str, Any]:
    table = devices()
    if opts.device not in table:
        raise ConfigError(f"unknown device {opts.device!r}; known: {', '.join(table)}")
    if opts.kv_dtype not in ("fp16", "int8"):
        raise ConfigError("--kv-dtype must be fp16 or int8")
    if opts.lm_head not in LM_HEAD_CHOICES:
        raise ConfigError(f"--lm-head must be one of {', '.join(LM_HEAD_CHOICES)}")
    dev, m = table[opts.device], load_model(opts.model)
    if opts.lm_head == "int8" and dev.trtllm_0_12:
        raise ConfigError(LM_HEAD_INT8_REFUSED)
    if opts.lm_head == "int4" and m.vocab % opts.group_size:
        raise ConfigError(f"--lm-head int4: vocab_size {m.vocab} is not a multiple of --group-size {opts.group_size}")
    if opts.max_seq_len > m.max_position:
        raise ConfigError(f"--max-seq-len {opts.max_seq_len} exceeds the model's {m.max_position} positions")
    if not 0 <= opts.max_draft_len <= 16:
        raise ConfigError(f"--max-draft-len {opts.max_draft_len} must be between 0 (no drafts) and 16")
    if opts.max_draft_len and opts.kv_dtype == "int8":
        # An INT8 KV engine has no paged context FMHA, hence no KV block reuse, and the batch manager requires
        # block reuse for a draft-token target model ("KV cache block reuse must be enabled for speculative
        # decoding target model", trtGptModelInflightBatching.cpp of a later release; 0.12's is a binary).
        raise ConfigError("--max-draft-len needs KV block reuse, which an INT8 KV cache rules out in TensorRT-LLM "
                          "0.12 (no paged context FMHA): use --kv-dtype fp16 with draft tokens")
    q_dim, kv_dim = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for width in (m.hidden, q_dim, m.intermediate):
        if width % opts.group_size:
            raise ConfigError(f"--group-size {opts.group_size} does not divide the layer width {width}")
    steps: list[dict[str, Any]] = []

    def step(name: str, value: float, how: str, unit: str = "bytes") -> float:
        steps.append({"name": name, "value": value, "unit": unit, "how": how})
        return value

    per_layer = m.hidden * (q_dim + 2 * kv_dim) + q_dim * m.hidden + 3 * m.hidden * m.intermediate
    linear_params = step("linear parameters", m.layers * per_layer,
                         f"{m.layers} layers x (h*(q+2kv) + q*h + 3*h*i) = {m.layers} x "
                         f"({m.hidden}*({q_dim}+2*{kv_dim}) + {q_dim}*{m.hidden} + 3*{m.hidden}*{m.intermediate})",
                         "params")
    int4 = step("INT4 weights", linear_params / 2, "linear parameters x 0.5 byte")
    scales = step("group scales", linear_params / opts.group_size * 2,
                  f"linear parameters / group {opts.group_size} x 2 bytes (FP16)")
    prequant = step("AWQ pre-quant scales", m.layers * (m.hidden + q_dim + 2 * m.hidden + m.intermediate) * 2,
                    "per layer: inputs of qkv, dense, fc, gate, proj x 2 bytes")
    norms = step("norms", (2 * m.layers + 1) * m.hidden * 2, "(2 per layer + final) x hidden x 2 bytes")
    embedding = step("embedding (FP16)", m.vocab * m.hidden * 2, f"{m.vocab} x {m.hidden} x 2 bytes")
    lm_head = step(f"lm_head ({opts.lm_head.upper()})", *lm_head_bytes(m, opts.lm_head, opts.group_size))
    weights = step("weights total", int4 + scales + prequant + norms + embedding + lm_head,
                   "INT4 + scales + pre-quant + norms + embedding + lm_head")
    # TensorRT-LLM maps the engine file (use_mmap=True): the pages it reads while deserializing are clean page
    # cache the kernel can drop, so they are not resident cost. Without use_mmap the runtime would keep a heap copy
    # of the whole file next to the weights (NVIDIA's README4Jetson: 12.3 GB vs 7.3 GB for an INT4 Llama-3-8B).
    engine_file = step("engine file (mapped, not counted)", weights,
                       "~ weights; read through use_mmap as reclaimable page cache, not added to resident")
    kv_bytes = 1 if opts.kv_dtype == "int8" else 2
    kv_per_token = step("KV per token", m.layers * 2 * m.kv_heads * m.head_dim * kv_bytes,
                        f"{m.layers} layers x 2 (K,V) x {m.kv_heads} kv heads x {m.head_dim} x {kv_bytes} B")
    act_per_token = (4 * m.hidden + q_dim + 2 * kv_dim + 3 * m.intermediate) * 2
    # Paged context FMHA (chunked context, KV block reuse) is impossible with an INT8 KV cache in 0.12: a prompt is
    # then one engine step, so the step must hold max_seq_len tokens (the runtime's "Without enabling chunked
    # context, the max context length needs to be less than or equal to the max number of tokens").
    paged_context = opts.kv_dtype != "int8"
    step_tokens = opts.max_num_tokens if paged_context else opts.max_seq_len
    activations = step("activations", step_tokens * act_per_token + opts.max_batch * m.vocab * 4,
                       f"{'max_num_tokens' if paged_context else 'max_seq_len (no chunked context with INT8 KV)'} "
                       f"{step_tokens} x (4h + q + 2kv + 3i) x 2 B + batch x vocab x 4 B "
                       "logits (estimate; TensorRT reuses buffers across layers)")
    overhead = step("runtime overhead", dev.runtime_overhead_gib * GIB, "device profile (CUDA, TensorRT, cuBLAS)")
    budget = step("memory budget", (opts.memory_budget_gib if opts.memory_budget_gib is not None
                                    else dev.memory_gib - dev.os_reserve_gib) * GIB,
                  "--memory-budget" if opts.memory_budget_gib is not None else
                  f"device {dev.memory_gib} GiB - OS reserve {dev.os_reserve_gib} GiB")
    free_for_kv = budget - weights - activations - overhead
    if free_for_kv < kv_per_token * 64:
        raise ConfigError(f"the model does not fit: weights {weights / GIB:.2f} GiB + activations "
                          f"{activations / GIB:.2f} GiB + runtime {overhead / GIB:.2f} GiB exceed the budget of "
                          f"{budget / GIB:.2f} GiB")
    tokens_per_block = 64
    fit = int(free_for_kv // kv_per_token) // tokens_per_block * tokens_per_block
    wanted = opts.max_batch * opts.max_seq_len
    kv_tokens = step("KV budget", min(fit, wanted),
                     f"min(memory fit {fit} = free {free_for_kv / MIB:.0f} MiB / {kv_per_token} B, "
                     f"max_batch x max_seq_len = {wanted}), in blocks of {tokens_per_block}", "tokens")
    max_seq_len = min(opts.max_seq_len, int(kv_tokens))
    resident = step("predicted resident", weights + activations + overhead + kv_tokens * kv_per_token,
                    "weights + activations + runtime overhead + KV budget x KV per token")
    body = int4 + scales + prequant + norms + m.hidden * 2
    read_empty = step("bytes read per token", body + lm_head,
                      "INT4 + scales + pre-quant + norms + lm_head + one embedding row")
    read_full = step("bytes read per token at full context", read_empty + max_seq_len * kv_per_token,
                     f"+ {max_seq_len} cached tokens x KV per token")
    ceiling = step("decode ceiling", dev.bandwidth_gbs * GB / read_empty,
                   f"{dev.bandwidth_gbs} GB/s / {read_empty / GB:.3f} GB", "tokens/s")
    ceiling_full = step("decode ceiling at full context", dev.bandwidth_gbs * GB / read_full,
                        f"{dev.bandwidth_gbs} GB/s / {read_full / GB:.3f} GB", "tokens/s")
    # Building holds the checkpoint weights, the TensorRT network copy and tactic workspaces at once.
    build_peak = step("build peak (estimate)", 2.5 * weights + 1.0 * GIB, "2.5 x weights + 1 GiB workspace")
    # The same figures for every lm_head choice (not verified on hardware: bandwidth-bound decode assumed).
    by_lm_head = {}
    for kind in LM_HEAD_CHOICES:
        read = body + lm_head_bytes(m, kind, opts.group_size)[0]
        by_lm_head[kind] = {"bytes_read_per_token": int(read),
                            "decode_ceiling_tok_s": round(dev.bandwidth_gbs * GB / read, 1),
                            "loads_in_trtllm_0_12": kind != "int8"}
    warnings = []
    if not paged_context:
        fp16_activations = opts.max_num_tokens * act_per_token + opts.max_batch * m.vocab * 4
        kv_saved = kv_tokens * kv_per_token  # the INT8 cache is half the FP16 one
        warnings.append(
            "INT8 KV cache: TensorRT-LLM 0.12 refuses paged context FMHA with it (\"Paged Context FMHA doesn't work "
            "with int8 kv cache currently.\"), so this plan disables it and you lose chunked context and KV block "
            "reuse: each prompt is one engine step (max_num_tokens = max_seq_len, activations "
            f"{(activations - fp16_activations) / MIB:+.0f} MiB) and every turn recomputes the whole conversation "
            f"instead of reusing its cached prefix; the KV cache saves {kv_saved / MIB:.0f} MiB"
            + (" -- a net loss of memory here: --kv-dtype fp16 needs less" if activations - fp16_activations > kv_saved
               else ""))
    if not dev.trtllm_0_12:
        warnings.append(f"{dev.name} (JetPack {dev.jetpack}) is not supported by TensorRT-LLM 0.12-jetson: it runs "
                        "llama.cpp with CUDA (below); the memory figures are for the INT4-AWQ engine, a Q4_K_M GGUF "
                        "is of similar size (~0.8 GB of weights)")
    if build_peak > dev.memory_gib * GIB - 1.0 * GIB:
        warnings.append(f"building may be OOM-killed on this device (peak ~{build_peak / GIB:.1f} GiB): add swap "
                        "(e.g. 8 GiB on NVMe), stop the desktop, or build on a larger Orin with the same JetPack")
    build_flags = [
        "--max_batch_size", str(opts.max_batch), "--max_input_len", str(max_seq_len - 1), "--max_seq_len",
        str(max_seq_len), "--max_num_tokens", str(opts.max_num_tokens if paged_context else max_seq_len),
        "--max_beam_width", "1", "--remove_input_padding", "enable", "--context_fmha", "enable",
        "--paged_kv_cache", "enable", "--use_paged_context_fmha", "enable" if paged_context else "disable",
        "--gemm_plugin", "auto", "--gpt_attention_plugin", "auto",
        "--tokens_per_block", str(tokens_per_block), "--multiple_profiles", "disable", "--workers", "1",
    ]
    if opts.max_draft_len:  # the engine's max_seq_len grows by the draft length (trtllm-build does it)
        build_flags += ["--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len",
                        str(opts.max_draft_len)]
    return {
        "schema": 1, "device": asdict(dev), "model": asdict(m), "options": asdict(opts),
        "kv_tokens": int(kv_tokens), "max_seq_len": max_seq_len, "kv_dtype": opts.kv_dtype, "lm_head": opts.lm_head,
        "weights_bytes": int(weights), "kv_bytes_per_token": int(kv_per_token), "activations_bytes": int(activations),
        "resident_bytes": int(resident), "headroom_bytes": int(budget - resident),
        "bytes_read_per_token": int(read_empty), "decode_ceiling_tok_s": round(ceiling, 1),
        "decode_ceiling_full_context_tok_s": round(ceiling_full, 1), "build_peak_bytes": int(build_peak),
        "by_lm_head": by_lm_head,
        "trtllm_build_flags": build_flags, "runtime": {"engine.kv_tokens": int(kv_tokens)},
        "engine_file_bytes": int(engine_file), "backend": serving_backend(dev, m, int(kv_tokens), opts),
        "derivation": steps, "warnings": warnings,
    }


def serving_backend(dev: Device, m: ModelShape, kv_tokens: int, opts: PlanOptions) -> dict[str, Any]:
    """Which backend serves on `dev`, with the commands that set it up and the config that uses it."""
    if dev.trtllm_0_12:
        engine = f"/var/lib/edge-llama-models/{m.name}"
        quantize_flags = (" --kv-int8" if opts.kv_dtype == "int8" else "") + (
            f" --lm-head {opts.lm_head}" if opts.lm_head != "fp16" else "")
        plan_flags = (" --kv-dtype int8" if opts.kv_dtype == "int8" else "") + (
            f" --lm-head {opts.lm_head}" if opts.lm_head != "fp16" else "")
        return {
            "name": "trtllm",
            "why": f"TensorRT-LLM 0.12.0-jetson runs on {dev.name} (JetPack {dev.jetpack}, Python 3.10)",
            "commands": [
                "sudo deploy/install.sh --trtllm-wheel tensorrt_llm-0.12.0-cp310-cp310-linux_aarch64.whl",
                f"edge-llama quantize --model {m.name} --out {m.name}-awq{quantize_flags}"
                "        # any machine; a CUDA GPU is fastest",
                f"edge-llama plan --device {dev.key}{plan_flags} --json > plan.json",
                f"edge-llama build --checkpoint {m.name}-awq --plan plan.json --out {engine}   # on the device",
            ],
            "config": {"engine.backend": "trtllm", "engine.model": engine, "engine.kv_tokens": kv_tokens},
        }
    gguf = f"/var/lib/edge-llama-models/{m.name}-Q4_K_M.gguf"
    return {
        "name": "llamacpp",
        "why": f"TensorRT-LLM 0.12.0-jetson does not run on {dev.name} (JetPack {dev.jetpack}): llama.cpp with "
               f"CUDA (sm_{dev.cuda_arch}) and a GGUF of the model",
        "commands": [
            f"sudo deploy/install.sh --llamacpp --cuda-arch {dev.cuda_arch}   # llama-cpp-python with GGML_CUDA=on",
            f"sudo install -m 0644 {m.name}-Q4_K_M.gguf /var/lib/edge-llama-models/   # a GGUF of the model",
        ],
        "config": {"engine.backend": "llamacpp", "engine.model": gguf, "engine.kv_tokens": kv_tokens,
                   "engine.gpu_layers": None},
    }


def format_plan(p: dict[str, Any]) -> str:
    def show(s: dict[str, Any]) -> str:
        v, unit = s["value"], s["unit"]
        if unit == "bytes":
            text = f"{v / GIB:.3f} GiB" if v >= 0.1 * GIB else f"{v / MIB:.2f} MiB" if v >= MIB else f"{v:.0f} B"
        elif unit == "params":
            text = f"{v / 1e6:.1f} M"
        else:
            text = f"{v:.1f} {unit}" if isinstance(v, float) else f"{v} {unit}"
        return f"  {s['name']:<38} {text:>14}   {s['how']}"

    d, m = p["device"], p["model"]
    lines = [f"plan: {m['name']} INT4-AWQ (group {p['options']['group_size']}, lm_head {p['lm_head']}) on "
             f"{d['name']} ({d['memory_gib']} GiB, {d['bandwidth_gbs']} GB/s)", ""]
    lines += [show(s) for s in p["derivation"]]
    lines += ["", f"recommended runtime:  engine.kv_tokens: {p['kv_tokens']}   (KV cache {p['kv_dtype']}, "
                  f"{p['kv_tokens'] * p['kv_bytes_per_token'] / MIB:.0f} MiB)",
              f"predicted resident:   {p['resident_bytes'] / GIB:.2f} GiB, headroom "
              f"{p['headroom_bytes'] / GIB:.2f} GiB in the budget",
              f"decode ceiling:       {p['decode_ceiling_tok_s']} tok/s (empty context), "
              f"{p['decode_ceiling_full_context_tok_s']} tok/s (full context)",
              "decode ceiling by lm_head (bandwidth bound; not verified on hardware):"]
    lines += [f"  {kind:<5} {c['bytes_read_per_token'] / GB:.3f} GB/token {c['decode_ceiling_tok_s']:>7} tok/s"
              + ("" if c["loads_in_trtllm_0_12"] else "   TensorRT-LLM 0.12 cannot load it")
              for kind, c in p["by_lm_head"].items()]
    lines += ["trtllm-build flags:   " + " ".join(p["trtllm_build_flags"]),
              f"backend:              {p['backend']['name']} ({p['backend']['why']})"]
    lines += [f"  $ {command}" for command in p["backend"]["commands"]]
    lines += ["  config: " + ", ".join(f"{k}: {'null' if v is None else v}" for k, v in p["backend"]["config"].items())]
    lines += [f"warning: {w}" for w in p["warnings"]]
    return "\n".join(lines)


def load_plan(path: str | Path) -> dict[str, Any]:
    """A plan saved by `edge-llama plan --json` (for `edge-llama build` and `edge-llama doctor --plan`)."""
    try:
        plan = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--plan {path}: {exc.strerror} (make one with `edge-llama plan --json > plan.json`)"
                          ) from None
    except ValueError as exc:
        raise ConfigError(f"--plan {path}: not valid JSON ({exc})") from None
    if (not isinstance(plan, dict) or plan.get("schema") != 1
            or not {"trtllm_build_flags", "resident_bytes"} <= set(plan)):
        raise ConfigError(f"--plan {path} is not an `edge-llama plan --json` output")
    return plan
