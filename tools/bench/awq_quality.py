"""INT4-AWQ quality on the test model, in one run: held-out perplexity of
- ppl_fp:  the original model (fp32),
- ppl_rtn: plain round-to-nearest INT4 of the same linear layers at the same group size (no AWQ),
- ppl_awq: the exported TensorRT-LLM checkpoint, read back from rank0.safetensors by the reference forward pass,
plus how closely that reference reproduces modelopt's in-memory quantized model (max |logit difference|).
The held-out text (tools/bench/heldout.txt) shares no module with the calibration corpus.

With --lm-head int4 the checkpoint's lm_head is INT4-AWQ too, and the same checkpoint body is scored with each
lm_head choice, so the difference is the head's alone:
- fp16: the original lm_head (FP16, as the export stores an unquantized one),
- int8: that head rounded to INT8 per output row (W8A16: scale = row absmax / 127; TensorRT-LLM 0.12 cannot load
  it next to INT4-AWQ layers, see pipeline/quantize.py, so this is a figure for later runtimes),
- int4_rtn: plain round-to-nearest INT4 in groups (no AWQ),
- int4: the exported INT4-AWQ head (its own pre-quant scale and clip search).

Last line: one JSON object. Targets: ppl_awq < ppl_rtn and ppl_awq <= 1.15 x ppl_fp; with --lm-head int4 an INT8
head <= 1.005 x and the INT4 head <= 1.02 x the FP16 head.

    .venv/bin/python tools/bench/awq_quality.py [--calib-size 32 --calib-seq-len 512 --alpha-step 0.05 --no-clip]
        [--lm-head int4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tools/ for make_test_checkpoint

from make_test_checkpoint import DEFAULT_OUT, make  # noqa: E402

from edge_llama.pipeline.awq_reference import ReferenceLlama, perplexity  # noqa: E402
from edge_llama.pipeline.quantize import QuantizeOptions, calibrate, export  # noqa: E402


def rtn_int4(model, block: int):  # type: ignore[no-untyped-def]
    """A copy with every decoder linear weight rounded to symmetric INT4 per group of `block` inputs
    (scale = group absmax / 7, as modelopt's INT4 quantizer), lm_head and embeddings left as they are."""
    import torch

    rtn = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in rtn.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                w = module.weight
                groups = w.reshape(w.shape[0], -1, block)
                scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
                module.weight.copy_(((groups / scale).round().clamp(-8, 7) * scale).reshape_as(w))
    return rtn


def round_rows_int8(weight):  # type: ignore[no-untyped-def]
    """Symmetric INT8 with one scale per output row (TensorRT-LLM's weight-only INT8, W8A16)."""
    scale = weight.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    return (weight / scale).round().clamp(-128, 127) * scale


def round_groups_int4(weight, block: int):  # type: ignore[no-untyped-def]
    groups = weight.reshape(weight.shape[0], -1, block)
    scale = groups.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 7
    return ((groups / scale).round().clamp(-8, 7) * scale).reshape_as(weight)


def lm_head_perplexities(reference: ReferenceLlama, fp16_head, ids, window: int, block: int) -> dict:  # type: ignore[no-untyped-def]
    """The checkpoint's body with each lm_head choice (the exported INT4-AWQ head last)."""
    exported = reference.weight("lm_head")
    heads = {"fp16": (fp16_head, None), "int8": (round_rows_int8(fp16_head), None),
             "int4_rtn": (round_groups_int4(fp16_head, block), None), "int4": exported}
    ppl = {}
    for kind, head in heads.items():
        reference._linear_cache["lm_head"] = head
        ppl[kind] = perplexity(reference.forward, ids, window)
    return {kind: {"ppl": round(v, 3), "over_fp16_head": round(v / ppl["fp16"], 4)} for kind, v in ppl.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--block-size", type=int, default=64)
    # `edge-llama quantize`'s defaults (the built-in corpus gives 26 sequences of 512 tokens)
    parser.add_argument("--calib-size", type=int, default=QuantizeOptions.calib_size)
    parser.add_argument("--calib-seq-len", type=int, default=QuantizeOptions.calib_seq_len)
    parser.add_argument("--alpha-step", type=float, default=QuantizeOptions.alpha_step)
    parser.add_argument("--kv-int8", action="store_true", help="also an INT8 KV cache (the reference applies it)")
    parser.add_argument("--no-clip", dest="clip", action="store_false", help="skip the per-group clip search")
    parser.add_argument("--lm-head", choices=["fp16", "int4"], default="fp16",
                        help="int4: quantize lm_head too, and score the same body with each lm_head choice")
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_dir = make(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    heldout = "\n".join(line for line in (HERE / "heldout.txt").read_text().splitlines() if not line.startswith("# "))
    ids = tokenizer(heldout, return_tensors="pt", add_special_tokens=False)["input_ids"][0][: args.eval_tokens]

    def hf_logits(m):  # type: ignore[no-untyped-def]
        return lambda chunk: m(chunk.unsqueeze(0)).logits[0]

    fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    fp16_head = fp.get_output_embeddings().weight.detach().half().float().clone()  # as the export stores it
    ppl_fp = perplexity(hf_logits(fp), ids, args.window)
    ppl_rtn = perplexity(hf_logits(rtn_int4(fp, args.block_size)), ids, args.window)
    del fp

    with tempfile.TemporaryDirectory(prefix="el-awq-") as tmp:
        opts = QuantizeOptions(model=model_dir, out=Path(tmp) / "ckpt", block_size=args.block_size,
                               calib_size=args.calib_size, calib_seq_len=args.calib_seq_len,
                               alpha_step=args.alpha_step, clip=args.clip, kv_int8=args.kv_int8,
                               lm_head=args.lm_head)
        started = time.monotonic()
        calibrated = calibrate(opts)
        quantize_s = time.monotonic() - started
        ppl_awq_model = perplexity(hf_logits(calibrated.model), ids, args.window)  # before export, which may touch it
        probe = ids[: args.window]
        with torch.no_grad():
            model_logits = calibrated.model(probe.unsqueeze(0)).logits[0]
        started = time.monotonic()
        export(calibrated, opts)
        quantize_s += time.monotonic() - started  # calibration + export, not the evaluation between them
        reference = ReferenceLlama(opts.out)
        ppl_awq = perplexity(reference.forward, ids, args.window)
        with torch.no_grad():
            ref_logits = reference.forward(probe)
        max_diff = float((ref_logits - model_logits).abs().max())
        top1 = float((ref_logits.argmax(-1) == model_logits.argmax(-1)).float().mean())
        checkpoint_mb = (opts.out / "rank0.safetensors").stat().st_size / 1e6
        by_head = (lm_head_perplexities(reference, fp16_head, ids, args.window, args.block_size)
                   if args.lm_head == "int4" else None)

    print(json.dumps({
        "ppl_fp": round(ppl_fp, 3), "ppl_rtn": round(ppl_rtn, 3), "ppl_awq": round(ppl_awq, 3),
        "awq_over_fp": round(ppl_awq / ppl_fp, 4), "awq_below_rtn": ppl_awq < ppl_rtn,
        "ppl_awq_modelopt_in_memory": round(ppl_awq_model, 3),
        "reference_vs_modelopt_max_abs_logit_diff": round(max_diff, 4),
        "reference_top1_agreement": round(top1, 4),
        "quantize_s": round(quantize_s, 1), "checkpoint_mb": round(checkpoint_mb, 1),
        "method": opts.method, "block_size": args.block_size, "kv_cache": "int8" if args.kv_int8 else "fp16",
        "lm_head": args.lm_head, "by_lm_head": by_head,
        "calib": f"{calibrated.sequences}x{args.calib_seq_len} builtin",
        "eval_tokens": len(ids), "model": "SmolLM2-135M-Instruct (from the embedded GGUF)",
        "targets": {"ppl_awq_below_rtn": True, "awq_over_fp_max": 1.15,
                    "int8_head_over_fp16_head_max": 1.005, "int4_head_over_fp16_head_max": 1.02},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
