"""Token choice on a logits row (numpy, float32, one row of n_vocab): greedy, sampling, constraint masks, and the
acceptance rule of exact speculative sampling.

Sampling is llama.cpp's chain as llama-cpp-python configured it for us before (llama.py `_init_sampler`:
top_k 40 -> top_p -> min_p 0.05 -> temperature -> dist), computed here so that the plain path and speculative
verification sample from one and the same distribution (`Sampler.distribution`). Semantics as in the vendored
llama.cpp's src/llama-sampler.cpp (llama-cpp-python 0.3.36): top_p on the softmax of the top-k logits at
temperature 1 (keeping the token that reaches p), min_p keeping logits >= max + log(min_p), then logits / temp.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

TOP_K = 40
MIN_P = 0.05
# Logit margins below the maximum tried before a full partition: a row's 40 best almost always lie within the
# first (a cheap comparison instead of a ~0.2 ms argpartition over 49k logits); the result is the same either way.
MARGINS = (8.0, 16.0, 32.0)


def apply_mask(logits: np.ndarray, mask: Any) -> None:
    """Disallow, in place, every token whose bit is clear in an int32 bitmask (bit t of word t // 32; tokens past
    the mask's width are disallowed too)."""
    bits = np.unpackbits(np.asarray(mask, dtype=np.int32).view(np.uint8), bitorder="little")
    width = min(len(bits), len(logits))
    logits[width:] = -np.inf
    np.copyto(logits[:width], -np.inf, where=bits[:width] == 0)


class Sampler:
    """Chooses tokens for one generation. temperature 0 = greedy (argmax); otherwise a seeded draw (seed None: a
    fresh one from the OS) from `distribution`."""

    def __init__(self, temperature: float, top_p: float, seed: int | None) -> None:
        self.greedy = temperature <= 0
        self.temperature = temperature
        self.top_p = top_p
        self.rng = np.random.default_rng(seed)

    def choose(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(logits.argmax())
        ids, probs = self.distribution(logits)
        return self.draw(ids, probs)

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn, best first, and their probabilities (float64, summing to 1)."""
        top = float(logits.max())
        if not math.isfinite(top):
            raise ValueError("no token is allowed (every logit is -inf)")
        best = None
        for margin in MARGINS:
            near = np.flatnonzero(logits >= top - margin)
            if len(near) >= TOP_K:
                best = near[np.argpartition(logits[near], len(near) - TOP_K)[-TOP_K:]]
                break
        if best is None:  # a very peaked row: fewer than 40 logits within 32 of the top (or a masked row)
            allowed = np.flatnonzero(logits > -np.inf)
            best = allowed if len(allowed) <= TOP_K else \
                allowed[np.argpartition(logits[allowed], len(allowed) - TOP_K)[-TOP_K:]]
        values = logits[best].astype(np.float64)
        order = np.argsort(-values, kind="stable")
        best, values = best[order], values[order]
        keep = len(values)
        if self.top_p < 1.0:  # the smallest prefix whose probability (temperature 1) reaches top_p
            p = np.exp(values - values[0])
            cum = np.cumsum(p / p.sum())
            keep = min(keep, int(np.searchsorted(cum, self.top_p, side="left")) + 1)
        keep = min(keep, int(np.count_nonzero(values[:keep] >= values[0] + math.log(MIN_P))))
        scaled = values[:keep] / self.temperature
        probs = np.exp(scaled - scaled[0])
        return best[:keep], probs / probs.sum()

    def draw(self, ids: np.ndarray, probs: np.ndarray) -> int:
        """One token from (ids, probs) by inverse CDF."""
        index = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        return int(ids[min(index, len(ids) - 1)])

    def verify(self, logits: np.ndarray, draft: int) -> tuple[bool, int]:
        """Speculative sampling against a deterministic draft: the token is drawn exactly as `choose` draws it (one
        uniform number, the same distribution) and the draft is accepted when they agree. That accepts `draft` with
        probability p(draft) and otherwise yields a token distributed as p without it, renormalised: the optimal
        rule of Leviathan et al. (2023) for a point-mass draft. Drawing as `choose` does also keeps the random
        stream aligned with the plain path, so a seeded reply is the same tokens with and without speculation.
        Returns (accepted, token)."""
        token = self.choose(logits)
        return token == draft, token
