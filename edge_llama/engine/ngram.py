"""Prompt-lookup drafts for speculative decoding: the tokens that followed the latest earlier occurrence of the
last few tokens, in the prompt or in the reply so far (Saxena 2023, "prompt lookup decoding"), and how many of
them are worth verifying.

Verifying k draft tokens costs one decode of k + 1 tokens. On a GPU that is about the price of one; on a small
CPU each extra token costs about half a decode (2 cores without AVX2, SmolLM2-135M: one token 8 ms, nine 41 ms),
so a draft only pays where it is likely to be accepted. `DraftPolicy` measures both as it goes: the cost of a
verification batch against a plain decode, and how often drafts hold for each length of the matched n-gram (a
4-token match in a summary is copied text; a 2-token one in a story is rarely right), and drafts the length
that maximises the expected tokens per unit of time, or nothing.
"""

from __future__ import annotations

NGRAM_SIZES = (8, 4, 3, 2)  # match lengths tried, longest first; the length found is the draft's class
DRAFT_MAX = 16  # draft tokens verified in one batch at most
# Priors (per-token acceptance by class, extra cost of a draft token relative to a decode), replaced by what is
# measured after a few drafts; each new observation weighs EMA.
PRIOR_ACCEPT = {8: 0.9, 4: 0.8, 3: 0.6, 2: 0.4}
PRIOR_COST = 0.5
EMA = 0.15
MIN_GAIN = 1.05  # expected speed-up a draft must promise
PROBE_EVERY = 16  # a class that does not pay is still tried (one token) this often, to notice that it now would


class NgramDrafter:
    def __init__(self, tokens: list[int]) -> None:
        """`tokens`: the prompt; `append` adds each token of the reply as it is chosen."""
        self.tokens: list[int] = []
        # n -> {n tokens: the index just after their latest occurrence that has a continuation}
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAM_SIZES}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        end = len(tokens)  # the n-grams ending here get `token` as their continuation
        tokens.append(token)
        for n, index in self._index.items():
            if end >= n:
                index[tuple(tokens[end - n:end])] = end

    def match(self) -> tuple[int, int] | None:
        """(n, start): the longest of NGRAM_SIZES whose last n tokens occurred before, and where what followed
        them starts; None without a match."""
        tokens = self.tokens
        for n, index in self._index.items():
            if len(tokens) >= n:
                start = index.get(tuple(tokens[-n:]))
                if start is not None:
                    return n, start
        return None

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the longest match: what a GPU verifies whole (there a draft token
        costs about nothing, so no DraftPolicy); [] without a match."""
        found = self.match() if limit > 0 else None
        return self.tokens[found[1]:found[1] + limit] if found else []


class DraftPolicy:
    """How many draft tokens to verify, from measured costs and acceptance (one per engine: it outlives
    generations; the engine's single thread uses it)."""

    def __init__(self) -> None:
        self.accept = dict(PRIOR_ACCEPT)  # class -> per-token acceptance probability
        self.cost = PRIOR_COST  # extra time of one draft token in a verification batch / time of a plain decode
        self.decode_s = 0.0  # a plain one-token decode (EMA, seconds); 0 until measured
        self._skipped = dict.fromkeys(NGRAM_SIZES, 0)

    def length(self, n: int, limit: int) -> int:
        """Draft tokens to verify for a match of class `n` (at most `limit`); 0: decode plainly."""
        alpha, best, best_gain = self.accept[n], 0, MIN_GAIN
        expected = 1.0  # tokens a verification yields: the chosen one plus the accepted run
        term = 1.0
        for k in range(1, min(limit, DRAFT_MAX) + 1):
            term *= alpha
            expected += term
            gain = expected / (1 + self.cost * k)
            if gain > best_gain:
                best, best_gain = k, gain
        if best == 0 and limit > 0:
            self._skipped[n] += 1
            if self._skipped[n] >= PROBE_EVERY:
                self._skipped[n] = 0
                return 1
        return best

    def decoded(self, seconds: float) -> None:
        """A plain one-token decode took `seconds`."""
        self.decode_s = seconds if not self.decode_s else (1 - EMA) * self.decode_s + EMA * seconds

    def verified(self, n: int, drafted: int, accepted: int, seconds: float) -> None:
        """A draft of class `n` was verified: `accepted` of `drafted` tokens held; the batch took `seconds`."""
        trials = accepted + (accepted < drafted)  # each accepted token and the first rejection, if any
        weight = 1 - (1 - EMA) ** trials  # as many observations as trials
        self.accept[n] = (1 - weight) * self.accept[n] + weight * (accepted / trials)
        if self.decode_s:
            extra = max(0.0, seconds / self.decode_s - 1) / drafted
            self.cost = (1 - EMA) * self.cost + EMA * extra
