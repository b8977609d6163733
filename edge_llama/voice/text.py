"""Text on the way into and out of speech: streamed answers cut into speakable pieces, words compared for the wake
phrase, and the word error rate the tests and the benchmark report."""

from __future__ import annotations

import difflib
import re
import unicodedata

# A sentence ends at . ! ? or an ellipsis; "e.g." or "Dr." do not end one.
_ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "dr", "mr", "mrs", "ms", "st", "prof", "no", "fig", "approx", "jr",
                  "sr", "inc", "ltd", "mt", "ft"}
_END = re.compile(r"([.!?…]+)([\"')\]]*)(\s+|$)")
# A clause boundary where a long first sentence may be cut, so the first audio starts sooner.
_CLAUSE = re.compile(r"[,;:]\s+")
FIRST_PIECE_MIN_WORDS = 6  # a first piece cut at a comma has at least this many words (shorter sounds choppy)
MAX_PIECE_CHARS = 160  # a sentence longer than this is cut at its last clause boundary (or space)


class SentenceSplitter:
    """Feed streamed text; get back pieces to speak as soon as each is complete.

    A piece is a sentence, or, for the first piece of an answer only, the first clause of a long sentence (cut at
    a comma after at least FIRST_PIECE_MIN_WORDS words): the first audio then starts a clause earlier. A period
    after a letter ends a sentence at once; after a digit it waits for the next character ("3.5" is one number).
    """

    def __init__(self) -> None:
        self._buf = ""
        self._pieces = 0

    def feed(self, text: str) -> list[str]:
        self._buf += text
        out = []
        while True:
            piece = self._next_piece()
            if piece is None:
                return out
            if piece:
                out.append(piece)

    def flush(self) -> list[str]:
        """The rest at the end of the answer."""
        rest, self._buf = self._buf, ""
        piece = clean_for_speech(rest)
        return [piece] if piece else []

    def _next_piece(self) -> str | None:
        buf = self._buf
        for match in _END.finditer(buf):
            before = buf[:match.start()].split()
            word = before[-1].lower().rstrip(".") if before else ""
            if match.group(1) == "." and word in _ABBREVIATIONS:
                continue
            if not match.group(3) and match.group(1) == "." and (len(word) < 2 or not word[-1].isalpha()):
                continue  # at the end of what arrived: "3." may become "3.5", "J." "J.R.R.": wait for more
            return self._take(match.end())
        newline = buf.find("\n")
        if newline >= 0:
            return self._take(newline + 1)
        if self._pieces == 0:
            for match in _CLAUSE.finditer(buf):
                if len(buf[:match.start()].split()) >= FIRST_PIECE_MIN_WORDS:
                    return self._take(match.end())
        if len(buf) > MAX_PIECE_CHARS:
            cut = max(buf.rfind(", ", 0, MAX_PIECE_CHARS), buf.rfind(" ", 0, MAX_PIECE_CHARS))
            return self._take(cut + 1 if cut > 0 else MAX_PIECE_CHARS)
        return None

    def _take(self, end: int) -> str:
        piece, self._buf = self._buf[:end], self._buf[end:]
        spoken = clean_for_speech(piece)
        if spoken:
            self._pieces += 1
        return spoken


_MARKUP = [
    (re.compile(r"```.*?```", re.S), " "),  # code blocks are not read aloud
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\[([^\]]+)\]\([^)]+\)"), r"\1"),  # [text](link) -> text
    (re.compile(r"https?://\S+"), "a link"),
    (re.compile(r"^\s*(?:[-*+•]|\d+[.)])\s+", re.M), ""),  # list bullets and numbers at a line start
    (re.compile(r"^\s*#+\s*", re.M), ""),  # headings
    (re.compile(r"[*_~]{1,3}"), ""),  # emphasis
]


def clean_for_speech(text: str) -> str:
    """What a speaker should say for a piece of model output: markdown and emoji removed, spaces squeezed."""
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    text = "".join(c for c in text if unicodedata.category(c) not in ("So", "Cs", "Co", "Cn"))
    text = " ".join(text.split())
    return text if any(c.isalnum() for c in text) else ""


# --- words -------------------------------------------------------------------------------------------------------
_NUMBER_WORDS = {"0": "zero", "1": "one", "2": "two", "3": "three", "4": "four", "5": "five", "6": "six",
                 "7": "seven", "8": "eight", "9": "nine", "10": "ten"}


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts ("Ever tried, ever failed." -> 4 words).
    Apostrophes stay inside words (don't); single digits become words, as a speaker says them."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    out = []
    for word in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text):
        out.append(_NUMBER_WORDS.get(word, word))
    return out


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words): the numerator and denominator of the WER."""
    ref, hyp = words(reference), words(hypothesis)
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1], len(ref)


def wer(reference: str, hypothesis: str) -> float:
    errors, total = word_errors(reference, hypothesis)
    return errors / max(total, 1)


def strip_wake_phrase(transcript: str, phrase: str, min_similarity: float = 0.7) -> str | None:
    """The request after the wake phrase ("Hey Jetson, what time is it?" -> "what time is it?"), "" when the
    utterance was the phrase alone, None when it does not start with the phrase. Whisper spells names freely
    ("Hey, Jetsen.", "Hey Jackson"), so the first words are compared by letters (70% alike), not exactly."""
    wanted = words(phrase)
    spoken = transcript.split()
    heard = words(" ".join(spoken[:len(wanted) + 1]))
    best, best_n = 0.0, 0
    for n in range(max(1, len(wanted) - 1), min(len(heard), len(wanted) + 1) + 1):  # "hey jet son", "heyjetson"
        ratio = difflib.SequenceMatcher(None, "".join(heard[:n]), "".join(wanted)).ratio()
        if ratio > best:
            best, best_n = ratio, n
    if best < min_similarity:
        return None
    return _after_words(transcript, best_n).lstrip(" ,.!?;:-")


def _after_words(text: str, n: int) -> str:
    """`text` after its first n words (as `words` counts them)."""
    count = 0
    for match in re.finditer(r"[A-Za-z0-9]+(?:['’][A-Za-z]+)?", text):
        count += 1
        if count == n:
            return text[match.end():]
    return ""
