"""User-defined hooks loaded by the daemon as `safety_hooks:NAME` in tests (tests/ is on PYTHONPATH)."""

from __future__ import annotations


class Exploding:
    name = "exploding"

    def scores(self, texts, kind):  # type: ignore[no-untyped-def]
        raise RuntimeError("classifier crashed")


class KeywordHook:
    """Scores 1.0 for category `keyword` when a text contains 'forbidden-word'."""

    name = "keyword"

    def scores(self, texts, kind):  # type: ignore[no-untyped-def]
        return [{"keyword": 1.0 if "forbidden-word" in t else 0.0} for t in texts]


class SlowKeywordHook(KeywordHook):
    """KeywordHook that takes 0.6 s per check, as a model-based classifier can; declared slow."""

    name = "slow_keyword"
    slow = True

    def scores(self, texts, kind):  # type: ignore[no-untyped-def]
        import time

        time.sleep(0.6)
        return super().scores(texts, kind)


class ExplodingHook:
    """A hook whose constructor fails with something other than an EdgeLlamaError (a missing model file, say)."""

    name = "exploding"

    def __init__(self) -> None:
        raise RuntimeError("the hook's model is missing")

    def scores(self, texts, kind):  # type: ignore[no-untyped-def]
        return [{} for _ in texts]
