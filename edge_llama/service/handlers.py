"""What each request op does: chat (with sessions, tools, structured output and the context policy), health and
stats. Summaries are service/summarize.py.

Handlers raise `EdgeLlamaError`s; the server turns them into `error` lines. A handler that returns has sent
exactly one `done` line.

The text of one engine turn goes through a pipeline before a client sees it: the request's stop strings (the
answer ends before the first), then the tool-call splitter (a call is never content: it is held and parsed),
then the streaming safety guard.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_llama import __version__, jetson
from edge_llama.config import Config
from edge_llama.engine.base import GenParams
from edge_llama.errors import BadRequest, Cancelled, SafetyBlocked
from edge_llama.prompting.context import FittedPrompt, fit_prompt
from edge_llama.prompting.template import ChatTemplate
from edge_llama.protocol import ChatRequest, InfoRequest, Message, ToolCall, ToolSpec, done_event, token_event
from edge_llama.safety.guard import StreamGuard
from edge_llama.safety.hooks import Kind, SafetyPolicy, Verdict
from edge_llama.service.metrics import Stats
from edge_llama.service.outputs import OutputPlan, Outputs, StopCutter
from edge_llama.service.scheduler import CancelToken, Outcome, Scheduler
from edge_llama.service.sessions import SessionStore

log = logging.getLogger("edge_llama.safety")
INLINE_TOKENIZE_CHARS = 16384  # prompts longer than this are tokenized in a worker thread (~1 ms per 10 KiB)

Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Turn:
    """One engine turn as the client sees it: its outcome (text: the released content; finish: "safety" on a
    block, "stop" at a stop string), the timings for `done`, the output verdict, and the tool calls it made."""

    outcome: Outcome
    timings: dict[str, float]
    verdict: Verdict
    calls: list[ToolCall] = dataclasses.field(default_factory=list)


class Handlers:
    def __init__(self, config: Config, scheduler: Scheduler, template: ChatTemplate, sessions: SessionStore,
                 safety: SafetyPolicy) -> None:
        self.config = config
        self.safety = safety
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.template = template
        self.sessions = sessions
        self.outputs = Outputs(scheduler)
        self.stats = Stats()
        self.state = "starting"
        self.on_jetson = jetson.is_jetson()  # health then reports the power mode and the hottest thermal zone

    # --- shared by chat and summarize ----------------------------------------------------------------------
    def reply_budget(self, requested: int | None, default: int) -> int:
        """The request's max_tokens (checked against the ceiling), else the default capped at a quarter of
        the KV budget so a small budget still leaves room for the prompt."""
        ceiling = self.config.generation.max_tokens_ceiling
        if requested is not None and requested > ceiling:
            raise BadRequest(f"max_tokens {requested} is above this daemon's ceiling of {ceiling}", field="max_tokens")
        return requested or min(default, self.engine.capacity.kv_tokens // 4)

    async def fit(self, messages: Sequence[Message], reserve: int, tools: Sequence[ToolSpec] = ()) -> FittedPrompt:
        """The prompt that fits the KV budget. Long conversations are tokenized off the event loop (a 1 MiB
        message takes ~100 ms); short ones inline, where a thread hop would cost more than the work."""
        def fit() -> FittedPrompt:
            return fit_prompt(self.template, self.engine.tokenize, messages, reserve, self.engine.capacity.kv_tokens,
                              tools=tools)

        size = (sum(len(m.content) + sum(len(json.dumps(dict(c.arguments))) for c in m.tool_calls) for m in messages)
                + sum(len(json.dumps(t.as_dict())) for t in tools))
        if size > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(fit)
        return fit()

    async def check_input(self, texts: list[str], request_id: str, kind: Kind = "input") -> Verdict:
        """Input hooks (and, with kind "tool", the rules for tools' results): a block answers `safety_blocked`
        before the model runs."""
        policy = self.safety
        if not policy.active or not texts:
            return Verdict()
        with policy.lease():
            verdict = await policy.check_async(texts, kind)
        self.log_verdict(verdict, kind, request_id, texts)
        if verdict.action == "block":
            what = "a tool's result was refused (it reads like a prompt injection): " if kind == "tool" else ""
            raise SafetyBlocked(what + policy.config.refusal)
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
        stops: Sequence[str] = (), plan: OutputPlan | None = None,
    ) -> Turn:
        """One engine turn through the text pipeline: stop strings, the tool-call splitter (with `plan`), and the
        streaming guard (when safety is on and `guarded`)."""
        policy = self.safety
        with policy.lease():  # the guard uses this policy until the end, even if a reload replaces it meanwhile
            return await self._run(policy, prompt, params, cancel, received, on_text, guarded, request_id, stops,
                                   plan)

    async def _run(
        self, policy: SafetyPolicy, prompt: FittedPrompt, params: GenParams, cancel: CancelToken, received: float,
        on_text: Callable[[str], Awaitable[None]] | None, guarded: bool, request_id: str, stops: Sequence[str],
        plan: OutputPlan | None,
    ) -> Turn:
        guard = StreamGuard(policy) if guarded and policy.active else None
        cutter = StopCutter(stops) if stops else None
        splitter = plan.splitter() if plan is not None else None
        content: list[str] = []  # what went into the guard (or out, without one): the answer's text

        async def deliver(text: str, tokens: int, split: bool = True) -> None:
            """`text` from the engine (split: through the splitter first), or content the splitter held."""
            if splitter is not None and split:
                text = splitter.feed(text)
            content.append(text)
            if guard is not None:
                text = await guard.feed(text, tokens)
                if guard.blocked:
                    cancel.cancel(Cancelled("stopped by the safety guard"))
            if text and on_text is not None:
                await on_text(text)

        async def emit(text: str, tokens: int) -> None:
            self.stats.kv_in_use += tokens
            if cutter is not None:
                text = cutter.feed(text)
                if cutter.stopped:
                    cancel.cancel(Cancelled("a stop string was reached"))
            await deliver(text, tokens)

        async with self.scheduler.turn(cancel):
            queue_ms = (time.monotonic() - received) * 1000
            self.stats.kv_in_use = len(prompt.ids)
            try:
                outcome = await self.scheduler.generate(prompt.ids, params, cancel, emit)
            finally:
                self.stats.kv_in_use = 0
        if cutter is not None:
            if cutter.stopped and outcome.finish == "cancelled":
                outcome.finish = "stop"  # ended by a stop string, not by the client
            elif outcome.finish != "cancelled":
                await deliver(cutter.flush(), 0)
        calls: list[ToolCall] = []
        if splitter is not None and outcome.finish not in ("cancelled", "safety"):
            released = sum(map(len, content))
            split = splitter.finish()
            await deliver(split.content[released:], 0, split=False)  # content the splitter held until the end
            calls = list(split.tool_calls)
            if split.cut:  # the reply budget ended inside the structure: no half (or partial set of) calls
                outcome.finish, calls = "length", []
            elif split.problem:
                log.warning("request %s: %s", request_id, split.problem, extra={"REQUEST_ID": request_id})
        text = "".join(content)
        verdict = Verdict()
        if guard is not None:
            if outcome.finish != "cancelled" or guard.blocked:
                tail = await guard.finish(text)
                if tail and on_text is not None:
                    await on_text(tail)
            verdict = guard.verdict
            self.log_verdict(verdict, "output", request_id, [text])
            text = "".join(guard.released)
            if calls and not guard.blocked:  # a call's arguments are the model's words too
                verdict = verdict.merge(await self._check_calls(policy, calls, request_id))
            if guard.blocked or verdict.action == "block":
                outcome.finish, calls = "safety", []
        outcome.text = text
        timings = {"queue_ms": round(queue_ms, 2), "ttft_ms": outcome.ttft_ms, "decode_tok_s": outcome.decode_tok_s}
        self.stats.record(len(prompt.ids), outcome, timings)
        return Turn(outcome, timings, verdict, calls)

    async def _check_calls(self, policy: SafetyPolicy, calls: list[ToolCall], request_id: str) -> Verdict:
        texts = [json.dumps(dict(c.arguments), ensure_ascii=False) for c in calls]
        verdict = await policy.check_async(texts, "output")
        self.log_verdict(verdict, "output", request_id, texts)
        return verdict

    # --- chat ----------------------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest, cancel: CancelToken, received: float, send: Send,
                   owner: int = 0) -> None:
        """`owner`: the peer's uid, whose namespace `req.session` is in."""
        gen = self.config.generation
        plan = await self.outputs.plan(req)  # checks tools, tool_choice and schemas before anything runs
        params = GenParams(
            max_tokens=self.reply_budget(req.max_tokens, gen.max_tokens),
            temperature=gen.temperature if req.temperature is None else req.temperature,
            top_p=gen.top_p if req.top_p is None else req.top_p,
            seed=req.seed,
        )
        input_verdict = await self.check_input([m.content for m in req.messages if m.role in ("system", "user")],
                                               req.id)
        input_verdict = input_verdict.merge(await self.check_input(
            [m.content for m in req.messages if m.role == "tool"], req.id, kind="tool"))
        if req.session is None:
            conversation = list(req.messages)
            check_tool_results((), req.messages)
            prompt, turn = await self._reply(req, conversation, params, plan, cancel, received, send)
        else:
            async with self.sessions.lock(owner, req.session):
                history = await asyncio.to_thread(self.sessions.load, owner, req.session)
                new_system = [m for m in req.messages if m.role == "system"]
                if new_system:  # a system message sent to a session replaces the stored one
                    history = [m for m in history if m.role != "system"]
                others = [m for m in req.messages if m.role != "system"]
                conversation = new_system + history + others
                check_tool_results(history, req.messages)
                prompt, turn = await self._reply(req, conversation, params, plan, cancel, received, send)
                # Saved before `done`: a client that saw `done` can rely on it, even after a crash. A turn whose
                # answer was blocked or cancelled before any text is not kept; a tool call is kept (its results
                # come in the next request).
                if (turn.outcome.text or turn.calls) and turn.outcome.finish != "safety":
                    answer = Message("assistant", turn.outcome.text, tuple(turn.calls))
                    await asyncio.to_thread(self.sessions.save, owner, req.session, conversation + [answer])
        await send(done_event(
            req.id,
            text=None if req.stream else turn.outcome.text,
            finish_reason="tool_calls" if turn.calls else turn.outcome.finish,
            tool_calls=[c.wire() for c in turn.calls] or None,
            usage={"prompt_tokens": len(prompt.ids), "completion_tokens": turn.outcome.completion_tokens},
            timings=turn.timings,
            truncated=prompt.truncated,
            session=req.session,
            safety=self.safety_report(input_verdict.merge(turn.verdict)),
        ))

    async def _reply(
        self, req: ChatRequest, conversation: list[Message], params: GenParams, plan: OutputPlan | None,
        cancel: CancelToken, received: float, send: Send,
    ) -> tuple[FittedPrompt, Turn]:
        system_prompt = self.config.generation.system_prompt
        if system_prompt and (not conversation or conversation[0].role != "system"):
            conversation = [Message("system", system_prompt)] + conversation
        prompt = await self.fit(conversation, params.max_tokens, plan.prompt_tools if plan else ())
        if plan is not None:
            params = dataclasses.replace(params, constraint=plan.constraint())

        async def stream(text: str) -> None:
            await send(token_event(req.id, text))

        turn = await self.run(prompt, params, cancel, received, stream if req.stream else None, request_id=req.id,
                              stops=req.stop, plan=plan)
        return prompt, turn

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
            cache = self.engine.prompt_cache_stats()
            if cache is not None:
                base["prompt_cache"] = cache
        return done_event(req.id, **base)


def check_tool_results(history: Sequence[Message], new: Sequence[Message]) -> None:
    """Each tool message the request sends must answer a call an earlier assistant message made, once."""
    calls = {c.id for m in history for c in m.tool_calls}
    answered = {m.tool_call_id for m in history if m.role == "tool"}
    for i, m in enumerate(new):
        calls.update(c.id for c in m.tool_calls)
        if m.role != "tool":
            continue
        if m.tool_call_id not in calls or m.tool_call_id in answered:
            why = "was already answered" if m.tool_call_id in answered else "no earlier call made"
            raise BadRequest(f"messages[{i}] (role tool) answers tool_call_id {m.tool_call_id!r}, which {why}",
                             field=f"messages[{i}].tool_call_id")
        answered.add(m.tool_call_id)
