"""Quantization: clear errors for bad input (fast), then the real pipeline end to end on the test model (CPU)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_llama.errors import ConfigError, ModelError
from edge_llama.pipeline.quantize import QuantizeOptions, check_block_size, read_hf_config

REPO = Path(__file__).resolve().parents[1]
SMOLLM_SHAPE = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152}


def probe_ids():  # type: ignore[no-untyped-def]
    import torch

    return torch.arange(200, 328)


def fake_checkpoint(folder: Path, config: dict, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    return folder


def test_not_a_llama_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        read_hf_config(tmp_path)
    gpt2 = fake_checkpoint(tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelError, match="is a gpt2 model, not a Llama"):
        read_hf_config(gpt2)


def test_missing_tokenizer(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "m", SMOLLM_SHAPE, tokenizer=False)
    with pytest.raises(ModelError, match="has no tokenizer"):
        read_hf_config(folder)


def test_block_size_must_divide_widths_and_names_the_width() -> None:
    with pytest.raises(ConfigError, match=r"does not divide hidden_size .* = 576; use --block-size 64"):
        check_block_size(SMOLLM_SHAPE, 128)
    check_block_size(SMOLLM_SHAPE, 64)
    llama_1b = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32}
    check_block_size(llama_1b, 128)


def test_cli_quantize_error_is_one_line(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "m", SMOLLM_SHAPE)
    out = subprocess.run([sys.executable, "-m", "edge_llama", "quantize", "--model", str(folder), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "edge-llama: --block-size 128 does not divide hidden_size (q/k/v/gate/up input) = 576; use --block-size 64"]


def test_cli_quantize_prints_only_the_manifest_path(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    out = subprocess.run([sys.executable, "-m", "edge_llama", "quantize", "--model", str(make(DEFAULT_OUT)),
                          "--out", str(tmp_path / "q"), "--block-size", "64", "--calib-size", "2",
                          "--calib-seq-len", "64", "--alpha-step", "0.5", "--no-clip"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"{tmp_path / 'q' / 'manifest.json'}\n"  # progress and modelopt's prints go to stderr
    assert "calibration" in out.stderr and "Warning" not in out.stderr
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["quantization"]["method"] == "awq_lite (alpha step 0.5) with one scale per fused group"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch", reason="quantization needs torch (make test installs torch==2.13.0)")
    pytest.importorskip("modelopt", reason="quantization needs nvidia-modelopt==0.47.0")
    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    from edge_llama.pipeline.quantize import calibrate, export

    model_dir = make(DEFAULT_OUT)
    opts = QuantizeOptions(model=model_dir, out=tmp_path_factory.mktemp("q") / "ckpt", block_size=64,
                           calib_size=4, calib_seq_len=128, alpha_step=0.1)
    calibrated = calibrate(opts)
    with torch.no_grad():  # the in-memory quantized model, before the export touches it
        logits = calibrated.model(probe_ids().unsqueeze(0)).logits[0]
    export(calibrated, opts)
    return opts, logits


def test_export_is_a_self_describing_trtllm_checkpoint(exported, standin) -> None:  # type: ignore[no-untyped-def]
    from edge_llama.manifest import verify_manifest

    opts, _ = exported
    manifest = verify_manifest(opts.out, kind="trtllm-checkpoint", backend="trtllm")
    assert manifest["quantization"] == {
        "algo": "W4A16_AWQ", "group_size": 64, "kv_cache": "fp16", "lm_head": "fp16",
        "method": "awq_lite (alpha step 0.1) with one scale per fused group + clip search"}
    assert manifest["tools"]["nvidia-modelopt"] == "0.47.0"
    assert {"config.json", "rank0.safetensors", "tokenizer.json"} <= set(manifest["files"])
    config = json.loads((opts.out / "config.json").read_text())
    # transformers 5 + modelopt drop rotary_base; SmolLM2's is 1e5, not TRT-LLM's default 1e4.
    assert config["rotary_base"] == 100000.0
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ" and config["quantization"]["group_size"] == 64
    assert config["quantization"]["exclude_modules"] == ["lm_head"]
    # TensorRT-LLM 0.12's loader (the stand-in trtllm-build) takes its config and every tensor.
    engine = opts.out.parent / "engine"
    standin.build.main(["--checkpoint_dir", str(opts.out), "--output_dir", str(engine), "--max_seq_len", "2048"])
    assert json.loads((engine / "config.json").read_text())["_standin"]["weights_checked"]


def test_rope_scaling_is_carried_into_the_export(tmp_path: Path) -> None:
    from edge_llama.pipeline.quantize import patch_exported_config

    (tmp_path / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM",
                                                      "quantization": {"quant_algo": "W4A16_AWQ"}}))
    llama32 = {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192}}
    config = patch_exported_config(tmp_path, llama32)
    assert config["rotary_base"] == 500000.0
    assert config["rotary_scaling"] == {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_the_export_must_be_one_w4a16_awq_format(tmp_path: Path) -> None:
    """What TensorRT-LLM 0.12 cannot read is refused: modelopt 0.47 writes MIXED_PRECISION (+ quant_cfg.json) when
    layers differ in format, and 0.12 knows one quant_algo per checkpoint. With an INT4 lm_head the exclude list
    must not be empty (0.12 reads [] as its defaults, which exclude lm_head)."""
    from edge_llama.pipeline.quantize import patch_exported_config

    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"quant_algo": "MIXED_PRECISION"}}))
    with pytest.raises(ModelError, match="exporter wrote quant_algo 'MIXED_PRECISION'.*one W4A16_AWQ format"):
        patch_exported_config(tmp_path, {}, "int4")
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"quant_algo": "W4A16_AWQ",
                                                                       "exclude_modules": []}}))
    excludes = patch_exported_config(tmp_path, {}, "int4")["quantization"]["exclude_modules"]
    assert excludes and not any(fnmatch.fnmatchcase("lm_head", e) for e in excludes)
    assert any(fnmatch.fnmatchcase("transformer.vocab_embedding", e) for e in excludes)
    (tmp_path / "quant_cfg.json").write_text("{}")
    with pytest.raises(ModelError, match="with quant_cfg.json"):
        patch_exported_config(tmp_path, {}, "int4")


def test_cli_lm_head_int8_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = fake_checkpoint(tmp_path / "m", SMOLLM_SHAPE)
    out = subprocess.run([sys.executable, "-m", "edge_llama", "quantize", "--model", str(folder), "--out",
                          str(tmp_path / "o"), "--block-size", "64", "--lm-head", "int8"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "TensorRT-LLM 0.12 cannot load an INT8 lm_head" in out.stderr and "MIXED_PRECISION" in out.stderr
    assert not (tmp_path / "o").exists()


def test_int4_unpacking_inverts_modelopts_packing() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    from edge_llama.pipeline.awq_reference import unpack_int4

    torch.manual_seed(0)
    weight = torch.randn(8, 128)
    scale = weight.reshape(8, -1, 64).abs().amax(-1) / 7  # [out, in/group]
    packed = pack_int4_in_uint8(weight, scale, 64).view(torch.int8)
    expected = (weight / scale.repeat_interleave(64, 1)).round().clamp(-8, 7).to(torch.int8)
    assert packed.shape == (4, 128)
    assert torch.equal(unpack_int4(packed), expected)


def test_reference_forward_reproduces_the_exported_model(exported) -> None:  # type: ignore[no-untyped-def]
    """Our torch forward pass over rank0.safetensors == transformers' Llama loaded with the same dequantized
    weights == modelopt's in-memory quantized model, up to the fp16 the checkpoint stores: the export re-rounds
    nothing, because q/k/v and gate/up were calibrated with the one shared pre-quant scale TRT-LLM's fused
    layers need."""
    import torch
    from transformers import AutoModelForCausalLM

    from edge_llama.pipeline.awq_reference import ReferenceLlama, hf_state_dict

    opts, quantized = exported
    reference = ReferenceLlama(opts.out)
    hf = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32, tie_word_embeddings=False).eval()
    result = hf.load_state_dict(hf_state_dict(reference), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "rotary" not in k]
    with torch.no_grad():
        ours, theirs = reference.forward(probe_ids()), hf(probe_ids().unsqueeze(0)).logits[0]
    assert (ours - theirs).abs().max() < 1e-3
    assert (ours - quantized).abs().max() < 0.1  # logits up to ~30; measured 0.03
    assert (ours.argmax(-1) == quantized.argmax(-1)).float().mean() > 0.98


def test_fused_groups_compute_what_the_separate_projections_did() -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from edge_llama.pipeline.awq_fused import fuse_shared_inputs

    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    model = AutoModelForCausalLM.from_pretrained(make(DEFAULT_OUT), dtype=torch.float32).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        before = model(probe_ids().unsqueeze(0)).logits[0]
        fuse_shared_inputs(model)
        after = model(probe_ids().unsqueeze(0)).logits[0]
    attention = model.model.layers[0].self_attn
    assert attention.qkv_fused.out_features == 576 + 192 + 192 and not list(attention.q_proj.parameters())
    assert sum(p.numel() for p in model.parameters()) == params
    assert torch.allclose(before, after, atol=1e-4)


def test_clip_search_picks_the_amax_with_the_least_output_error() -> None:
    """Against brute force: every candidate amax of every (row, group), its error measured on the outputs."""
    torch = pytest.importorskip("torch")
    from edge_llama.pipeline.awq_fused import CLIP_RATIOS, search_clip

    torch.manual_seed(0)
    weight = torch.randn(6, 128)
    weight[:, 3] *= 8  # an outlier per row: clipping it is worth it in group 0
    x = torch.randn(300, 128) * torch.linspace(0.2, 3.0, 128)
    groups = x.double().reshape(300, 2, 64).transpose(0, 1)
    amax, gain = search_clip(weight, groups.transpose(1, 2) @ groups, 64)

    full = weight.reshape(6, 2, 64).abs().amax(-1)

    def output_error(w, xg, amax):  # type: ignore[no-untyped-def]
        scale = amax / 7
        return float(((xg @ (w - (w / scale).round().clamp(-8, 7) * scale)) ** 2).sum())

    for row in range(6):
        for g in range(2):
            w, xg = weight[row, g * 64:(g + 1) * 64], x[:, g * 64:(g + 1) * 64]
            best = min(output_error(w, xg, full[row, g] * ratio) for ratio in CLIP_RATIOS)
            assert output_error(w, xg, amax[row, g]) <= best * (1 + 1e-4)
    assert (amax[:, 0] < full[:, 0]).all() and 0.05 < gain < 1


def test_llama32_shapes_block_128_and_llama3_rope_scaling(tmp_path: Path) -> None:
    """A 2-layer model with Llama-3.2-1B's structure (head_dim 64, 4:1 GQA, tied embeddings, llama3 rope scaling)
    and random weights, quantized at group 128: the export carries the rope scaling, and the reference reads it
    back exactly (without the scaling it would be off by 1e-2 at 512 positions)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_llama.pipeline.awq_reference import ReferenceLlama, hf_state_dict
    from edge_llama.pipeline.quantize import calibrate, export

    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    tokenizer_dir = make(DEFAULT_OUT)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=131072,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, rope_parameters=rope)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny-llama3"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, model_dir / name)

    opts = QuantizeOptions(model=model_dir, out=tmp_path / "ckpt", block_size=128, calib_size=2, calib_seq_len=64,
                           alpha_step=0.25)
    calibrated = calibrate(opts)
    ids = torch.arange(100, 612)
    with torch.no_grad():
        quantized = calibrated.model(ids.unsqueeze(0)).logits[0]
    export(calibrated, opts)
    exported = json.loads((opts.out / "config.json").read_text())
    assert exported["rotary_base"] == 500000.0 and exported["rotary_scaling"]["type"] == "llama3"
    assert exported["quantization"]["group_size"] == 128 and exported["num_key_value_heads"] == 1

    reference = ReferenceLlama(opts.out)
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, tie_word_embeddings=False).eval()
    hf.load_state_dict(hf_state_dict(reference), strict=False)
    with torch.no_grad():
        ours, theirs = reference.forward(ids), hf(ids.unsqueeze(0)).logits[0]
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - quantized).abs().max() < 0.01 * quantized.abs().max()


