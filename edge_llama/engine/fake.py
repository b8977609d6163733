"""A scripted engine for tests: what a real model cannot make deterministic.

Tokens are UTF-8 bytes (ids 0-255) plus a few special tokens, so token counts are exact and multi-byte
characters arrive split across tokens. The reply is fixed by config (or echoes the last user turn), and delays
and failures are injected from config.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edge_llama.config import EngineConfig
from edge_llama.engine.base import Capacity, Chunk, Engine, GenParams, TemplateInfo, Utf8Assembler, Vocabulary
from edge_llama.errors import InternalError

SPECIALS = ("<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
SPECIAL_IDS = {text: 256 + i for i, text in enumerate(SPECIALS)}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")

END = SPECIAL_IDS["<|eos|>"]
END_IDS = (END, SPECIAL_IDS["<|end|>"])


def _allowed(mask: Any, reply: bytes, at: int) -> tuple[int, int]:
    """Under a constraint: the script's next byte the constraint allows (the ones it forbids are skipped), else
    the end, else the lowest allowed token; and where the script goes on. So a scripted reply still comes out valid,
    and a test can script exactly what a model would write."""
    if mask is None:
        return (reply[at], at + 1) if at < len(reply) else (END, at)
    bits = np.unpackbits(np.asarray(mask, dtype="<i4").view(np.uint8), bitorder="little")
    for j in range(at, len(reply)):
        if bits[reply[j]]:
            return reply[j], j + 1
    # The script is used up: end, else close what is open (a string, an object, an array), else the shortest
    # values, else the lowest allowed token: a structure the script left open is closed in few tokens.
    for token in (*END_IDS, *b'"}],0f'):
        if bits[token]:
            return token, len(reply)
    allowed = np.flatnonzero(bits[:256 + len(SPECIALS)])
    if not len(allowed):
        raise InternalError("the constraint allows no token")
    return int(allowed[0]), len(reply)


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class FakeEngine(Engine):
    name = "fake"

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._script = config.fake

    def load(self) -> None:
        time.sleep(self._script.load_delay_ms / 1000)
        self._closed = False

    def close(self) -> None:
        self._closed = True  # as a real backend frees its model: any later use is a bug, and fails loudly

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise InternalError("the fake engine was used after close()")

    @property
    def capacity(self) -> Capacity:
        return Capacity(kv_tokens=self._config.kv_tokens, max_seq_len=self._config.kv_tokens)

    @property
    def model_name(self) -> str:
        return "fake"

    @property
    def template_info(self) -> TemplateInfo:
        return TemplateInfo(template=TEMPLATE, bos_token="<|bos|>", eos_token="<|eos|>")

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if not special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part in SPECIAL_IDS:
                ids.append(SPECIAL_IDS[part])
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def _reply(self, prompt: str) -> str:
        if self._script.reply is not None:
            return self._script.reply
        turns = prompt.split("<|user|>")
        last_user = turns[-1].split("<|end|>")[0] if len(turns) > 1 else ""
        return f"You said: {last_user}"

    def next_token_probs(self, prompt_ids: Sequence[int], candidates: Sequence[int]) -> list[float]:
        """Scripted: candidates starting with "u" (as in "unsafe") are likely when the prompt contains
        fake.unsafe_on."""
        prompt = self.detokenize_with_specials(prompt_ids)
        for _ in range(len(prompt_ids)):  # prompt evaluation, as generate() does (a slow classifier check)
            self._check_open()
            if self._script.prompt_delay_ms:
                time.sleep(self._script.prompt_delay_ms / 1000)
        unsafe = bool(self._script.unsafe_on) and self._script.unsafe_on in prompt
        likely = [c == ord("u") for c in candidates]
        return [(0.97 if unsafe else 0.02) if u else (0.03 if unsafe else 0.98) for u in likely]

    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        self._check_open()
        prompt = self.detokenize_with_specials(prompt_ids)
        for _ in range(len(prompt_ids)):
            if cancel.is_set():
                yield Chunk("", "cancelled")
                return
            if self._script.prompt_delay_ms:
                time.sleep(self._script.prompt_delay_ms / 1000)
                self.progress_at = time.monotonic()
        if self._script.fail_on and self._script.fail_on in prompt:
            raise InternalError(f"fake engine failure (prompt contains {self._script.fail_on!r})")
        assembler = Utf8Assembler()
        reply = self._reply(prompt).encode("utf-8")
        constraint = params.constraint
        count = 0
        at = 0  # where in the scripted reply
        while at < len(reply) or constraint is not None:
            if cancel.is_set():
                yield Chunk("", "cancelled")
                return
            if count >= params.max_tokens:
                yield Chunk(assembler.flush(), "length")
                return
            token, at = (reply[at], at + 1) if constraint is None else _allowed(constraint.mask(), reply, at)
            if constraint is not None:
                constraint.accept(token)
                if token in END_IDS:
                    break
            if self._script.token_delay_ms:
                time.sleep(self._script.token_delay_ms / 1000)
            yield Chunk(assembler.feed(bytes([token])))
            count += 1
            if count == 1 and self._script.stall_on and self._script.stall_on in prompt:
                threading.Event().wait()  # never returns, whatever the cancel flag says
            if count == 1 and self._script.truncate_on and self._script.truncate_on in prompt:
                return
            if constraint is not None and constraint.done:
                break
        yield Chunk(assembler.flush(), "stop")

    def vocabulary(self) -> Vocabulary:
        """Bytes 0-255, then the special tokens (control tokens: a grammar never writes them as text)."""
        return Vocabulary(eos_ids=END_IDS, logits_size=256 + len(SPECIALS),
                          pieces=[bytes([i]) for i in range(256)] + [b"\xff" + t.encode() for t in SPECIALS],
                          tokenize=list)

    @staticmethod
    def detokenize_with_specials(ids: Sequence[int]) -> str:
        out = bytearray()
        for i in ids:
            out.extend(SPECIALS[i - 256].encode() if i >= 256 else bytes([i]))
        return out.decode("utf-8", errors="replace")
