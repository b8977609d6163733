"""Summarization of text far longer than the KV budget: split, summarize each chunk (map), combine (reduce).

Chunks end on paragraph boundaries, else sentence boundaries, else word boundaries, and each fits the budget
with room for the instruction and the reply. Partial summaries are combined as soon as they would no longer fit
one prompt, so what is held stays bounded by the budget however long the document is (the document itself
arrives as one request line and is only sliced, never copied per chunk list). Each engine call takes its own
turn, so chats are not starved by a long summary; `progress` events count the engine calls.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edge_llama.engine.base import GenParams
from edge_llama.errors import ContextOverflow
from edge_llama.protocol import Message, SummarizeRequest, done_event, progress_event, token_event
from edge_llama.safety.hooks import Verdict
from edge_llama.service.handlers import Handlers, Send
from edge_llama.service.scheduler import CancelToken

PARAGRAPH = re.compile(r"\n\s*\n")
SENTENCE = re.compile(r"(?<=[.!?;:])\s+")
WORD = re.compile(r"\s+")
SAFETY_TOKENS = 16  # slack for tokens merging differently at chunk joins
TEMPERATURE = 0.2  # summaries should stick to the text
INPUT_SLICE = 2000  # characters per input safety check of a document


def spans(text: str, limit: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """(start, end) offsets of chunks of `text`, each at most `limit` tokens, cut at the coarsest boundary."""
    out: list[tuple[int, int]] = []
    start = end = None
    used = 0
    for piece_start, piece_end, tokens in _pieces(text, 0, len(text), limit, count, (PARAGRAPH, SENTENCE, WORD)):
        n = tokens + 1  # + the separator joining it to the previous piece
        if start is not None and used + n > limit:
            out.append((start, end))  # type: ignore[arg-type]
            start = None
        if start is None:
            start, used = piece_start, 0
        end = piece_end
        used += n
    if start is not None:
        out.append((start, end))  # type: ignore[arg-type]
    return out


def _pieces(text: str, lo: int, hi: int, limit: int, count: Callable[[str], int],
            separators: tuple[re.Pattern[str], ...]) -> Iterator[tuple[int, int, int]]:
    """(start, end, tokens) of pieces of text[lo:hi] no longer than `limit` tokens, split by the first separator
    that is needed."""
    tokens = count(text[lo:hi])
    if tokens <= limit:
        if text[lo:hi].strip():
            yield lo, hi, tokens
        return
    if not separators:  # one "word" longer than the budget (e.g. a base64 blob): cut by characters
        step = max(1, (hi - lo) * limit // tokens // 2)
        for s in range(lo, hi, step):
            yield from _pieces(text, s, min(hi, s + step), limit, count, ())
        return
    sep, rest = separators[0], separators[1:]
    pos = lo
    for m in sep.finditer(text, lo, hi):
        yield from _pieces(text, pos, m.start(), limit, count, rest)
        pos = m.end()
    yield from _pieces(text, pos, hi, limit, count, rest)


@dataclass
class Step:
    """What one engine call of a summary gave: its text, why it ended, and its timings for `done`."""

    text: str
    finish: str
    timings: dict[str, float]


class Summarizer:
    """One summarize request. Map: each chunk of the document is summarized on its own. Reduce: partial summaries
    are combined as soon as they would no longer fit one prompt, and once more at the end (the final step, the
    only one streamed to the client and passed through the output guard)."""

    def __init__(self, h: Handlers, req: SummarizeRequest, cancel: CancelToken, received: float, send: Send
                 ) -> None:
        self.h, self.req, self.cancel, self.received, self.send = h, req, cancel, received, send
        cfg = h.config.summarize
        kv = h.engine.capacity.kv_tokens
        self.final_tokens = h.reply_budget(req.max_tokens, cfg.summary_tokens)
        if self.final_tokens > kv // 2:
            raise ContextOverflow(f"max_tokens {self.final_tokens} leaves no room for text in a KV budget of {kv} "
                                  "tokens")
        self.step_tokens = min(cfg.summary_tokens, kv // 4)
        self.style = " Answer as a short bulleted list." if req.style == "bullets" else ""
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self.verdicts: list[Verdict] = []
        self.queue_ms: float | None = None  # of the first engine turn
        self.done = self.total = 0
        overhead = len(h.template.tokenize([Message("user", cfg.instruction + "\n\n")], h.engine.tokenize))
        self.limit = kv - max(self.step_tokens, self.final_tokens) - overhead - SAFETY_TOKENS  # tokens of text

    def count(self, text: str) -> int:
        return self.h.engine.count_tokens(text)  # contents are plain text in prompts

    async def run(self) -> None:
        h, text = self.h, self.req.text
        # The document is input too (an injection hidden in it is the classic case): checked in slices.
        self.verdicts.append(await h.check_input([text[i:i + INPUT_SLICE] for i in range(0, len(text), INPUT_SLICE)],
                                                 self.req.id))
        chunks = await h.scheduler.call(spans, text, self.limit, self.count)  # tokenizing a long text: off the loop
        self.total = len(chunks) + (1 if len(chunks) > 1 else 0)
        await self.send(progress_event(self.req.id, 0, self.total))
        if len(chunks) == 1:
            start, end = chunks[0]
            step = await self.step(self.h.config.summarize.instruction + self.style, text[start:end], final=True)
            return await self.finish(step, len(chunks))
        pending: list[str] = []  # partial summaries not yet combined; always fits one prompt
        for start, end in chunks:
            step = await self.map(text[start:end])
            if step.finish == "cancelled":  # a partial summary of one chunk is no answer
                return await self.finish(Step("", step.finish, step.timings), len(chunks))
            if pending and self.count("\n\n".join([*pending, step.text])) > self.limit:
                combined = await self.reduce(pending, final=False)
                if combined.finish == "cancelled":
                    return await self.finish(Step("", combined.finish, combined.timings), len(chunks))
                pending = [combined.text]
            pending.append(step.text)
        await self.finish(await self.reduce(pending, final=True), len(chunks))

    async def map(self, chunk: str) -> Step:
        return await self.step(self.h.config.summarize.instruction, chunk, final=False)

    async def reduce(self, summaries: list[str], final: bool) -> Step:
        """Combine partial summaries; an intermediate combine is not a progress step (its count is not known in
        advance)."""
        instruction = self.h.config.summarize.combine_instruction + (self.style if final else "")
        return await self.step(instruction, "\n\n".join(summaries), final=final, counted=final)

    async def step(self, instruction: str, body: str, final: bool, counted: bool = True) -> Step:
        h, req = self.h, self.req
        max_tokens = self.final_tokens if final else self.step_tokens
        prompt = await h.fit([Message("user", f"{instruction}\n\n{body}")], max_tokens)
        params = GenParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=0.9, seed=0)

        async def stream(piece: str) -> None:
            await self.send(token_event(req.id, piece))

        turn = await h.run(prompt, params, self.cancel, self.received, stream if final and req.stream else None,
                           guarded=final, request_id=req.id)
        outcome, timings = turn.outcome, turn.timings
        self.verdicts.append(turn.verdict)
        if self.queue_ms is None:
            self.queue_ms = timings["queue_ms"]
        self.usage["prompt_tokens"] += len(prompt.ids)
        self.usage["completion_tokens"] += outcome.completion_tokens
        if counted and outcome.finish not in ("cancelled", "safety"):
            self.done += 1
            await self.send(progress_event(req.id, self.done, self.total))
        return Step(outcome.text.strip(), outcome.finish, timings)

    async def finish(self, step: Step, chunks: int) -> None:
        combined = Verdict()
        for verdict in self.verdicts:
            combined = combined.merge(verdict)
        await self.send(done_event(
            self.req.id, text=None if self.req.stream else step.text, finish_reason=step.finish, usage=self.usage,
            timings={**step.timings, "queue_ms": self.queue_ms},  # engine figures of the last step
            chunks=chunks, safety=self.h.safety_report(combined),
        ))


async def summarize(h: Handlers, req: SummarizeRequest, cancel: CancelToken, received: float, send: Send) -> None:
    await Summarizer(h, req, cancel, received, send).run()
