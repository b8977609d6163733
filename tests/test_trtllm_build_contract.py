"""The stand-in trtllm-build loads a checkpoint as TensorRT-LLM 0.12 does: every rule quoted in
tests/data/trtllm_0_12_build.json (config.json fields, quant_algo values, which layers get quantized, the tensors
and shapes it loads, paged context FMHA vs an INT8 KV cache) is exercised here on small synthetic checkpoints, and
our own export (nvidia-modelopt 0.47, INT4 lm_head, INT8 KV cache) must build for every device's plan."""

from __future__ import annotations

import json
import struct
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from conftest import put_trtllm_build_on_path

REPO = Path(__file__).resolve().parents[1]
DATA = json.loads((REPO / "tests" / "data" / "trtllm_0_12_build.json").read_text())
BYTES = {"F16": 2, "F32": 4, "I8": 1, "U8": 1}
EXCLUDES_WITHOUT_LM_HEAD = ["*router", "*vocab_embedding", "*position_embedding", "*block_embedding",
                            "*shared_expert_gate"]
# Keys modelopt 0.47 writes that 0.12's PretrainedConfig does not declare (set as attributes, with a warning).
# Only rotary_pct is read by 0.12 (Attention: getattr(config, 'rotary_pct', 1.0)); a new key fails
# test_our_export_builds_for_every_device_plan until someone checks what 0.12 does with it.
HARMLESS_IMPLICIT_KEYS = {"producer", "bias", "rotary_pct", "rank", "decoder", "rmsnorm", "lm_head_bias"}


def tiny_config(**changes: Any) -> dict[str, Any]:
    """A 2-layer Llama the way modelopt 0.47 exports an INT4-AWQ checkpoint (group 64, FP16 lm_head)."""
    config = {"architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_size": 32, "intermediate_size": 256,
              "vocab_size": 256, "max_position_embeddings": 2048, "position_embedding_type": "rope_gpt_neox",
              "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
              "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                               "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}}
    config.update(changes)
    return config


def awq_tensors(config: dict[str, Any], lm_head: str = "fp16") -> dict[str, tuple[str, list[int]]]:
    """The tensors (dtype, shape) modelopt 0.47 writes: packed INT4 as int8 [out/2, in], fp32 scales [out, in/group],
    fp16 pre-quant scales [in]; the lm_head FP16 or quantized the same way."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * config["head_size"]
    group = config["quantization"]["group_size"]
    tensors = {"transformer.vocab_embedding.weight": ("F16", [vocab, h]), "transformer.ln_f.weight": ("F16", [h])}

    def awq(name: str, n_in: int, n_out: int) -> None:
        tensors[f"{name}.weight"] = ("I8", [n_out // 2, n_in])
        tensors[f"{name}.weights_scaling_factor"] = ("F32", [n_out, n_in // group])
        tensors[f"{name}.prequant_scaling_factor"] = ("F16", [n_in])

    for i in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{i}"
        tensors[f"{p}.input_layernorm.weight"] = tensors[f"{p}.post_layernorm.weight"] = ("F16", [h])
        awq(f"{p}.attention.qkv", h, qkv)
        awq(f"{p}.attention.dense", config["num_attention_heads"] * config["head_size"], h)
        awq(f"{p}.mlp.fc", h, inter)
        awq(f"{p}.mlp.gate", h, inter)
        awq(f"{p}.mlp.proj", inter, h)
        if config["quantization"].get("kv_cache_quant_algo"):
            tensors[f"{p}.attention.kv_cache_scaling_factor"] = ("F32", [1])
    if lm_head == "int4":
        awq("lm_head", h, vocab)
    else:
        tensors["lm_head.weight"] = ("F16", [vocab, h])
    return tensors


def write_checkpoint(folder: Path, config: dict[str, Any], tensors: dict[str, tuple[str, list[int]]] | None) -> Path:
    """config.json, and rank0.safetensors with zero data (the stand-in reads the tensor table only)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            size = BYTES[dtype]
            for dim in shape:
                size *= dim
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        table = json.dumps(header).encode()
        (folder / "rank0.safetensors").write_bytes(struct.pack("<Q", len(table)) + table + bytes(offset))
    return folder