def test_int8_kv_cache_export(tmp_path: Path) -> None:
    """--kv-int8: one scale per layer for K and V in the checkpoint (TensorRT-LLM 0.12's kv_cache_scaling_factor:
    value = int8 x scale; K after RoPE; the exporter takes the larger of modelopt's K and V ranges). The reference
    applies it and tracks modelopt's in-memory model quantizing K and V with that shared range."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    from edge_llama.pipeline.awq_reference import ReferenceLlama
    from edge_llama.pipeline.quantize import calibrate, export

    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    opts = QuantizeOptions(model=make(DEFAULT_OUT), out=tmp_path / "ckpt", block_size=64, calib_size=2,
                           calib_seq_len=128, alpha_step=0.25, kv_int8=True)
    calibrated = calibrate(opts)
    with torch.no_grad():
        for name, attention in calibrated.model.named_modules():
            if name.endswith("self_attn"):
                k, v = attention.k_bmm_quantizer, attention.v_bmm_quantizer
                k.amax = v.amax = torch.maximum(k.amax, v.amax)
        shared = calibrated.model(probe_ids().unsqueeze(0)).logits[0]
    manifest = json.loads(export(calibrated, opts).read_text())
    assert manifest["quantization"]["kv_cache"] == "int8"
    config = json.loads((opts.out / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "INT8"
    reference = ReferenceLlama(opts.out)
    names = [f"transformer.layers.{i}.attention.kv_cache_scaling_factor" for i in range(30)]
    assert all(reference.tensors[n].shape == (1,) and 0 < float(reference.tensors[n]) < 1 for n in names)
    with torch.no_grad():
        ours = reference.forward(probe_ids())
        for name in names:
            del reference.tensors[name]
        without_int8_kv = reference.forward(probe_ids())
    assert (ours - without_int8_kv).abs().max() > 0.1  # the INT8 KV cache is applied ...
    assert (ours.argmax(-1) == shared.argmax(-1)).float().mean() > 0.9  # ... as modelopt computes it (0.97)


def test_int4_lm_head_export_reproduces_the_quantized_model(tmp_path: Path) -> None:
    """--lm-head int4: lm_head gets AWQ like the other layers (its own pre-quant scale and clip search), stored as
    INT4 with an exclude list under which TensorRT-LLM 0.12 quantizes it; the tied embedding table stays as it was,
    and the reference forward pass over the file tracks modelopt's in-memory model, head included."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("modelopt")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from edge_llama.pipeline.awq_reference import ReferenceLlama
    from edge_llama.pipeline.quantize import calibrate, export

    sys.path.insert(0, str(REPO / "tools"))
    from make_test_checkpoint import DEFAULT_OUT, make

    opts = QuantizeOptions(model=make(DEFAULT_OUT), out=tmp_path / "ckpt", block_size=64, calib_size=4,
                           calib_seq_len=128, alpha_step=0.25, lm_head="int4")
    calibrated = calibrate(opts)
    head = calibrated.model.get_output_embeddings()
    with torch.no_grad():
        quantized = calibrated.model(probe_ids().unsqueeze(0)).logits[0]
        head_weight = head.weight_quantizer(head.weight).float()  # what modelopt computes with: fake-quant INT4
    head_pre_quant = head.input_quantizer.pre_quant_scale.float()
    manifest = json.loads(export(calibrated, opts).read_text())
    assert manifest["quantization"]["lm_head"] == "int4"
    tensors = load_file(str(opts.out / "rank0.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["lm_head.weight"].shape == (49152 // 2, 576)
    assert tensors["lm_head.weights_scaling_factor"].shape == (49152, 576 // 64)
    original = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32).get_input_embeddings().weight
    assert torch.equal(tensors["transformer.vocab_embedding.weight"], original.detach().half())
    reference = ReferenceLlama(opts.out)
    stored_weight, stored_pre_quant = reference.weight("lm_head")
    assert torch.equal(stored_pre_quant, head_pre_quant)
    # modelopt's packer divides by the scale where its fake quantizer multiplies by the inverse: a code at a rounding
    # tie can land one step apart (measured: 9 of 28 M). One such code moves a logit by ~0.2.
    assert ((stored_weight - head_weight).abs() > 1e-6).float().mean() < 1e-5
    with torch.no_grad():
        ours = reference.forward(probe_ids())
    assert (ours - quantized).abs().max() < 0.02 * quantized.abs().max()  # logits up to ~30; measured 0.18
    assert (ours.argmax(-1) == quantized.argmax(-1)).float().mean() > 0.98  # measured 1.0
