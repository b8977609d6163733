"""The one Engine interface every backend implements, and helpers they share.

An engine is used from one worker thread at a time (batch size 1): the service serialises calls. `tokenize` may
also be called from other threads while a generation runs; backends keep it free of generation state.
"""

from __future__ import annotations

import codecs
import json
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from edge_llama.errors import InternalError, ModelError

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Capacity:
    kv_tokens: int  # the KV budget: prompt + reply tokens of one request never exceed it
    max_seq_len: int  # the model's own limit (training context), >= kv_tokens when the budget is honest


class TokenConstraint(Protocol):
    """Constrained decoding as an engine sees it: a per-step mask of the tokens allowed next (structured/ builds
    it from a JSON schema or a set of tools; engines never see a schema). One object per generation, used from
    one thread at a time (the engine's; on TensorRT-LLM, the executor's logits post-processor).

    - `mask()` before choosing each token: None while decoding is free (the text before a lazy trigger such as
      the start of a tool call), else an int32 bitmask of ceil(vocab / 32) words, bit t of word t // 32 set when
      token t may come next (llguidance's layout). The array may be reused: it is valid until the next call.
      Tokens past the mask's width (a padded vocabulary) are never allowed. End-of-generation tokens are in it
      only where the structure may end.
    - `accept(token)` with the token chosen (an end-of-generation token too).
    - `done` turns true once the structure is complete and nothing may follow it: the engine then ends the
      generation with finish "stop", as if it had produced an end token.
    A mask that allows nothing is a bug of the constraint: it raises instead of returning one.
    """

    def mask(self) -> Any: ...

    def accept(self, token: int) -> None: ...

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int | None = None
    constraint: TokenConstraint | None = None  # a fresh one per generation (it is stateful)


@dataclass(frozen=True)
class Vocabulary:
    """The model's tokens, as constrained decoding needs them to turn a grammar into token masks.

    One of two forms: a Hugging Face `tokenizer_json` (the TensorRT-LLM engine folder has one), or each token's
    bytes in `pieces` (llama.cpp: from the GGUF), where control tokens are prefixed with b"\xff" so that a grammar
    can never produce them as text (llguidance's convention), plus `tokenize` for text the grammar forces.
    """

    eos_ids: tuple[int, ...]  # every end-of-generation token (eos, <|eot_id|>, <|eom_id|>, <|im_end|>...)
    logits_size: int  # the width of the engine's logits (>= the tokenizer's vocabulary when padded)
    tokenizer_json: str | None = None
    pieces: Sequence[bytes] | None = None
    tokenize: Any = None  # (bytes) -> list[int], with `pieces` only


@dataclass(frozen=True)
class Chunk:
    """One generated token's text (UTF-8 safe: "" while a character is incomplete) or the final marker.

    Token chunks have finish=None and count one completion token each; the last chunk of every generation has a
    finish reason, counts no token, and carries any bytes still held back (normally "").
    """

    text: str
    finish: FinishReason | None = None


@dataclass(frozen=True)
class TemplateInfo:
    """What a chat template needs from the model: its own template (None = use a built-in) and special tokens."""

    template: str | None
    bos_token: str
    eos_token: str


class Engine(ABC):
    name: str = "engine"

    @abstractmethod
    def load(self) -> None:
        """Load weights and allocate the KV cache. Slow; call once, from a worker thread."""

    def close(self) -> None:  # noqa: B027 - backends without native resources need nothing here
        """Free native resources."""

    def fault(self) -> str | None:
        """Why the engine can no longer serve (e.g. an executor that never ended a cancelled request), else None.
        The daemon reports it in `health` and stops pinging the systemd watchdog, so the service restarts."""
        return None

    def prompt_cache_stats(self) -> dict[str, int] | None:
        """The host-RAM prompt cache's figures (states, bytes, limit_bytes, saves, evictions, restores,
        restored_tokens), None for a backend without one. Read from the event loop while the engine runs: plain
        counters."""
        return None

    # Set by load(); backends that know them earlier may override the properties.
    _capacity: Capacity | None = None
    _template: TemplateInfo | None = None

    @property
    def capacity(self) -> Capacity:
        if self._capacity is None:
            raise InternalError("engine used before load()")
        return self._capacity

    @property
    def template_info(self) -> TemplateInfo:
        if self._template is None:
            raise InternalError("engine used before load()")
        return self._template

    @property
    @abstractmethod
    def model_name(self) -> str: ...

    @abstractmethod
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Token ids of `text`, no BOS added. special=True parses special-token text (e.g. <|eot_id|>) as the
        special token (for template text); special=False keeps it plain text (for what users wrote)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str: ...

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as plain text (summaries count every piece of a long document)."""
        return len(self.tokenize(text, special=False))

    # Set by backends during long work that yields no token (prompt evaluation), read by the scheduler's stall
    # detection: a long prompt is progress, not a wedged engine.
    progress_at: float = 0.0

    def vocabulary(self) -> Vocabulary:
        """The tokens for constrained decoding (tools, JSON output). Slow (the whole vocabulary): call it from a
        worker thread, once. Backends that cannot constrain raise NotImplementedError."""
        raise NotImplementedError(f"the {self.name} backend cannot constrain its output")

    def next_token_probs(self, prompt_ids: Sequence[int], candidates: Sequence[int]) -> list[float]:
        """Probability of each candidate as the next token after the prompt (for classifier-style models such as
        Llama Guard). Backends that cannot give it raise NotImplementedError."""
        raise NotImplementedError(f"the {self.name} backend cannot score next tokens")

    @abstractmethod
    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        """Stream the reply to `prompt_ids`. Checks `cancel` between prompt batches and between tokens, and ends
        with a Chunk(finish="cancelled") within one token (or one prompt batch) of it being set."""


class Utf8Assembler:
    """Turns a stream of token byte pieces into text that never splits a character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenizer_config_info(path: Path) -> TemplateInfo:
    """Template and special tokens from a Hugging Face tokenizer_config.json."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    template = data.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return TemplateInfo(template=template, bos_token=_token_str(data.get("bos_token")),
                        eos_token=_token_str(data.get("eos_token")))


def _token_str(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<|begin_of_text|>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""
