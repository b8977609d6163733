"""What each request op does: chat (with sessions and the context policy), health and stats.

Handlers raise `EdgeLlamaError`s; the server turns them into `error` lines. A handler that returns has sent
exactly one `done` line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge_llama import __version__, jetson
from edge_llama.config import Config
from edge_llama.engine.base import GenParams
from edge_llama.errors import BadRequest, Cancelled, SafetyBlocked
from edge_llama.prompting.context import FittedPrompt, fit_prompt
from edge_llama.prompting.template import ChatTemplate
from edge_llama.protocol import ChatRequest, InfoRequest, Message, done_event, token_event
from edge_llama.safety.guard import StreamGuard
from edge_llama.safety.hooks import SafetyPolicy, Verdict
from edge_llama.service.metrics import DECODE_BUCKETS_TOK_S, TTFT_BUCKETS_S, Buckets
from edge_llama.service.scheduler import CancelToken, Outcome, Scheduler
from edge_llama.service.sessions import SessionStore

log = logging.getLogger("edge_llama.safety")
INLINE_TOKENIZE_CHARS = 16384  # prompts longer than this are tokenized in a worker thread (~1 ms per 10 KiB)

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Stats:
    started: float = field(default_factory=time.monotonic)
    requests: Counter[str] = field(default_factory=Counter)  # by op
    errors: Counter[str] = field(default_factory=Counter)  # by code
    finish: Counter[str] = field(default_factory=Counter)  # by finish_reason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_timings: dict[str, float] = field(default_factory=dict)
    loop_max_stall_ms: float = 0.0  # the event loop's worst wake-up delay since start (daemon's loop monitor)
    # For GET /metrics (service/metrics.py): histograms, HTTP outcomes, safety verdicts, the running turn's KV use.
    ttft_s: Buckets = field(default_factory=lambda: Buckets(TTFT_BUCKETS_S))
    decode_tok_s: Buckets = field(default_factory=lambda: Buckets(DECODE_BUCKETS_TOK_S))
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (op, finish reason or error code)
    verdicts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (kind, action, category)
    kv_in_use: int = 0  # prompt + generated tokens of the engine turn running now

    def record(self, prompt_tokens: int, outcome: Outcome, timings: dict[str, float]) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += outcome.completion_tokens
        self.finish[outcome.finish] += 1
        self.last_timings = timings
        if outcome.completion_tokens:
            self.ttft_s.observe(outcome.ttft_ms / 1000)
        if outcome.decode_tok_s:
            self.decode_tok_s.observe(outcome.decode_tok_s)


class Handlers:
    def __init__(self, config: Config, scheduler: Scheduler, template: ChatTemplate, sessions: SessionStore,
                 safety: SafetyPolicy) -> None:
        self.config = config
        self.safety = safety
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.template = template
        self.sessions = sessions
        self.stats = Stats()
        self.state = "starting"
        self.on_jetson = jetson.is_jetson()  # health then reports the power mode and the hottest thermal zone

    # --- shared by chat and summarize ----------------------------------------------------------------------
    def reply_budget(self, requested: int | None, default: int) -> int:
        """The request's max_tokens (checked against the ceiling), else the default capped at a quarter of
        the KV budget so a small budget still leaves room for the prompt."""
        ceiling = self.config.generation.max_tokens_ceiling
        if requested is not None and requested > ceiling:
            raise BadRequest(f"max_tokens {requested} is above this daemon's ceiling of {ceiling}")
        return requested or min(default, self.engine.capacity.kv_tokens // 4)

    async def fit(self, messages: list[Message] | tuple[Message, ...], reserve: int) -> FittedPrompt:
        """The prompt that fits the KV budget. Long conversations are tokenized off the event loop (a 1 MiB
        message takes ~100 ms); short ones inline, where a thread hop would cost more than the work."""
        def fit() -> FittedPrompt:
            return fit_prompt(self.template, self.engine.tokenize, messages, reserve, self.engine.capacity.kv_tokens)

        if sum(len(m.content) for m in messages) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(fit)
        return fit()

    async def check_input(self, texts: list[str], request_id: str) -> Verdict:
        """Input hooks: a block answers `safety_blocked` before the model runs."""
        if not self.safety.active:
            return Verdict()
        verdict = await self.safety.check_async(texts, "input")
        self.log_verdict(verdict, "input", request_id, texts)
        if verdict.action == "block":
            raise SafetyBlocked(self.safety.config.refusal)
        return verdict

    def log_verdict(self, verdict: Verdict, kind: str, request_id: str, texts: list[str]) -> None:
        if verdict.action == "allow" and not verdict.error:
            return
        for category in verdict.categories or ("none",):  # "none": a hook failed and its fail mode applied
            self.stats.verdicts[kind, verdict.action, category] += 1
        fields = {"REQUEST_ID": request_id, "SAFETY_KIND": kind, "SAFETY_ACTION": verdict.action,
                  "SAFETY_CATEGORIES": ",".join(f"{k}={v:.3f}" for k, v in verdict.categories.items()),
                  "SAFETY_HOOKS": ",".join(verdict.hooks)}
        if self.safety.config.log_texts:
            fields["SAFETY_TEXT"] = " | ".join(texts)[:2000]
        log.warning("safety %s %s on %s", verdict.action, fields["SAFETY_CATEGORIES"] or verdict.error, kind,
                    extra=fields)

    async def run(
        self, prompt: FittedPrompt, params: GenParams, cancel: CancelToken, received: float,
        on_text: Callable[[str], Awaitable[None]] | None, guarded: bool = True, request_id: str = "",
    ) -> tuple[Outcome, dict[str, float], Verdict]:
        """One engine turn through the streaming guard (when safety is on and `guarded`). Returns the outcome
        (its text: what passed the guard; finish "safety" on a block), the timings for `done`, the verdict."""
        guard = StreamGuard(self.safety) if guarded and self.safety.active else None

        async def emit(text: str, tokens: int) -> None:
            self.stats.kv_in_use += tokens
            if guard is not None:
                text = await guard.feed(text, tokens)
                if guard.blocked:
                    cancel.cancel(Cancelled("stopped by the safety guard"))
            if text and on_text is not None:
                await on_text(text)

        async with self.scheduler.turn(cancel):
            queue_ms = (time.monotonic() - received) * 1000
            self.stats.kv_in_use = len(prompt.ids)
            try:
                outcome = await self.scheduler.generate(prompt.ids, params, cancel, emit)
            finally:
                self.stats.kv_in_use = 0
        verdict = Verdict()
        if guard is not None:
            if outcome.finish != "cancelled" or guard.blocked:
                tail = await guard.finish(outcome.text)
                if tail and on_text is not None:
                    await on_text(tail)
            verdict = guard.verdict
            self.log_verdict(verdict, "output", request_id, [outcome.text])
            outcome.text = "".join(guard.released)
            if guard.blocked:
                outcome.finish = "safety"
        timings = {"queue_ms": round(queue_ms, 2), "ttft_ms": outcome.ttft_ms, "decode_tok_s": outcome.decode_tok_s}
        self.stats.record(len(prompt.ids), outcome, timings)
        return outcome, timings, verdict

    # --- chat ----------------------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, cancel: CancelToken, received: float, send: Send) -> None:
        gen = self.config.generation
        max_tokens = self.reply_budget(req.max_tokens, gen.max_tokens)
        params = GenParams(
            max_tokens=max_tokens,
            temperature=gen.temperature if req.temperature is None else req.temperature,
            top_p=gen.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        input_verdict = await self.check_input([m.content for m in req.messages if m.role != "assistant"], req.id)
        if req.session is None:
            prompt, outcome, timings, verdict = await self._reply(req, list(req.messages), params, cancel, received,
                                                                  send)
        else:
            async with self.sessions.lock(req.session):
                history = await asyncio.to_thread(self.sessions.load, req.session)
                new_system = [m for m in req.messages if m.role == "system"]
                if new_system:  # a system message sent to a session replaces the stored one
                    history = [m for m in history if m.role != "system"]
                others = [m for m in req.messages if m.role != "system"]
                conversation = new_system + history + others
                prompt, outcome, timings, verdict = await self._reply(req, conversation, params, cancel, received,
                                                                      send)
                # Saved before `done`: a client that saw `done` can rely on it, even after a crash. A turn whose
                # answer was blocked or cancelled before any text is not kept.
                if outcome.text and outcome.finish != "safety":
                    await asyncio.to_thread(self.sessions.save, req.session,
                                            conversation + [Message("assistant", outcome.text)])
        await send(done_event(
            req.id,
            text=None if req.stream else outcome.text,
            finish_reason=outcome.finish,
            usage={"prompt_tokens": len(prompt.ids), "completion_tokens": outcome.completion_tokens},
            timings=timings,
            truncated=prompt.truncated,
            session=req.session,
            safety=self.safety_report(input_verdict.merge(verdict)),
        ))

    async def _reply(
        self, req: ChatRequest, conversation: list[Message], params: GenParams, cancel: CancelToken,
        received: float, send: Send,
    ) -> tuple[FittedPrompt, Outcome, dict[str, float], Verdict]:
        system_prompt = self.config.generation.system_prompt
        if system_prompt and (not conversation or conversation[0].role != "system"):
            conversation = [Message("system", system_prompt)] + conversation
        prompt = await self.fit(conversation, params.max_tokens)

        async def stream(text: str) -> None:
            await send(token_event(req.id, text))

        outcome, timings, verdict = await self.run(prompt, params, cancel, received, stream if req.stream else None,
                                                   request_id=req.id)
        return prompt, outcome, timings, verdict

    def safety_report(self, verdict: Verdict) -> dict[str, Any] | None:
        """`done.safety`: present when something was flagged or blocked (with the refusal text on a block)."""
        if verdict.action == "allow" and not verdict.error:
            return None
        report = verdict.as_dict()
        if verdict.action == "block":
            report["refusal"] = self.safety.config.refusal
        return report

    # --- health / stats ------------------------------------------------------------------------------------
    def info(self, req: InfoRequest) -> dict[str, Any]:
        cap = self.engine.capacity
        fault = self.scheduler.fault()
        base: dict[str, Any] = {
            "state": "faulted" if fault and self.state == "ready" else self.state,
            "version": __version__,
            "protocol": 1,
            "backend": self.engine.name,
            "model": self.engine.model_name,
            "kv_tokens": cap.kv_tokens,
            "max_seq_len": cap.max_seq_len,
            "queue": {"admitted": self.scheduler.admitted, "waiting": self.scheduler.waiting,
                      "limit": self.scheduler.max_queue + 1},
            "uptime_s": round(time.monotonic() - self.stats.started, 1),
        }
        if fault:
            base["fault"] = fault
        if self.on_jetson:
            base.update(jetson.power_and_thermal())
        if req.op == "stats":
            s = self.stats
            base.update(
                requests=dict(s.requests), errors=dict(s.errors), finish_reasons=dict(s.finish),
                tokens={"prompt": s.prompt_tokens, "completion": s.completion_tokens},
                last_timings=s.last_timings, template=self.template.name,
                loop={"max_stall_ms": round(s.loop_max_stall_ms, 2)},
            )
        return done_event(req.id, **base)
