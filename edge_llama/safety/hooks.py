"""The safety hook interface, the built-in hooks, and the policy that turns scores into decisions.

A hook scores text by category (0..1); it does not decide. The policy in config (`safety.rules`) says, per
category, from which score a text is flagged or blocked, and on which side (input, output, tool results). Hooks
are chosen by name in `safety.hooks`: a built-in name, or "package.module:attribute" for your own (a class taking no
arguments, or a ready object) with `name` and `scores(texts, kind) -> list[dict[category, score]]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from edge_llama.config import SafetyConfig, SafetyRule
from edge_llama.errors import ConfigError

log = logging.getLogger("edge_llama.safety")
Action = Literal["allow", "flag", "block"]
Kind = Literal["input", "output", "tool"]  # tool: a tool's result, untrusted input on its way into the prompt
RANK = {"allow": 0, "flag": 1, "block": 2}


class Hook(Protocol):
    """Optional attributes: `categories` (skipped where no rule uses them), `window_words` (sees overlapping word
    windows), `slow = True` (takes more than a few milliseconds, e.g. a model on an engine: the daemon then runs
    checks in a worker thread so its event loop, other clients and the watchdog keep going)."""

    name: str

    def scores(self, texts: Sequence[str], kind: Kind) -> list[dict[str, float]]:
        """One {category: score in [0, 1]} per text."""


@dataclass
class Verdict:
    action: Action = "allow"
    categories: dict[str, float] = field(default_factory=dict)  # category -> score, those that flagged/blocked
    hooks: list[str] = field(default_factory=list)
    error: str | None = None  # a hook failed (fail mode applied)
    # How near the worst score came to blocking: score / block threshold, the highest over the rules that block
    # this kind of text (1.0 when a hook failed: nothing is known). The streaming guard releases text early only
    # well below 1. Not reported to clients.
    pressure: float = 0.0

    def merge(self, other: Verdict) -> Verdict:
        action = self.action if RANK[self.action] >= RANK[other.action] else other.action
        return Verdict(action, {**self.categories, **other.categories}, sorted(set(self.hooks + other.hooks)),
                       self.error or other.error, max(self.pressure, other.pressure))

    def as_dict(self) -> dict[str, Any]:
        categories = {k: round(v, 4) for k, v in self.categories.items()}
        out: dict[str, Any] = {"action": self.action, "categories": categories, "hooks": self.hooks}
        if self.error:
            out["error"] = self.error
        return out


class ClassifierHook:
    """A built-in ONNX classifier as a hook: its score is reported under the classifier's name."""

    WINDOW_WORDS = {"offensive": 12}  # bag-of-words insults: scored in short windows (see word_windows)

    def __init__(self, name: str, runtime: str) -> None:
        from edge_llama.safety.classifiers import load_classifier

        self.name = name
        self.categories = (name,)
        self.window_words = self.WINDOW_WORDS.get(name)
        self._classifier = load_classifier(name, runtime)

    def scores(self, texts: Sequence[str], kind: Kind) -> list[dict[str, float]]:
        return [{self.name: float(p)} for p in self._classifier.score(list(texts))]


