"""INT4-AWQ for lm_head (`edge-llama quantize --lm-head int4`), searched from second moments.

modelopt's awq_lite would search lm_head's scale like any linear: for each alpha it runs the layer on every
calibration token and compares outputs. For lm_head that is a [tokens, vocab] matmul per alpha and batch
(SmolLM2-135M, 26 x 512 tokens, 21 alphas: over an hour on a 2-core CPU, 4.4 GB resident). The loss needs only the
second moment of the input, H = sum over tokens of x x^T ([hidden, hidden]): with the AWQ scale s, the layer
computes (x / s) Q(W s)^T instead of x W^T, so its summed squared output error is

    sum_o  d_o^T (H / (s s^T)) d_o,      D = Q(W s) - W s   ([vocab, hidden])

which costs vocab x hidden^2 per alpha, independent of the number of tokens (here ~10x less). The scales are
modelopt's awq_lite ones (model_calib.py get_weight_scale / get_scale: s = x_mean^alpha / w_mean^(1 - alpha),
normalised), on the same alpha grid, so the result is what awq_lite would pick. Q is modelopt's INT4 block quantizer
(scale = group absmax / 7, round, clamp to [-8, 7]). The module is then left as awq_lite leaves a searched layer:
weight W s, input pre-quant scale 1 / s, weight quantizer on; the fp16 rounding of the scale and the clip search of
awq_fused follow as for every other layer.
"""

from __future__ import annotations

import sys
from typing import Any

from edge_llama.pipeline.awq_fused import INT4_MAX, block_amax

ROWS_PER_STEP = 8192  # rows of D per matmul with H: bounds the temporaries (8192 x hidden fp32)


def head_input_statistics(model: Any, batches: list[Any], device: str, progress: Any) -> tuple[Any, Any]:
    """(H = sum x x^T float64 [hidden, hidden], mean |x| float32 [hidden]) of lm_head's input over the calibration
    batches, the decoder's weight quantizers off (full-precision activations, as awq_lite sees them)."""
    import torch

    head = model.get_output_embeddings()
    stats: dict[str, Any] = {"h": None, "abs": None, "tokens": 0}

    def accumulate(_: Any, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        xd = x.double()
        stats["h"] = xd.T @ xd if stats["h"] is None else stats["h"] + xd.T @ xd
        total = x.abs().float().sum(0)
        stats["abs"] = total if stats["abs"] is None else stats["abs"] + total
        stats["tokens"] += x.shape[0]

    quantizers = [m.weight_quantizer for m in model.modules() if hasattr(m, "weight_quantizer")
                  and m.weight_quantizer.is_enabled]
    for quantizer in quantizers:
        quantizer.disable()
    handle = head.register_forward_pre_hook(accumulate)
    try:
        with torch.no_grad():
            for batch in progress(batches, desc="lm_head: statistics", unit="batch"):
                model(batch.to(device))
    finally:
        handle.remove()
        for quantizer in quantizers:
            quantizer.enable()
    return stats["h"], stats["abs"] / stats["tokens"]


def fake_int4(weight: Any, block: int) -> Any:
    groups = weight.reshape(weight.shape[0], -1, block)
    scale = (groups.abs().amax(-1, keepdim=True) / INT4_MAX).clamp(min=1e-12)
    return ((groups / scale).round().clamp(-INT4_MAX - 1, INT4_MAX) * scale).reshape_as(weight)


def awq_scales(act_mean: Any, weight: Any, block: int, alpha: float) -> Any:
    """modelopt 0.47 awq_lite's scale for one alpha (get_weight_scale + get_scale)."""
    import torch

    w = weight.abs().reshape(-1, block)
    w_mean = (w / (w.amax(1, keepdim=True) + torch.finfo(weight.dtype).tiny)).reshape(weight.shape).mean(0)
    scales = (act_mean.pow(alpha) / (w_mean.pow(1 - alpha) + torch.finfo(torch.float32).tiny)).clamp(1e-4, 1e4)
    return scales / (scales.max() * scales.min()).sqrt()


def search_head_scale(weight: Any, moment: Any, act_mean: Any, block: int, alpha_step: float) -> tuple[float, Any]:
    """The alpha of awq_lite's grid with the least summed output error, and its scale s [hidden]."""
    w = weight.detach().float()
    h = moment.float()
    best: tuple[float, float, Any] = (float("inf"), 0.0, None)
    for i in range(int(round(1 / alpha_step)) + 1):
        alpha = min(i * alpha_step, 1.0)
        s = awq_scales(act_mean.float(), w, block, alpha)
        h_scaled = h / (s[:, None] * s[None, :])
        loss = 0.0
        for start in range(0, w.shape[0], ROWS_PER_STEP):
            ws = w[start:start + ROWS_PER_STEP] * s
            d = fake_int4(ws, block) - ws
            loss += float(((d @ h_scaled) * d).sum())
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[1], best[2]


def quantize_head(model: Any, batches: list[Any], device: str, progress: Any, block: int, alpha_step: float) -> None:
    """Search lm_head's AWQ scale and leave it quantized (INT4, groups of `block`) the way awq_lite leaves a layer.
    lm_head must already have its own weight (quantize.untie_lm_head) and modelopt's (disabled) quantizers."""
    import torch

    head = model.get_output_embeddings()
    moment, act_mean = head_input_statistics(model, batches, device, progress)
    alpha, s = search_head_scale(head.weight, moment.to(head.weight.device), act_mean.to(head.weight.device), block,
                                 alpha_step)
    print(f"quantize: lm_head AWQ alpha {alpha:g}", file=sys.stderr)
    with torch.no_grad():
        head.weight = torch.nn.Parameter((head.weight.float() * s).to(head.weight.dtype))
    head.input_quantizer.pre_quant_scale = (1 / s).to(head.weight.dtype)
    quantizer = head.weight_quantizer
    quantizer.enable()
    if quantizer.num_bits != 4 or not quantizer.block_sizes or quantizer.block_sizes[-1] != block:
        raise RuntimeError(f"lm_head's weight quantizer is {quantizer.num_bits} bit, blocks {quantizer.block_sizes}; "
                           f"expected INT4 in groups of {block}")
    quantizer.amax = block_amax(head.weight, block).reshape(-1, 1)
    with torch.no_grad():
        quantizer(head.weight)  # derives the block layout (and its export shape) from the weight
