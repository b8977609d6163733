"""INT4-AWQ that survives the export to TensorRT-LLM's fused layers, plus AWQ's per-group clip search.

TensorRT-LLM runs q/k/v as one GEMM (attention.qkv) and gate/up as one (mlp.fc + mlp.gate share one activation
scale), so each group can carry only one AWQ pre-quant scale. modelopt's awq_lite searches a scale per linear;
its exporter then averages the group's scales and re-rounds the weights, which undoes part of the search
(measured: +4% perplexity on the test model). Here the group runs as one fused linear while modelopt calibrates,
so awq_lite searches one scale for the group's joint output, as the original AWQ does for qkv and gate/up; then
the group is split back into the q/k/v (gate/up) modules the exporter expects, all holding the same scale.

The checkpoint stores pre-quant scales in fp16, so every scale is rounded to fp16 before the weights are
rounded to INT4 (the weights absorb the difference): what is quantized is what TensorRT-LLM will compute, and
the exporter's average of identical fp16 values is exact, so it re-rounds nothing.

The clip search is AWQ's (modelopt's awq_clip objective): for every group of `block` weights of every output row
pick the amax (a fraction of the group's absmax) that minimises the squared error of that group's contribution
to the output over the calibration tokens, E[(x_g . (w_g - q(w_g)))^2] = d^T H_g d with H_g = E[x_g x_g^T]
(x_g: the smoothed input, [block]). Computing it through H_g instead of the token outputs uses every calibration
token and takes seconds on a CPU, where modelopt's awq_clip takes far longer.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

# parent module -> (name of the fused linear while calibrating, the projections that read the same input)
FUSED_GROUPS = {"self_attn": ("qkv_fused", ("q_proj", "k_proj", "v_proj")),
                "mlp": ("gate_up_fused", ("gate_proj", "up_proj"))}
CLIP_RATIOS = [round(1.0 - 0.01 * i, 2) for i in range(51)]  # amax fractions 1.00 .. 0.50
INT4_MAX = 7  # modelopt/TRT-LLM symmetric INT4: scale = amax / 7, q = clamp(round(w / scale), -8, 7)
_CACHE = "_edge_llama_fused_output"


def _shared_input_projection() -> Any:
    import torch

    class SharedInputProjection(torch.nn.Module):
        """Stands in for one projection of a fused group: the first call with a given input runs the fused linear
        once and keeps its output; each member returns its own slice of it."""

        def __init__(self, parent: Any, fused_name: str, index: int, sizes: list[int]) -> None:
            super().__init__()
            object.__setattr__(self, "_parent", parent)  # a plain reference: the fused linear is a child of parent
            self.fused_name, self.index, self.sizes = fused_name, index, sizes

        def forward(self, x: Any) -> Any:
            parent = self._parent
            cached = parent.__dict__.get(_CACHE)
            if cached is None or cached[0] is not x:
                cached = (x, getattr(parent, self.fused_name)(x).split(self.sizes, dim=-1))
                parent.__dict__[_CACHE] = cached
            return cached[1][self.index]

    return SharedInputProjection


def _groups(model: Any) -> list[tuple[Any, str, tuple[str, ...]]]:
    found = []
    for layer in model.model.layers:
        for parent_name, (fused_name, names) in FUSED_GROUPS.items():
            found.append((getattr(layer, parent_name), fused_name, names))
    return found


def fuse_shared_inputs(model: Any) -> None:
    """Replace q/k/v and gate/up of every decoder layer by one linear each (same outputs, same parameters)."""
    import torch

    projection = _shared_input_projection()
    for parent, fused_name, names in _groups(model):
        parts = [getattr(parent, name) for name in names]
        sizes = [p.out_features for p in parts]
        bias = parts[0].bias is not None
        fused = torch.nn.Linear(parts[0].in_features, sum(sizes), bias=bias,
                                dtype=parts[0].weight.dtype, device=parts[0].weight.device)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if bias:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        setattr(parent, fused_name, fused)
        for index, name in enumerate(names):
            setattr(parent, name, projection(parent, fused_name, index, sizes))


def block_amax(weight: Any, block: int) -> Any:
    """Per-group absmax of a [out, in] weight: [out, in / block]."""
    return weight.detach().float().reshape(weight.shape[0], -1, block).abs().amax(-1)


def _set_amax(module: Any, amax: Any) -> None:
    quantizer = module.weight_quantizer
    quantizer.amax = amax.reshape(quantizer.amax.shape).to(quantizer.amax.dtype)


def _block(module: Any) -> int:
    return int(module.weight_quantizer.block_sizes[-1])


def _round_pre_quant_scale(module: Any) -> None:
    """Round the pre-quant scale to fp16 (as the checkpoint stores it); the weights absorb the difference."""
    import torch

    scale = module.input_quantizer.pre_quant_scale
    rounded = scale.to(torch.float16).to(scale.dtype)
    with torch.no_grad():
        module.weight = torch.nn.Parameter((module.weight.float() * (scale.float() / rounded.float()).to(
            module.weight.device)).to(module.weight.dtype))
    module.input_quantizer.pre_quant_scale = rounded
    _set_amax(module, block_amax(module.weight, _block(module)))


def unfuse(model: Any) -> None:
    """After calibration: split each fused linear back into its quantized projections, one shared scale each."""
    import torch

    for parent, fused_name, names in _groups(model):
        fused = getattr(parent, fused_name)
        start = 0
        for name, size in zip(names, getattr(parent, names[0]).sizes, strict=True):
            part = copy.deepcopy(fused)
            part.weight = torch.nn.Parameter(fused.weight[start:start + size].detach().clone())
            if fused.bias is not None:
                part.bias = torch.nn.Parameter(fused.bias[start:start + size].detach().clone())
            part.out_features = size
            # The slice has another shape: drop the block layout modelopt (0.47) cached from the fused weight, so
            # its quantizer derives it again from the slice; amax is [rows * groups, 1].
            for cached_layout in ("_original_shape", "_block_reshape_size", "_amax_shape_for_export"):
                if hasattr(part.weight_quantizer, cached_layout):
                    delattr(part.weight_quantizer, cached_layout)
            part.weight_quantizer.reset_amax()
            part.weight_quantizer.amax = fused.weight_quantizer.amax.reshape(fused.weight.shape[0], -1)[
                start:start + size].reshape(-1, 1).clone()
            with torch.no_grad():
                part.weight_quantizer(part.weight)  # derives the layout (and its export shape) from the slice
            setattr(parent, name, part)
            start += size
        delattr(parent, fused_name)
        parent.__dict__.pop(_CACHE, None)


def quantized_linears(model: Any) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "weight_quantizer") and hasattr(m, "input_quantizer") and m.weight_quantizer.is_enabled
            and getattr(m.weight_quantizer, "block_sizes", None)]


def round_pre_quant_scales(model: Any) -> None:
    for _, module in quantized_linears(model):
        if module.input_quantizer.pre_quant_scale is not None:
            _round_pre_quant_scale(module)


def input_second_moments(model: Any, batches: list[Any], device: str, progress: Any) -> dict[str, Any]:
    """H_g = sum over calibration tokens of x_g x_g^T for every quantized linear: [in / block, block, block]
    (float64), x being the input as the quantized weight sees it (times the pre-quant scale). Weight quantizers
    are off meanwhile, so every layer sees full-precision activations (as in modelopt's awq_clip)."""
    import torch

    linears = quantized_linears(model)
    moments: dict[str, Any] = {}
    last: list[Any] = []  # (input, scale, update): q/k/v (gate/up) read the same tensor, so H is computed once

    def hook(name: str, module: Any) -> Any:
        block, scale = _block(module), module.input_quantizer.pre_quant_scale

        def accumulate(_: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            if last and last[0] is x and _same_scale(scale, last[1]):
                update = last[2]
            else:
                xs = x.detach().double().reshape(-1, x.shape[-1])
                if scale is not None:
                    xs = xs * scale.double()
                groups = xs.reshape(xs.shape[0], -1, block).transpose(0, 1)  # [in/block, tokens, block]
                update = groups.transpose(1, 2) @ groups
                last[:] = [x, scale, update]
            moments[name] = update if name not in moments else moments[name] + update

        return accumulate

    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in linears]
    for _, m in linears:
        m.weight_quantizer.disable()
    try:
        with torch.no_grad():
            for batch in progress(batches, desc="clip search: statistics", unit="batch"):
                last.clear()
                model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()
        for _, m in linears:
            m.weight_quantizer.enable()
    return moments


def _same_scale(a: Any, b: Any) -> bool:
    import torch

    return a is b or (a is not None and b is not None and torch.equal(a, b))


def search_clip(weight: Any, moment: Any, block: int) -> tuple[Any, float]:
    """Best amax per (row, group) over CLIP_RATIOS for a [out, in] weight and H [in/block, block, block];
    returns (amax [out, in/block], relative reduction of the summed output error versus no clipping)."""
    import torch

    w = weight.detach().float().reshape(weight.shape[0], -1, block)  # [out, groups, block]
    full = block_amax(weight, block).clamp(min=1e-12)
    best_loss = torch.full_like(full, float("inf"))
    best_amax = full.clone()
    baseline = None
    moment = moment.float()  # accumulated in float64; float32 is plenty to rank the candidates
    for ratio in CLIP_RATIOS:
        amax = full * ratio
        scale = (amax / INT4_MAX).unsqueeze(-1)
        d = (w - (w / scale).round().clamp(-INT4_MAX - 1, INT4_MAX) * scale).transpose(0, 1)  # [groups, out, block]
        loss = ((d @ moment) * d).sum(-1).transpose(0, 1)  # d^T H d: [out, groups]
        if baseline is None:
            baseline = float(loss.double().sum())
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_amax = torch.where(better, amax, best_amax)
    return best_amax, 1.0 - float(best_loss.double().sum()) / max(baseline or 0.0, 1e-30)


def clip_search(model: Any, batches: list[Any], device: str, progress: Any) -> float:
    """Set every quantized linear's per-group amax to its searched clip; returns the mean error reduction."""
    moments = input_second_moments(model, batches, device, progress)
    linears = quantized_linears(model)
    gains = []
    for name, module in progress(linears, desc="clip search", unit="linear"):
        amax, gain = search_clip(module.weight, moments.pop(name).to(module.weight.device), _block(module))
        _set_amax(module, amax)
        gains.append(gain)
    mean_gain = sum(gains) / max(len(gains), 1)
    print(f"quantize: clip search cut the INT4 output error by {100 * mean_gain:.1f}% on average", file=sys.stderr)
    return mean_gain