def load_hook(spec: str, config: SafetyConfig) -> Hook:
    if spec in ("offensive", "injection"):
        return ClassifierHook(spec, config.runtime)
    if spec == "llama_guard":
        if config.llama_guard is None or not config.llama_guard.model and config.llama_guard.backend != "fake":
            raise ConfigError("safety.hooks: llama_guard needs safety.llama_guard.model (your Llama Guard 3 1B "
                              "weights; they are not shipped)")
        from edge_llama.engine import create_engine
        from edge_llama.safety.llama_guard import LlamaGuardHook

        engine = create_engine(config.llama_guard)
        engine.load()
        return LlamaGuardHook(engine)
    if ":" not in spec:
        raise ConfigError(f"safety.hooks: {spec!r} is neither a built-in hook (offensive, injection, llama_guard) nor "
                          "'module:attribute'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"safety.hooks: cannot load {spec!r}: {exc}") from exc
    hook = obj() if isinstance(obj, type) else obj
    if not callable(getattr(hook, "scores", None)) or not isinstance(getattr(hook, "name", None), str):
        raise ConfigError(f"safety.hooks: {spec!r} has no `name` and `scores(texts, kind)`")
    return hook


MAX_SLICE_CHARS = 2000
INLINE_CHECK_CHARS = 8192  # longer texts are checked off the event loop (the classifiers take ~0.1 ms per KiB)


def word_windows(text: str, size: int) -> list[str]:
    """Windows of `size` words, a third shared between neighbours, so a phrase on a boundary is whole in one.

    Why: a bag-of-words score (L2-normalised TF-IDF) of one insult inside a long, clean text is diluted far
    below any threshold (measured: 1.00 alone, 0.11 inside 160 characters of clean text).
    """
    words = text.split()
    if len(words) <= size:
        return [text]
    step = max(1, size - size // 3)
    return [" ".join(words[i:i + size]) for i in range(0, len(words) - size // 3, step)]


def char_slices(text: str) -> list[str]:
    return [text[i:i + MAX_SLICE_CHARS] for i in range(0, len(text), MAX_SLICE_CHARS)]


class SafetyPolicy:
    """The configured hooks and rules; `check` returns the combined verdict for texts of one kind."""

    def __init__(self, config: SafetyConfig, hooks: list[Hook]) -> None:
        self.config = config
        self.hooks = hooks
        self._rules: dict[tuple[str, str], SafetyRule] = {}  # (category, kind) -> the first rule for them
        for rule in config.rules:
            for kind in rule.on:
                self._rules.setdefault((rule.category, kind), rule)
        self.slow = any(getattr(hook, "slow", False) for hook in hooks)
        self._users = 0  # leases held: checks and streams using this policy now
        self._idle = threading.Event()
        self._idle.set()

    @contextlib.contextmanager
    def lease(self) -> Iterator[SafetyPolicy]:
        """Hold the policy for a check or a stream: a reload closes a replaced policy only once every lease
        taken on it has ended (its hooks may hold a model, which closing frees)."""
        self._users += 1
        self._idle.clear()
        try:
            yield self
        finally:
            self._users -= 1
            if not self._users:
                self._idle.set()

    def close_when_idle(self) -> None:
        """Close once no lease is held (blocks: call it in a worker thread)."""
        self._idle.wait()
        self.close()

    @classmethod
    def from_config(cls, config: SafetyConfig) -> SafetyPolicy:
        return cls(config, [load_hook(spec, config) for spec in config.hooks] if config.enabled else [])

    @property
    def active(self) -> bool:
        return bool(self.hooks)

    def _applies(self, category: str, kind: Kind) -> bool:
        return (category, kind) in self._rules

    def _decide(self, category: str, score: float, kind: Kind) -> Action:
        rule = self._rules.get((category, kind))
        if rule is None:
            return "allow"
        if rule.block is not None and score >= rule.block:
            return "block"
        if rule.flag is not None and score >= rule.flag:
            return "flag"
        return "allow"

    def _pressure(self, category: str, score: float, kind: Kind) -> float:
        rule = self._rules.get((category, kind))
        if rule is None or rule.block is None:
            return 0.0
        return score / rule.block if rule.block > 0 else 1.0

    async def check_async(self, texts: Sequence[str], kind: Kind) -> Verdict:
        """`check` from the event loop: inline for fast hooks on short texts (a thread hop costs more than they
        do), in a worker thread when a hook is slow or the texts are long (a 1 MiB document takes ~100 ms)."""
        if self.slow or sum(len(t) for t in texts) > INLINE_CHECK_CHARS:
            return await asyncio.to_thread(self.check, texts, kind)
        return self.check(texts, kind)

    def close(self) -> None:
        """Free what hooks hold (a Llama Guard engine); called when a reload replaced this policy."""
        for hook in self.hooks:
            close = getattr(hook, "close", None)
            if close is not None:
                close()

    def check(self, texts: Sequence[str], kind: Kind) -> Verdict:
        """Each hook sees the texts cut the way it needs (`window_words`: overlapping word windows; otherwise
        slices of at most MAX_SLICE_CHARS); the verdict is the worst over all pieces and hooks."""
        verdict = Verdict()
        texts = [t for t in texts if t.strip()]
        if not texts:
            return verdict
        pressure = 0.0
        for hook in self.hooks:
            declared = getattr(hook, "categories", None)  # a hook that declares its categories is skipped
            if declared is not None and not any(self._applies(c, kind) for c in declared):  # where no rule uses them
                continue
            size = getattr(hook, "window_words", None)
            pieces = [p for t in texts for p in (word_windows(t, size) if size else char_slices(t))]
            try:
                results = hook.scores(pieces, kind)
            except Exception as exc:  # a broken hook must not silently let everything through
                action: Action = "block" if self.config.fail_mode == "closed" else "allow"
                log.error("safety hook %s failed (%s: %s): fail %s -> %s", hook.name, type(exc).__name__, exc,
                          self.config.fail_mode, action, extra={"SAFETY_HOOK": hook.name, "SAFETY_ACTION": action})
                verdict = verdict.merge(Verdict(action, {}, [hook.name], f"{hook.name}: {type(exc).__name__}"))
                pressure = 1.0
                continue
            for scores in results:
                for category, score in scores.items():
                    pressure = max(pressure, self._pressure(category, score, kind))
                    action = self._decide(category, score, kind)
                    if action != "allow":
                        verdict = verdict.merge(Verdict(action, {category: score}, [hook.name]))
        verdict.pressure = pressure
        return verdict
