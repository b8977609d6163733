"""A reference forward pass over an exported INT4-AWQ TensorRT-LLM checkpoint, in plain torch, without TensorRT.

It reads rank0.safetensors itself, so it checks the file, not the model that produced it:
- `weight` int8 [out/2, in]: two 4-bit two's-complement values per byte; the low nibble is output row 2j, the
  high nibble row 2j+1 (modelopt's pack_int4_in_uint8 packs along the output dimension);
- `weights_scaling_factor` [out, in/group]: W[o, i] = q[o, i] * scale[o, i // group];
- `prequant_scaling_factor` [in]: AWQ's per-input-channel scale, applied to the activations: y = (x * s) @ W^T;
- `kv_cache_scaling_factor` [1] per layer (INT8 KV cache only): K after RoPE and V are stored as
  round(x / s) in int8.
- lm_head: FP16 [vocab, hidden], or (`--lm-head int4`) an INT4-AWQ linear like the others.
TensorRT-LLM names: attention.qkv (q, k, v stacked on the output dim), attention.dense, mlp.fc (gate_proj),
mlp.gate (up_proj), mlp.proj (down_proj); SwiGLU is silu(fc(x)) * gate(x).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def unpack_int4(packed: Any) -> Any:
    """int8 [out/2, in] -> int8 [out, in] with values in [-8, 7]."""
    import torch

    b = packed.to(torch.uint8).to(torch.int16)
    low, high = b & 0x0F, (b >> 4) & 0x0F
    pairs = torch.stack([low, high], dim=1).reshape(-1, b.shape[1])  # rows 2j (low), 2j+1 (high)
    return torch.where(pairs >= 8, pairs - 16, pairs).to(torch.int8)


class ReferenceLlama:
    def __init__(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        self.config = json.loads((folder / "config.json").read_text())
        self.tensors = load_file(str(folder / "rank0.safetensors"))
        c = self.config
        self.hidden = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c["num_key_value_heads"]
        self.head_dim = c.get("head_size") or self.hidden // self.heads
        self.layers = c["num_hidden_layers"]
        self.eps = c.get("norm_epsilon", 1e-5)
        self.group = (c.get("quantization") or {}).get("group_size", 128)
        self._linear_cache: dict[str, tuple[Any, Any]] = {}
        self.inv_freq = rope_inv_freq(self.head_dim, c.get("rotary_base", 10000.0), c.get("rotary_scaling"))
        self.torch = torch

    def weight(self, prefix: str) -> tuple[Any, Any]:
        """(W fp32 [out, in], pre-quant scale fp32 [in] or None) of one linear layer."""
        if prefix not in self._linear_cache:
            t = self.tensors
            scale = t.get(f"{prefix}.weights_scaling_factor")
            if scale is None:
                w = t[f"{prefix}.weight"].float()
            else:
                q = unpack_int4(t[f"{prefix}.weight"]).float()
                w = q * scale.float().repeat_interleave(self.group, dim=1)[:, : q.shape[1]]
            pre = t.get(f"{prefix}.prequant_scaling_factor")
            self._linear_cache[prefix] = (w, None if pre is None else pre.float())
        return self._linear_cache[prefix]

    def linear(self, x: Any, prefix: str) -> Any:
        w, pre = self.weight(prefix)
        return (x if pre is None else x * pre) @ w.T

    def norm(self, x: Any, name: str) -> Any:
        weight = self.tensors[f"{name}.weight"].float()
        return x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def forward(self, ids: Any) -> Any:
        """ids: int64 [T] -> logits fp32 [T, vocab] (one sequence, causal)."""
        torch = self.torch
        t = self.tensors
        n = ids.shape[0]
        x = t["transformer.vocab_embedding.weight"].float()[ids]
        pos = torch.arange(n, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)  # [T, D/2]
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        mask = torch.full((n, n), float("-inf")).triu(1)
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i in range(self.layers):
            p = f"transformer.layers.{i}"
            h = self.norm(x, f"{p}.input_layernorm")
            qkv = self.linear(h, f"{p}.attention.qkv")
            q = qkv[:, :q_dim].view(n, self.heads, self.head_dim).transpose(0, 1)
            k = qkv[:, q_dim:q_dim + kv_dim].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            v = qkv[:, q_dim + kv_dim:].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            kv_scale = t.get(f"{p}.attention.kv_cache_scaling_factor")
            if kv_scale is not None:  # INT8 KV cache: K (after RoPE) and V stored as int8, one scale per layer
                k, v = int8_round_trip(k, kv_scale.float()), int8_round_trip(v, kv_scale.float())
            repeat = self.heads // self.kv_heads  # grouped-query attention: each KV head serves `repeat` heads
            k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
            scores = q @ k.transpose(1, 2) / math.sqrt(self.head_dim) + mask
            attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, q_dim)
            x = x + self.linear(attn, f"{p}.attention.dense")
            h = self.norm(x, f"{p}.post_layernorm")
            gated = torch.nn.functional.silu(self.linear(h, f"{p}.mlp.fc")) * self.linear(h, f"{p}.mlp.gate")
            x = x + self.linear(gated, f"{p}.mlp.proj")
        x = self.norm(x, "transformer.ln_f")
        return self.linear(x, self.head_prefix())

    def head_prefix(self) -> str:
        """The tensors the logits come from: lm_head, or the embedding table when no lm_head is stored."""
        return "lm_head" if "lm_head.weight" in self.tensors else "transformer.vocab_embedding"


def int8_round_trip(x: Any, scale: Any) -> Any:
    return (x / scale).round().clamp(-128, 127) * scale


def rotate_half(x: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> Any:
    """RoPE inverse frequencies [head_dim/2], with Llama 3's frequency-dependent scaling when configured."""
    import torch

    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if not scaling or scaling.get("type") != "llama3":
        return inv
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv / factor, inv)  # long wavelengths: slowed down
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def perplexity(logits_fn: Any, token_ids: Any, window: int) -> float:
    """exp(mean next-token NLL) over consecutive windows of `window` tokens of a 1-D id tensor."""
    import torch

    total, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        with torch.no_grad():
            logits = logits_fn(chunk)
        nll = torch.nn.functional.cross_entropy(logits[:-1].float(), chunk[1:], reduction="sum")
        total += float(nll)
        count += len(chunk) - 1
    return math.exp(total / count)