def build(standin: types.SimpleNamespace, ckpt: Path, *flags: str) -> dict[str, Any]:
    out = ckpt.parent / (ckpt.name + "-engine")
    standin.build.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(out), "--max_batch_size", "1",
                        "--max_seq_len", "1024", "--max_num_tokens", "256", *flags])
    return json.loads((out / "config.json").read_text())


def test_quant_config_fields(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    every_field = {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64, "smoothquant_val": None,
                   "clamp_val": None, "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    config = tiny_config(quantization=every_field)
    assert build(standin, write_checkpoint(tmp_path / "ok", config, awq_tensors(config)))["_standin"][
        "weights_checked"]
    for key in ("quantized_layers", "producer"):  # what modelopt writes for mixed formats; a made-up one
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{key}'"):
            build(standin, write_checkpoint(tmp_path / key, tiny_config(quantization={**every_field, key: {}}), None))


def test_quant_algo_values(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for algo in ("W4A16", "W8A16", "FP8", "W8A8_SQ_PER_CHANNEL", None):  # 0.12 knows these (no weights given)
        build(standin, write_checkpoint(tmp_path / str(algo), tiny_config(quantization={"quant_algo": algo}), None))
    for algo in ("MIXED_PRECISION", "NVFP4", "W8A16_GPTQ", "INT8"):  # later, or a KV cache algorithm only
        with pytest.raises(AssertionError):
            build(standin, write_checkpoint(tmp_path / algo, tiny_config(quantization={"quant_algo": algo}), None))
    with pytest.raises(AssertionError):
        build(standin, write_checkpoint(tmp_path / "kv", tiny_config(
            quantization={"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "NVFP4"}), None))


def test_pretrained_implicit(standin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    engine = build(standin, write_checkpoint(tmp_path / "a", tiny_config(producer={"name": "modelopt"}), None))
    assert engine["_standin"]["implicit_pretrained_config"] == ["producer"]
    assert "Implicitly setting LLaMAConfig.producer = {'name': 'modelopt'}" in capsys.readouterr().out
    for prop in ("kv_dtype", "quant_mode"):  # read-only properties of PretrainedConfig
        with pytest.raises(AttributeError, match=prop):
            build(standin, write_checkpoint(tmp_path / prop, tiny_config(**{prop: "int8"}), None))


def test_llama_fields(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config(rotary_base=500000.0, rotary_scaling={"type": "llama3", "factor": 32.0}, residual_mlp=False,
                         mlp_bias=False, attn_bias=False, disable_weight_only_quant_plugin=False)
    engine = build(standin, write_checkpoint(tmp_path / "c", config, None))
    assert engine["_standin"]["implicit_pretrained_config"] == []


def test_mapping_fields(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="unexpected keyword argument 'attn_tp_size'"):  # a later Mapping field
        build(standin, write_checkpoint(tmp_path / "a", tiny_config(mapping={"world_size": 1, "attn_tp_size": 1}),
                                        None))
    with pytest.raises(ValueError, match="world_size must equal to pp_size"):
        build(standin, write_checkpoint(tmp_path / "b", tiny_config(mapping={"world_size": 2, "tp_size": 1}), None))


def test_position_embedding_type(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="Unsupported position embedding type: rope_yarn"):
        build(standin, write_checkpoint(tmp_path / "a", tiny_config(position_embedding_type="rope_yarn"), None))


def test_rotary_scaling_type(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    llama3 = {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    build(standin, write_checkpoint(tmp_path / "ok", tiny_config(rotary_scaling=llama3), None))
    for scaling in ({"type": "wavelen"}, {"rope_type": "yarn", "factor": 4.0}):
        with pytest.raises(ValueError, match="Unsupported rotary scaling type"):
            build(standin, write_checkpoint(tmp_path / str(len(scaling)), tiny_config(rotary_scaling=scaling), None))


def test_moe_fields(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TypeError, match="MoeConfig.__init__.. got an unexpected keyword argument 'shared_expert'"):
        build(standin, write_checkpoint(tmp_path / "a", tiny_config(
            moe={"num_experts": 0, "top_k": 0, "shared_expert": 0}), None))


def test_exclude_modules_default(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An INT4 lm_head loads only with an exclude list that does not match it: an empty one (what modelopt 0.47
    writes when every layer is quantized) means 0.12's defaults, which exclude '*lm_head'."""
    for excludes in ([], None):
        config = tiny_config()
        config["quantization"]["exclude_modules"] = excludes
        with pytest.raises(RuntimeError, match="for parameter 'lm_head.weight'"):
            build(standin, write_checkpoint(tmp_path / str(excludes), config, awq_tensors(config, "int4")))
    config = tiny_config()
    config["quantization"]["exclude_modules"] = EXCLUDES_WITHOUT_LM_HEAD
    assert build(standin, write_checkpoint(tmp_path / "ok", config, awq_tensors(config, "int4")))["_standin"][
        "weights_checked"]


def test_groupwise_shapes(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    tensors = awq_tensors(config)
    del tensors["transformer.layers.1.mlp.proj.weights_scaling_factor"]
    with pytest.raises(RuntimeError, match="Required but not provided tensors:.*mlp.proj.weights_scaling_factor"):
        build(standin, write_checkpoint(tmp_path / "missing", config, tensors))
    wrong_group = tiny_config()
    wrong_group["quantization"]["group_size"] = 32  # the scales were made for groups of 64
    with pytest.raises(RuntimeError, match=r"original: \(4, 256\)' for parameter 'transformer.layers.0.attention.qkv"):
        build(standin, write_checkpoint(tmp_path / "group", wrong_group, awq_tensors(config)))


def test_preprocess_int8_only(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    tensors = awq_tensors(config)
    tensors["transformer.layers.0.mlp.fc.weight"] = ("U8", tensors["transformer.layers.0.mlp.fc.weight"][1])
    with pytest.raises(RuntimeError, match="for parameter 'transformer.layers.0.mlp.fc.weight'"):
        build(standin, write_checkpoint(tmp_path / "u8", config, tensors))


def test_kv_cache_scaling_factor(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    config["quantization"]["kv_cache_quant_algo"] = "INT8"
    with pytest.raises(RuntimeError, match="Required but not provided tensors:.*kv_cache_scaling_factor"):
        build(standin, write_checkpoint(tmp_path / "a", config, awq_tensors(tiny_config())),
              "--use_paged_context_fmha", "disable")
    build(standin, write_checkpoint(tmp_path / "b", config, awq_tensors(config)), "--use_paged_context_fmha", "disable")


def test_weights_required(standin, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    tensors = awq_tensors(config)
    tensors["transformer.extra.weight"] = ("F16", [4])  # extra: a warning only
    assert build(standin, write_checkpoint(tmp_path / "a", config, tensors))["_standin"]["weights_checked"]
    assert "Provided but not expected tensors: {'transformer.extra.weight'}" in capsys.readouterr().out
    del tensors["lm_head.weight"]
    with pytest.raises(RuntimeError, match="Required but not provided tensors:{'lm_head.weight'}"):
        build(standin, write_checkpoint(tmp_path / "b", config, tensors))


def test_paged_context_int8(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tiny_config()
    config["quantization"]["kv_cache_quant_algo"] = "INT8"
    ckpt = write_checkpoint(tmp_path / "a", config, awq_tensors(config))
    with pytest.raises(RuntimeError, match="Paged Context FMHA doesn't work with int8 kv cache currently."):
        build(standin, ckpt, "--use_paged_context_fmha", "enable")
    plugin = build(standin, ckpt, "--use_paged_context_fmha", "disable")["build_config"]["plugin_config"]
    assert plugin["use_paged_context_fmha"] is False and plugin["context_fmha"] is True


@pytest.fixture(scope="module")
def our_export(tmp_path_factory: pytest.TempPathFactory) -> Path:  # type: ignore[no-untyped-def]
    """`edge-llama quantize --lm-head int4 --kv-int8` of the test model (quick calibration settings)."""
    pytest.importorskip("torch", reason="quantization needs torch (make test installs torch==2.13.0)")
    pytest.importorskip("modelopt", reason="quantization needs nvidia-modelopt==0.47.0")
    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    from edge_llama.pipeline.quantize import QuantizeOptions, quantize

    out = tmp_path_factory.mktemp("export") / "smollm2-awq"
    quantize(QuantizeOptions(model=make(DEFAULT_OUT), out=out, block_size=64, calib_size=2, calib_seq_len=64,
                             alpha_step=0.5, clip=False, kv_int8=True, lm_head="int4"))
    return out


def test_our_export_builds_for_every_device_plan(our_export: Path, standin, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """modelopt 0.47's checkpoint, as our export leaves it, passes every 0.12 loading rule above with its real
    tensor table, through `edge-llama build` with each device's plan; with modelopt's own exclude_modules ([])
    0.12 would build an FP16 lm_head and fail to load the INT4 one."""
    from edge_llama.pipeline.build import build as edge_build
    from edge_llama.pipeline.plan import PlanOptions, devices, plan

    config = json.loads((our_export / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "INT8", "group_size": 64,
                                      "has_zero_point": False, "pre_quant_scale": True,
                                      "exclude_modules": EXCLUDES_WITHOUT_LM_HEAD}
    assert not (our_export / "quant_cfg.json").exists()
    monkeypatch.setenv("PATH", put_trtllm_build_on_path(tmp_path / "bin")["PATH"])
    for key, device in devices().items():
        if not device.trtllm_0_12:
            continue
        p = plan(PlanOptions(device=key, model=str(our_export), group_size=64, kv_dtype="int8", lm_head="int4",
                             max_seq_len=2048))
        (tmp_path / f"{key}.json").write_text(json.dumps(p))
        edge_build(our_export, tmp_path / f"{key}.json", tmp_path / key)
        engine = json.loads((tmp_path / key / "config.json").read_text())
        assert engine["_standin"]["weights_checked"], key
        assert set(engine["_standin"]["implicit_pretrained_config"]) <= HARMLESS_IMPLICIT_KEYS
        assert engine["pretrained_config"]["rotary_pct"] == 1.0
        assert engine["build_config"]["plugin_config"]["use_paged_context_fmha"] is False

    raw = tmp_path / "modelopt-raw"
    raw.mkdir()
    (raw / "rank0.safetensors").symlink_to(our_export / "rank0.safetensors")
    (raw / "config.json").write_text(json.dumps({**config, "quantization": {**config["quantization"],
                                                                            "exclude_modules": []}}))
    with pytest.raises(RuntimeError, match="for parameter 'lm_head.weight'"):
        build(standin, raw, "--use_paged_context_fmha", "disable")


CHECKS = {"weights_required": test_weights_required, "quant_config_fields": test_quant_config_fields,
          "quant_algo_values": test_quant_algo_values, "pretrained_implicit": test_pretrained_implicit,
          "llama_fields": test_llama_fields, "mapping_fields": test_mapping_fields,
          "position_embedding_type": test_position_embedding_type, "rotary_scaling_type": test_rotary_scaling_type,
          "moe_fields": test_moe_fields, "exclude_modules_default": test_exclude_modules_default,
          "groupwise_shapes": test_groupwise_shapes, "preprocess_int8_only": test_preprocess_int8_only,
          "kv_cache_scaling_factor": test_kv_cache_scaling_factor, "paged_context_int8": test_paged_context_int8,
          "our_export": test_our_export_builds_for_every_device_plan}


def test_every_quoted_rule_has_a_check_and_a_source() -> None:
    assert {e["check"] for e in DATA["entries"] if "check" in e} == set(CHECKS)
    for entry in DATA["entries"]:
        assert entry["path"] and entry["commit"] and entry["quote"] and entry["status"], entry["what"]
        assert entry["lines"] is None or entry["lines"][0] <= entry["lines"][1], entry["what"]
    assert DATA["not_found"]
