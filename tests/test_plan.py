"""`edge-llama plan`: the numbers for Llama-3.2-1B on an Orin Nano 8GB match the hand arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_trtllm_checkpoint

from edge_llama.errors import ConfigError
from edge_llama.pipeline.plan import PlanOptions, devices, plan


def test_llama_1b_on_orin_nano_matches_hand_arithmetic() -> None:
    p = plan(PlanOptions(device="orin-nano-8gb"))
    # KV: 16 layers x 2 (K, V) x 8 KV heads x 64 x 2 bytes = 32 KiB per token.
    assert p["kv_bytes_per_token"] == 16 * 2 * 8 * 64 * 2 == 32 * 1024
    # Read per decoded token: ~0.50 GB of INT4 layers (+ scales) + 0.53 GB FP16 lm_head = ~1.03 GB.
    assert 1.02e9 < p["bytes_read_per_token"] < 1.04e9
    lm_head = 128256 * 2048 * 2
    assert lm_head / p["bytes_read_per_token"] == pytest.approx(0.51, abs=0.01)  # half of it is lm_head
    # 68 GB/s / 1.03 GB = ~66 tokens/s.
    assert p["decode_ceiling_tok_s"] == pytest.approx(66, abs=1)
    # A small, explicit KV budget: one sequence of 4096 tokens = 128 MiB, far below what would fit.
    assert p["kv_tokens"] == 4096 and p["runtime"] == {"engine.kv_tokens": 4096}
    assert p["resident_bytes"] < 2.2 * 1024**3 and p["headroom_bytes"] > 3 * 1024**3
    flags = p["trtllm_build_flags"]
    for flag, value in [("--max_batch_size", "1"), ("--max_num_tokens", "512"), ("--paged_kv_cache", "enable"),
                        ("--remove_input_padding", "enable"), ("--context_fmha", "enable"),
                        ("--multiple_profiles", "disable"), ("--gemm_plugin", "auto")]:
        assert flags[flags.index(flag) + 1] == value
    names = [s["name"] for s in p["derivation"]]
    assert {"INT4 weights", "lm_head (FP16)", "KV per token", "activations", "decode ceiling"} <= set(names)


def test_every_device_profile_plans_and_ceilings_follow_bandwidth() -> None:
    ceilings = {key: plan(PlanOptions(device=key))["decode_ceiling_tok_s"] for key in devices()}
    assert ceilings["orin-nano-super"] == pytest.approx(99, abs=1)
    assert ceilings["agx-orin-64gb"] == pytest.approx(199, abs=1)
    assert plan(PlanOptions(device="thor"))["warnings"]  # not a TRT-LLM 0.12 device


def test_int8_kv_halves_kv_and_budget_limits_apply() -> None:
    assert plan(PlanOptions(device="orin-nano-8gb", kv_dtype="int8"))["kv_bytes_per_token"] == 16 * 1024
    tight = plan(PlanOptions(device="orin-nano-8gb", memory_budget_gib=2.05, max_seq_len=8192))
    assert tight["kv_tokens"] < 8192 and tight["kv_tokens"] % 64 == 0 and tight["headroom_bytes"] >= 0
    with pytest.raises(ConfigError, match="does not fit"):
        plan(PlanOptions(device="orin-nano-8gb", memory_budget_gib=1.0))
    with pytest.raises(ConfigError, match="unknown device 'orin-tiny'"):
        plan(PlanOptions(device="orin-tiny"))
    with pytest.raises(ConfigError, match="does not divide the layer width"):
        plan(PlanOptions(device="orin-nano-8gb", group_size=96))


def test_plan_cli_prints_derivations_and_json() -> None:
    text = subprocess.run([sys.executable, "-m", "edge_llama", "plan", "--device", "orin-nano-8gb"],
                          capture_output=True, text=True, timeout=30)
    assert text.returncode == 0
    assert "32768 B   16 layers x 2 (K,V) x 8 kv heads x 64 x 2 B" in text.stdout
    assert "decode ceiling:       66.2 tok/s" in text.stdout
    as_json = subprocess.run([sys.executable, "-m", "edge_llama", "plan", "--device", "orin-nx-16gb", "--json"],
                             capture_output=True, text=True, timeout=30)
    assert json.loads(as_json.stdout)["device"]["key"] == "orin-nx-16gb"


def test_each_profile_gets_a_backend_with_commands_and_a_config_that_loads() -> None:
    from edge_llama.config import from_dict

    for key, device in devices().items():
        p = plan(PlanOptions(device=key))
        backend = p["backend"]
        tree: dict = {}
        for dotted, value in backend["config"].items():
            section, leaf = dotted.split(".")
            tree.setdefault(section, {})[leaf] = value
        assert from_dict(tree).engine.backend == backend["name"]
        assert backend["config"]["engine.kv_tokens"] == p["kv_tokens"]
        if device.trtllm_0_12:  # every Orin on JetPack 6: the TensorRT-LLM engine, built on the device
            assert backend["name"] == "trtllm" and device.cuda_arch == 87
            assert backend["commands"][0].startswith("sudo deploy/install.sh --trtllm-wheel")
            assert any(c.startswith("edge-llama build") for c in backend["commands"])
        else:  # Thor on JetPack 7: llama.cpp built with CUDA for sm_110 (CUDA 13 numbering)
            assert backend["name"] == "llamacpp"
            assert backend["commands"][0].startswith("sudo deploy/install.sh --llamacpp --cuda-arch 110")
            assert backend["config"]["engine.model"].endswith(".gguf")


def test_mapped_engine_file_is_not_counted_as_resident() -> None:
    p = plan(PlanOptions(device="orin-nano-8gb"))
    value = {s["name"]: s["value"] for s in p["derivation"]}
    assert p["engine_file_bytes"] == int(value["weights total"])
    assert p["resident_bytes"] == int(value["weights total"] + value["activations"] + value["runtime overhead"]
                                      + p["kv_tokens"] * p["kv_bytes_per_token"])


def test_int8_kv_plan_builds_and_still_takes_prompts_longer_than_the_default_step(standin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """TensorRT-LLM 0.12's build() refuses paged context FMHA with an INT8 KV cache (builder.py, ported into the
    stand-in): the INT8 plan turns it off, and as the runtime then has no chunked context, one engine step must hold
    a whole prompt: max_num_tokens = max_seq_len. The plan says what that costs."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "quantization": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": "INT8", "group_size": 128}}))
    for key, device in devices().items():
        if not device.trtllm_0_12:
            continue
        p = plan(PlanOptions(device=key, kv_dtype="int8"))
        flag = dict(zip(p["trtllm_build_flags"][::2], p["trtllm_build_flags"][1::2], strict=True))
        assert flag["--use_paged_context_fmha"] == "disable"
        assert int(flag["--max_num_tokens"]) == int(flag["--max_seq_len"]) > int(flag["--max_input_len"]) > 512
        standin.build.main(["--checkpoint_dir", str(ckpt), "--output_dir", str(tmp_path / key),
                            *p["trtllm_build_flags"]])
        built = json.loads((tmp_path / key / "config.json").read_text())["build_config"]
        assert built["max_num_tokens"] >= built["max_input_len"]
        assert not built["plugin_config"]["use_paged_context_fmha"]
        warning = next(w for w in p["warnings"] if w.startswith("INT8 KV cache"))
        assert "you lose chunked context and KV block reuse" in warning
    # Llama-3.2-1B, 4096 tokens: the INT8 cache saves 64 MiB, the whole-prompt step costs ~245 MiB more activations.
    fp16, int8 = plan(PlanOptions(device="orin-nano-8gb")), plan(PlanOptions(device="orin-nano-8gb", kv_dtype="int8"))
    assert int8["resident_bytes"] > fp16["resident_bytes"]
    assert "a net loss of memory here" in " ".join(int8["warnings"])
    assert dict(zip(fp16["trtllm_build_flags"][::2], fp16["trtllm_build_flags"][1::2], strict=True))[
        "--use_paged_context_fmha"] == "enable"
    with pytest.raises(ConfigError, match="--max-draft-len needs KV block reuse"):  # draft tokens need reuse
        plan(PlanOptions(device="orin-nano-8gb", kv_dtype="int8", max_draft_len=4))


