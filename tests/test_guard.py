"""The streaming guard's early release: clean text goes out a word at a time, one token after it was generated;
offensive words split across tokens, phrases that block only when whole and near-threshold words are held; no
random splitting of a blocked text into tokens delivers the blocked phrase (tests/test_safety.py has the same
guarantees through the daemon)."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from conftest import Daemons, fake_config, guarded
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_llama.client import Client
from edge_llama.config import SafetyConfig
from edge_llama.safety.guard import StreamGuard
from edge_llama.safety.hooks import SafetyPolicy

POLICY = SafetyPolicy.from_config(SafetyConfig())  # the defaults: offensive blocks output at 0.9
SENTENCES = ["Gardens need water, light and patience.", "Plant flowers where the sun stays longest.",
             "Tomatoes like warm soil and a little shade in the afternoon.", "Water the roots, not the leaves.",
             "Compost feeds the soil for years.", "I can help you plan the beds if you tell me their size."]
# Each blocks in any 12-word window of the text around it (the offensive hook's unit), however it is split.
BLOCKED = ["fucking stupid idiot", "stupid fucking moron", "dumb stupid bitch", "fucking useless idiot"]


def stream(pieces: list[str] | list[tuple[str, int]]) -> tuple[list[tuple[int, str]], StreamGuard]:
    """Feed `pieces` (text, or (text, tokens) for a batch) as the daemon does, then finish. Returns each delivered
    text with the number of tokens generated when it went out (-1: at `finish`), and the guard."""
    guard = StreamGuard(POLICY)
    out: list[tuple[int, str]] = []

    async def run() -> None:
        generated = 0
        for piece in pieces:
            text, tokens = piece if isinstance(piece, tuple) else (piece, 1)
            generated += tokens
            if sent := await guard.feed(text, tokens):
                out.append((generated, sent))
        if sent := await guard.finish("".join(p[0] if isinstance(p, tuple) else p for p in pieces)):
            out.append((-1, sent))

    asyncio.run(run())
    return out, guard


def bpe(text: str) -> list[str]:
    """Tokens as llama.cpp's models make them: a word with its leading space."""
    return re.findall(r"\s*\S+", text)


def test_clean_text_goes_out_one_token_after_each_word() -> None:
    out, guard = stream(bpe("Once upon a time, there was a lighthouse keeper."))
    assert out[:4] == [(2, "Once "), (3, "upon "), (4, "a "), (5, "time, ")]  # the previous guard: 8+ tokens
    assert "".join(t for _, t in out) == "Once upon a time, there was a lighthouse keeper."
    assert out[-1] == (-1, "keeper.") and guard.verdict.action == "allow"
    # A token that ends in whitespace is complete: it goes out with the feed that brought it.
    assert stream(["Sure, ", "I ", "can."])[0] == [(1, "Sure, "), (2, "I "), (-1, "can.")]


@pytest.mark.parametrize("pieces", [
    ["You", " are", " a", " stu", "pid", " man", "."],
    ["What", " a", " pile", " of", " sh", "it", " this", " is", "."],
    ["You", " id", "i", "ot", ",", " go", " away", "."],
    ["You", " are", " a", " worth", "less", " piece", " of", " sh", "it", ",", " and", " more", "."],
])
def test_an_offensive_word_split_across_tokens_is_never_delivered_in_part(pieces: list[str]) -> None:
    """The last word is held until whitespace shows it complete: no prefix of it ("stu", "sh", "id", "worth")
    goes out, even where that prefix scores as clean."""
    out, guard = stream(pieces)
    text = "".join(pieces)
    word = next(w for w in ("stupid", "shit", "idiot", "worthless") if w in text)
    delivered = "".join(t for _, t in out)
    assert guard.blocked and text.startswith(delivered)
    assert len(delivered) <= text.index(word), delivered


@pytest.mark.parametrize("text", ["You ugly cow, go away.", "You ugly old hag, go away.", "Your ugly face, really."])
def test_a_phrase_that_blocks_only_whole_is_not_delivered_in_part(text: str) -> None:
    """"ugly" (0.90 alone) and "cow" (0.48) do not block; "ugly cow" does (0.93). The near-threshold "ugly" is
    held, so nothing of the phrase is out when it completes and blocks."""
    out, guard = stream(bpe(text))
    assert guard.blocked and "".join(t for _, t in out) == text[:text.index("ugly")]