def hf_state_dict(ref: ReferenceLlama) -> dict[str, Any]:
    """The exported checkpoint as dequantized Hugging Face Llama weights (pre-quant scales folded into the
    weights: (x * s) @ W^T == x @ (W * s)^T), to check the reference forward pass against transformers' own."""
    out: dict[str, Any] = {}
    q_dim, kv_dim = ref.heads * ref.head_dim, ref.kv_heads * ref.head_dim

    def folded(prefix: str) -> Any:
        w, pre = ref.weight(prefix)
        return w if pre is None else w * pre[None, :]

    t = ref.tensors
    for i in range(ref.layers):
        p, h = f"transformer.layers.{i}", f"model.layers.{i}"
        qkv = folded(f"{p}.attention.qkv")
        out[f"{h}.self_attn.q_proj.weight"] = qkv[:q_dim]
        out[f"{h}.self_attn.k_proj.weight"] = qkv[q_dim:q_dim + kv_dim]
        out[f"{h}.self_attn.v_proj.weight"] = qkv[q_dim + kv_dim:]
        out[f"{h}.self_attn.o_proj.weight"] = folded(f"{p}.attention.dense")
        out[f"{h}.mlp.gate_proj.weight"] = folded(f"{p}.mlp.fc")
        out[f"{h}.mlp.up_proj.weight"] = folded(f"{p}.mlp.gate")
        out[f"{h}.mlp.down_proj.weight"] = folded(f"{p}.mlp.proj")
        out[f"{h}.input_layernorm.weight"] = t[f"{p}.input_layernorm.weight"].float()
        out[f"{h}.post_attention_layernorm.weight"] = t[f"{p}.post_layernorm.weight"].float()
    out["model.norm.weight"] = t["transformer.ln_f.weight"].float()
    out["model.embed_tokens.weight"] = t["transformer.vocab_embedding.weight"].float()
    out["lm_head.weight"] = folded(ref.head_prefix())
    return out