def test_lm_head_choices_bytes_and_ceilings_per_device() -> None:
    """Not verified on hardware: bandwidth / bytes read per decoded token, for each lm_head precision."""
    p = plan(PlanOptions(device="orin-nano-8gb"))
    head = p["by_lm_head"]
    lm_head_fp16 = 128256 * 2048 * 2
    int4_head = 128256 * 2048 // 2 + 128256 * 2048 // 128 * 2 + 2048 * 2
    assert head["fp16"]["bytes_read_per_token"] == p["bytes_read_per_token"]
    assert head["fp16"]["bytes_read_per_token"] - head["int4"]["bytes_read_per_token"] == lm_head_fp16 - int4_head
    assert head["fp16"]["bytes_read_per_token"] - head["int8"]["bytes_read_per_token"] == \
        lm_head_fp16 - (128256 * 2048 + 128256 * 2)
    # 68 GB/s: FP16 head 66 tok/s, INT8 head 89, INT4 head 107 (the INT4 head reads 0.13 GB instead of 0.53 GB).
    assert [round(head[k]["decode_ceiling_tok_s"]) for k in ("fp16", "int8", "int4")] == [66, 89, 107]
    assert not head["int8"]["loads_in_trtllm_0_12"] and head["int4"]["loads_in_trtllm_0_12"]
    int4 = plan(PlanOptions(device="orin-nano-8gb", lm_head="int4"))
    assert int4["decode_ceiling_tok_s"] == head["int4"]["decode_ceiling_tok_s"]
    assert p["resident_bytes"] - int4["resident_bytes"] == lm_head_fp16 - int4_head
    assert any(c.endswith("--lm-head int4 --json > plan.json") for c in int4["backend"]["commands"])
    for key in devices():  # every profile gets the table, and faster heads are faster everywhere
        c = plan(PlanOptions(device=key))["by_lm_head"]
        assert c["fp16"]["decode_ceiling_tok_s"] < c["int8"]["decode_ceiling_tok_s"] < c["int4"]["decode_ceiling_tok_s"]
    with pytest.raises(ConfigError, match="--lm-head int8: TensorRT-LLM 0.12 cannot load an INT8 lm_head"):
        plan(PlanOptions(device="orin-nano-8gb", lm_head="int8"))
    text = subprocess.run([sys.executable, "-m", "edge_llama", "plan", "--device", "orin-nano-8gb"],
                          capture_output=True, text=True, timeout=30).stdout
    assert "  int4  0.638 GB/token   106.6 tok/s" in text and "TensorRT-LLM 0.12 cannot load it" in text


def test_build_refuses_a_plan_made_for_another_lm_head_or_kv_cache(tmp_path: Path) -> None:
    from edge_llama.pipeline.build import build

    checkpoint = make_trtllm_checkpoint(tmp_path / "ckpt")  # FP16 lm_head, FP16 KV cache
    for options, fix in ((dict(lm_head="int4"), "re-plan with --lm-head fp16"),
                         (dict(kv_dtype="int8"), "re-plan with --kv-dtype fp16")):
        plan_path = tmp_path / "plan.json"
        plan_path.write_text(json.dumps(plan(PlanOptions(device="orin-nano-8gb", **options))))
        with pytest.raises(ConfigError, match=fix):
            build(checkpoint, plan_path, tmp_path / "engine")
