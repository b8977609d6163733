"""The streaming guard: output reaches the client only after the window containing it passed the hooks.

Generated text is held until `window_tokens` tokens have accumulated; that window, with the last
`context_chars` of already-released text (so a phrase split across windows is still seen whole), is checked;
if it passes it is released (but for its last few words, judged again with what follows), if it is blocked
nothing of it is released and the generation is stopped. The
complete text is checked once more at the end, before `done`. No blocked text ever reaches the client.
"""

from __future__ import annotations

import re

from edge_llama.safety.hooks import SafetyPolicy, Verdict

KEEP_WORDS = 4  # trailing words held back after a passing window...
KEEP_CHARS = 48  # ...but never more than this many characters (text without spaces: code, CJK)


class StreamGuard:
    def __init__(self, policy: SafetyPolicy) -> None:
        self.policy = policy
        self.window = policy.config.window_tokens
        self.context_chars = policy.config.context_chars
        self.released: list[str] = []
        self._tail = ""  # the last context_chars of released text
        self._held: list[str] = []
        self._held_tokens = 0
        self.verdict = Verdict()

    @property
    def blocked(self) -> bool:
        return self.verdict.action == "block"

    async def feed(self, text: str, tokens: int) -> str:
        """Take newly generated text; return what may be sent now ("" while held or once blocked)."""
        if self.blocked:
            return ""
        self._held.append(text)
        self._held_tokens += tokens
        # The first window is half size: the first words reach the reader sooner; later windows are full.
        if self._held_tokens < (self.window if self.released else max(1, self.window // 2)):
            return ""
        return await self._check_held()

    async def finish(self, full_text: str) -> str:
        """The generation ended: check the whole text, then release what is still held (or nothing)."""
        if self.blocked:
            return ""
        self.verdict = self.verdict.merge(await self.policy.check_async([full_text], "output"))
        return "" if self.blocked else self._release(keep_words=0)

    async def _check_held(self) -> str:
        self.verdict = self.verdict.merge(await self.policy.check_async([self._tail + "".join(self._held)], "output"))
        return "" if self.blocked else self._release(keep_words=KEEP_WORDS)

    def _release(self, keep_words: int) -> str:
        """Release the held text except its last `keep_words` words, which are checked again with what follows
        (a phrase such as "worthless piece of ..." is only judged once it is complete)."""
        held = "".join(self._held)
        cut = len(held)
        if keep_words:
            starts = [m.start() for m in re.finditer(r"\S+", held)]
            cut = max(starts[-keep_words] if len(starts) > keep_words else 0, len(held) - KEEP_CHARS)
        text, rest = held[:cut], held[cut:]
        self._held, self._held_tokens = ([rest], 0) if rest else ([], 0)
        if text:
            self.released.append(text)
            self._tail = (self._tail + text)[-self.context_chars:]
        return text