def test_a_near_threshold_word_is_held_for_a_window_then_released() -> None:
    """Clean text with a word that scores near the block threshold ("ugly", 0.90): it waits for a window of words
    after it (16 tokens) instead of going out with the next token, then goes out with all but the last 4 words;
    nothing is blocked."""
    text = ("That ugly duckling story is a classic tale that children love to hear at bedtime, and their parents "
            "read it to them again and again.")
    out, guard = stream(bpe(text))
    assert out[0] == (2, "That ")
    assert out[1] == (18, "ugly duckling story is a classic tale that children love to hear at ")
    assert "".join(t for _, t in out) == text and not guard.blocked
    # Among clean words "worthless" (0.50 alone) scores 0.24: it is held all the same, judged on its own.
    out, _ = stream(bpe("Gardens need water and light, the flowers worthless and the soil dry, so water them daily "
                        "and in the evening when the sun is low."))
    assert next(n for n, t in out if "worthless" in t) >= 16


def test_a_word_cut_by_the_context_window_is_not_scored_as_a_fragment() -> None:
    """The released text checked with what follows is its last 120 characters (context_chars): cut inside "pass"
    it would start with "ass", scored as the insult (1.0) among stop words. The context starts at a word."""
    text = ("We crossed the pass and then we were on our way, and so it was that we went on and on as if it were "
            "all there is to it, and then off we go, on and on.")
    assert text[:text.index(" go,") + 1][-120:].startswith("ass ")  # a release lands there, one word a token
    out, guard = stream(bpe(text))
    assert not guard.blocked and "".join(t for _, t in out) == text


def test_text_without_spaces_is_released_in_pieces() -> None:
    text = "日本語の文章は単語の間に空白がありません。" * 4
    out, guard = stream(list(text))
    assert out[0][0] == 49  # at most 48 characters are held back (KEEP_CHARS)
    assert "".join(t for _, t in out) == text and len(out) > 10


@st.composite
def splittings(draw: st.DrawFn, texts: st.SearchStrategy[str]) -> list[tuple[str, int]]:
    """A text cut at random places into tokens, fed in random batches of 1-4 tokens, as the daemon's stream
    interval groups them."""
    text = draw(texts)
    cuts = sorted(draw(st.sets(st.integers(1, len(text) - 1), max_size=len(text) // 2)))
    tokens = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    batches, i = [], 0
    while i < len(tokens):
        batch = tokens[i:i + draw(st.integers(1, 4))]
        batches.append(("".join(batch), len(batch)))
        i += len(batch)
    return batches


clean = st.lists(st.sampled_from(SENTENCES), min_size=1, max_size=5).map(" ".join)
blocked = st.tuples(st.lists(st.sampled_from(SENTENCES), max_size=4), st.sampled_from(BLOCKED),
                    st.lists(st.sampled_from(SENTENCES), max_size=2)).map(
    lambda parts: " ".join([*parts[0], f"Listen, {parts[1]}!", *parts[2]]))


@settings(max_examples=300, deadline=None)
@given(splittings(blocked))
def test_no_token_splitting_delivers_a_blocked_phrase(batches: list[tuple[str, int]]) -> None:
    text = "".join(t for t, _ in batches)
    phrase = next(p for p in BLOCKED if p in text)
    out, guard = stream(batches)
    delivered = "".join(t for _, t in out)
    assert guard.blocked and text.startswith(delivered)
    assert len(delivered) <= text.index(phrase), delivered  # not even its first word


@settings(max_examples=150, deadline=None)
@given(splittings(clean))
def test_clean_text_is_delivered_whole_in_complete_words(batches: list[tuple[str, int]]) -> None:
    text = "".join(t for t, _ in batches)
    out, guard = stream(batches)
    assert not guard.blocked and "".join(t for _, t in out) == text
    assert all(t[-1].isspace() for n, t in out if n != -1)  # before the end, only complete words go out


def test_first_text_arrives_with_the_first_word_through_the_daemon(daemons: Daemons) -> None:
    """Guard on, 200 ms a token: "I " is out once the second token shows the word complete (0.4 s), where a
    window-first guard needed 16 tokens (3.2 s)."""
    reply = "I am glad to help you."
    d = daemons.start(guarded(fake_config(reply=reply, token_delay_ms=200)))
    with Client(d.socket) as c:
        sent = time.monotonic()
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "my garden"}]})
        events = c.events(rid)
        first = next(events)
        first_s = time.monotonic() - sent
        rest = list(events)
    assert first == {"id": rid, "event": "token", "text": "I "}
    assert first_s < 8 * 0.200, first_s
    assert "".join(e.get("text", "") for e in [first, *rest] if e["event"] == "token") == reply
    assert rest[-1]["finish_reason"] == "stop"
