"""The streaming guard: generated text reaches the client as soon as checks show it is far from any block.

A check runs each time a token completes a word (whitespace follows it; once EAGER_CHARS are out, every EVERY_WORDS
words), on the text held since the last release
up to its last whitespace (the candidate), together with the last `context_chars` of released text. Then:
- a block: nothing more is released and the generation is stopped;
- far from every block threshold: the candidate goes out at once, so the first words reach the reader one token
  after they were generated, not one window later. Far means below RELEASE_BELOW of each output block threshold,
  for the candidate with its context and for each of its words with up to KEEP_WORDS - 1 words before it (a word
  on its own is not diluted by the clean text around it: "worthless" scores 0.50 alone, 0.24 after "flowers");
- otherwise (near a threshold) the text stays held, checked again with each word that follows; once a window
  (`window_tokens`, the first one half) is held, all but the last KEEP_WORDS words go out (the check passed: below
  the threshold), so a phrase that starts near a threshold is judged whole before its first words go out.
The last word is never checked nor released before it is complete: the next token may extend it ("worth" + "less",
"ass" + "ist"). The complete text is checked once more before `done`. No blocked text ever reaches the client; what
can have been delivered before a block, and why, is stated in docs/protocol.md ("Safety").
"""

from __future__ import annotations

import re

from edge_llama.safety.hooks import SafetyPolicy, Verdict

# Far from a block: every output block rule scored below half its threshold (0.45 for the default offensive rule at
# 0.9). Measured with the offensive classifier: 99.9% of per-word checks of 1,050 benign texts (the S-Labs test
# split) score below 0.4, so clean text is not held; single words such as "ugly" (0.90), "sh" (0.85), "useless"
# (0.58) or "worthless" (0.50) are held until what follows them has been judged.
RELEASE_BELOW = 0.5
KEEP_WORDS = 4  # words still held when a window near a threshold goes out; the longest run scored per word
KEEP_CHARS = 48  # at most this many characters held back at the end (text without spaces: code, CJK)
# Once this much text is out the reader is busy reading: words are then checked EVERY_WORDS at a time (a check at
# every word cost ~5% of decode speed on 2 cores, where the event loop shares the cores with llama.cpp's threads).
EAGER_CHARS = 160
EVERY_WORDS = 4
_LAST_WORD = re.compile(r"\S*\Z")
_CUT_WORD = re.compile(r"\A\S+(?=\s)")


def complete_part(held: str) -> int:
    """How many characters of `held` the next token cannot change: up to its last whitespace, but holding at most
    KEEP_CHARS characters (a run without spaces goes out in pieces rather than never)."""
    return max(_LAST_WORD.search(held).start(), len(held) - KEEP_CHARS)  # type: ignore[union-attr]


def keep_words_cut(held: str) -> int:
    """Where the last KEEP_WORDS words of `held` (at most KEEP_CHARS characters) start."""
    starts = [m.start() for m in re.finditer(r"\S+", held)]
    return max(starts[-KEEP_WORDS] if len(starts) > KEEP_WORDS else 0, len(held) - KEEP_CHARS)


def word_runs(words: list[str], new: int) -> list[str]:
    """Each of the last `new` words with 0 .. KEEP_WORDS - 1 words before it."""
    return [" ".join(words[end - size:end]) for end in range(len(words) - new + 1, len(words) + 1)
            for size in range(1, min(KEEP_WORDS, end) + 1)]


class StreamGuard:
    def __init__(self, policy: SafetyPolicy) -> None:
        self.policy = policy
        self.window = policy.config.window_tokens
        self.context_chars = policy.config.context_chars
        self.released: list[str] = []
        self._tail = ""  # the last context_chars of released text, from a word start
        self._held = ""
        self._held_tokens = 0  # tokens generated since the last release
        self._checked = 0  # held[:_checked] was checked and is held: checked again only with more words
        self._near_end = 0  # held[:_near_end] ends with a word that scored near a threshold (0: none is held)
        self._released_chars = 0
        self.verdict = Verdict()

    @property
    def blocked(self) -> bool:
        return self.verdict.action == "block"

    async def feed(self, text: str, tokens: int) -> str:
        """Take newly generated text; return what may be sent now ("" while held or once blocked)."""
        if self.blocked:
            return ""
        self._held += text
        self._held_tokens += tokens
        cut = complete_part(self._held)
        if cut <= self._checked:
            return ""  # no word was completed: a check would see the same text
        if (self._released_chars >= EAGER_CHARS and not self._window_full()
                and len(self._held[self._checked:cut].split()) < EVERY_WORDS):
            return ""
        # A slow hook (a model on an engine, milliseconds or more) checked at every word would compete with
        # decoding for the same cores: it checks once per window and releases by the window rule.
        if self.policy.slow and not self._window_full():
            return ""
        verdict = await self.policy.check_async([self._tail + self._held[:cut]], "output")
        self.verdict = self.verdict.merge(verdict)
        if self.blocked:
            return ""
        if not self.policy.slow:
            await self._hold_near_words(cut)
            if verdict.pressure < RELEASE_BELOW and not self._near_end:
                return self._release(cut)
        if self._window_full():
            return self._release(keep_words_cut(self._held))
        self._checked = cut
        return ""

    async def finish(self, full_text: str) -> str:
        """The generation ended: check the whole text, then release what is still held (or nothing)."""
        if self.blocked:
            return ""
        self.verdict = self.verdict.merge(await self.policy.check_async([full_text], "output"))
        return "" if self.blocked else self._release(len(self._held))

    async def _hold_near_words(self, cut: int) -> None:
        """Score each word completed since the last check alone and with up to KEEP_WORDS - 1 words before it; if
        one is near a threshold, everything up to `cut` waits for the window rule. These scores only hold text back:
        a word that would block on its own ("die", 0.94) does not block a sentence that dilutes it."""
        words = (self._tail + self._held[:cut]).split()
        runs = word_runs(words, len(self._held[self._checked:cut].split()))
        if (await self.policy.check_async(runs, "output")).pressure >= RELEASE_BELOW:
            self._near_end = cut

    def _window_full(self) -> bool:
        # The first window is half size: the first words reach the reader sooner; later windows are full.
        return self._held_tokens >= (self.window if self.released else max(1, self.window // 2))

    def _release(self, cut: int) -> str:
        text, self._held = self._held[:cut], self._held[cut:]
        self._held_tokens = 0
        self._checked = complete_part(self._held)  # what stays held was in the passing check, bar a last word
        self._near_end = max(0, self._near_end - cut)
        if text:
            self.released.append(text)
            self._released_chars += len(text)
            context = self._tail + text
            self._tail = context[-self.context_chars:]
            if len(context) > self.context_chars and not context[-self.context_chars - 1].isspace():
                # Cut inside a word: the classifiers would score the fragment as a word ("p|ass", "s|kill").
                self._tail = _CUT_WORD.sub("", self._tail)
        return text
