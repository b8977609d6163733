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

from edge_llama.engine.base import GenParams
from edge_llama.errors import ContextOverflow
from edge_llama.protocol import Message, SummarizeRequest, done_event, progress_event, token_event
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


async def summarize(h: Handlers, req: SummarizeRequest, cancel: CancelToken, received: float, send: Send) -> None:
    cfg = h.config.summarize
    kv = h.engine.capacity.kv_tokens
    final_tokens = h.reply_budget(req.max_tokens, cfg.summary_tokens)
    if final_tokens > kv // 2:
        raise ContextOverflow(f"max_tokens {final_tokens} leaves no room for text in a KV budget of {kv} tokens")
    step_tokens = min(cfg.summary_tokens, kv // 4)
    overhead = len(h.template.tokenize([Message("user", cfg.instruction + "\n\n")], h.engine.tokenize))
    limit = kv - max(step_tokens, final_tokens) - overhead - SAFETY_TOKENS
    count = lambda s: len(h.engine.tokenize(s, special=False))  # noqa: E731 - contents are plain text in prompts
    text = req.text
    # The document is input too (an injection hidden in it is the classic case): checked in slices.
    input_verdict = await h.check_input([text[i:i + INPUT_SLICE] for i in range(0, len(text), INPUT_SLICE)], req.id)
    verdicts: list = []
    chunks = await h.scheduler.call(spans, text, limit, count)  # tokenizing a long text: off the event loop
    total = len(chunks) + (1 if len(chunks) > 1 else 0)
    style = " Answer as a short bulleted list." if req.style == "bullets" else ""
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    first_turn: dict[str, float] = {}
    done = 0

    async def step(instruction: str, body: str, max_tokens: int, final: bool, counted: bool = True
                   ) -> tuple[str, str, dict]:
        nonlocal done
        prompt = h.fit([Message("user", f"{instruction}\n\n{body}")], max_tokens)
        params = GenParams(max_tokens=max_tokens, temperature=TEMPERATURE, top_p=0.9, seed=0)

        async def stream(piece: str) -> None:
            await send(token_event(req.id, piece))

        outcome, timings, verdict = await h.run(prompt, params, cancel, received,
                                                stream if final and req.stream else None, guarded=final,
                                                request_id=req.id)
        verdicts.append(verdict)
        first_turn.setdefault("queue_ms", timings["queue_ms"])
        usage["prompt_tokens"] += len(prompt.ids)
        usage["completion_tokens"] += outcome.completion_tokens
        if counted and outcome.finish not in ("cancelled", "safety"):
            done += 1
            await send(progress_event(req.id, done, total))
        return outcome.text.strip(), outcome.finish, timings

    async def finish(text: str, reason: str, timings: dict[str, float]) -> None:
        combined = input_verdict
        for verdict in verdicts:
            combined = combined.merge(verdict)
        await send(done_event(
            req.id, text=None if req.stream else text, finish_reason=reason, usage=usage,
            timings={**timings, "queue_ms": first_turn["queue_ms"]},  # engine figures of the last step
            chunks=len(chunks), safety=h.safety_report(combined),
        ))

    await send(progress_event(req.id, 0, total))
    if len(chunks) == 1:
        start, end = chunks[0]
        summary, reason, timings = await step(cfg.instruction + style, text[start:end], final_tokens, final=True)
        await finish(summary, reason, timings)
        return

    pending: list[str] = []  # partial summaries not yet combined; always fits one prompt
    for start, end in chunks:
        summary, reason, timings = await step(cfg.instruction, text[start:end], step_tokens, final=False)
        if reason == "cancelled":
            await finish("", reason, timings)
            return
        if pending and count("\n\n".join(pending + [summary])) > limit:
            combined, reason, timings = await step(cfg.combine_instruction, "\n\n".join(pending), step_tokens,
                                                   final=False, counted=False)
            if reason == "cancelled":
                await finish("", reason, timings)
                return
            pending = [combined]
        pending.append(summary)
    summary, reason, timings = await step(cfg.combine_instruction + style, "\n\n".join(pending), final_tokens,
                                          final=True)
    await finish(summary, reason, timings)
