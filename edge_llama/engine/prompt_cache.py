"""Host-memory prompt cache of the llama.cpp engine: the KV state of earlier conversations, kept in RAM so that a
conversation that comes back after another one evicted it from the KV cache is restored instead of evaluated again.

The KV cache holds one sequence (the last request's prompt and reply). Prefix reuse makes the next turn of that
conversation cheap; but a Home Assistant turn after a voice question, or a chat after a summary, used to evaluate
its whole prompt again (its long system prompt and tool list included). llama-server keeps such states in RAM
(`--cache-ram`, 8 GiB by default); we do the same within `engine.prompt_cache_mib` (a 2048-token state of
SmolLM2-135M is 47 MiB, of Llama-3.2-1B 64 MiB: KV bytes per token x tokens).

A state is saved when a prompt is about to drop at least MIN_TOKENS cached tokens, and restored when it holds at
least MIN_TOKENS more of the new prompt than the KV cache does. Restoring copies the exact KV bytes back, so the
reply is the same as with the prefix still cached. One thread at a time (the engine's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from edge_llama.engine.base import common_prefix_len

# Tokens worth a save or a restore: copying a state costs ~1 ms per 10 MiB, evaluating a token ~2-3 ms on a
# small CPU, so even a few tokens pay; below this the bookkeeping is not worth it.
MIN_TOKENS = 8


class PromptCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        # tokens -> their KV state (a numpy uint8 array llama.cpp wrote it into; anything with len() in tests);
        # least recently used first
        self._states: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._bytes = 0
        # Since start, for `stats` and /metrics (tuning engine.prompt_cache_mib): states kept, states dropped for
        # room, states restored and the prompt tokens those restores spared from evaluation.
        self.saves = 0
        self.evictions = 0
        self.restores = 0
        self.restored_tokens = 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._states)

    def best(self, prompt: Sequence[int]) -> tuple[int, tuple[int, ...], Any] | None:
        """(tokens of `prompt` it holds, its tokens, its state) for the state sharing the longest prefix with
        `prompt`; None when none shares any."""
        found: tuple[int, tuple[int, ...], Any] | None = None
        for tokens, state in self._states.items():
            n = common_prefix_len(tokens, prompt)
            if n and (found is None or n > found[0]):
                found = (n, tokens, state)
        if found is not None:
            self._states.move_to_end(found[1])
        return found

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether the state of exactly `tokens` is kept (then saving it again would copy the same bytes)."""
        key = tuple(tokens)
        if key in self._states:
            self._states.move_to_end(key)
            return True
        return False

    def restored(self, tokens: int) -> None:
        """A state was restored, sparing `tokens` prompt tokens their evaluation."""
        self.restores += 1
        self.restored_tokens += tokens

    def stats(self) -> dict[str, int]:
        return {"states": len(self._states), "bytes": self._bytes, "limit_bytes": self.limit_bytes,
                "saves": self.saves, "evictions": self.evictions, "restores": self.restores,
                "restored_tokens": self.restored_tokens}

    def clear(self) -> None:
        self._states.clear()
        self._bytes = 0

    def put(self, tokens: Sequence[int], state: Any) -> None:
        """Keep `state` (the KV of `tokens`), dropping the least recently used states beyond the limit and any
        state this one extends (it holds all they do)."""
        key = tuple(tokens)
        if len(state) > self.limit_bytes:
            return
        for old in [t for t in self._states if t == key[:len(t)]]:
            self._bytes -= len(self._states.pop(old))
        self._states[key] = state
        self._bytes += len(state)
        self.saves += 1
        while self._bytes > self.limit_bytes:
            _, dropped = self._states.popitem(last=False)
            self._bytes -= len(dropped)
            self.evictions += 1
