"""What a chat's reply may be, per request: free text, tool calls, JSON content (structured/ builds the grammars,
the token constraint and the splitter), and where it ends (stop strings).

The token trie constrained decoding needs (llguidance's tokenizer over the engine's whole vocabulary: ~1-2 s and
tens of MB for 128k tokens) is built once, on the first request that needs it, in a worker thread: a daemon whose
clients never ask for tools or JSON never pays for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_llama.engine.base import TokenConstraint
from edge_llama.errors import BadRequest
from edge_llama.protocol import ChatRequest, ToolSpec
from edge_llama.service.scheduler import Scheduler

if TYPE_CHECKING:
    from edge_llama.structured.constraint import Structurer
    from edge_llama.structured.plan import Plan
    from edge_llama.structured.splitter import Splitter


class StopCutter:
    """A reply's text up to the first of its stop strings (not included). A tail that could still become one is
    held back until the next piece shows it does not; `stopped` once one was reached."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self.held + text
        hits = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return pending[:min(hits)]
        keep = self._held_back(pending)
        self.held = pending[len(pending) - keep:] if keep else ""
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held

    def _held_back(self, text: str) -> int:
        """How many characters at the end of `text` could be the start of a stop string."""
        for n in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0


@dataclass(frozen=True)
class OutputPlan:
    """One request's output: the tools its prompt shows, and what its reply is constrained to (None: free)."""

    prompt_tools: tuple[ToolSpec, ...]
    plan: Plan | None
    structurer: Structurer | None

    def constraint(self) -> TokenConstraint | None:
        """A fresh constraint for one generation (it is stateful)."""
        if self.plan is None or self.structurer is None:
            return None
        return self.structurer.constraint(self.plan)

    def splitter(self) -> Splitter | None:
        """Where the reply can hold tool calls: what tells its text from its calls."""
        if self.plan is None or self.plan.kind == "json":
            return None
        from edge_llama.structured.splitter import Splitter

        return Splitter(self.plan)


class Outputs:
    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._structurer: asyncio.Future[Structurer] | None = None

    async def plan(self, req: ChatRequest) -> OutputPlan | None:
        """The request's output plan, None for plain text. Raises BadRequest naming the field at fault (a
        malformed schema, a tool_choice naming no tool...) before anything runs."""
        if not req.tools and req.tool_choice in ("auto", "none") and req.response_format is None:
            return None
        from edge_llama.structured.plan import plan_reply  # loaded by the first request with tools or a format

        plan = plan_reply(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format)
        prompt_tools = req.tools if req.tool_choice != "none" else ()
        if plan is None and not prompt_tools:
            return None
        return OutputPlan(tuple(prompt_tools), plan, await self.structurer() if plan is not None else None)

    async def structurer(self) -> Structurer:
        """The engine's token trie, built once (concurrent first requests wait for the same build)."""
        if self._structurer is None:
            self._structurer = asyncio.ensure_future(self._build())
        try:
            return await asyncio.shield(self._structurer)
        except BaseException:
            if self._structurer.done() and self._structurer.exception() is not None:
                self._structurer = None  # a failed build is tried again by the next request
            raise

    async def _build(self) -> Structurer:
        engine = self._scheduler.engine
        try:
            vocabulary: Any = await self._scheduler.call(engine.vocabulary)  # the engine's thread: it reads the model
        except NotImplementedError as exc:
            raise BadRequest(f"tools and JSON output need constrained decoding, which this engine cannot do: {exc}",
                             field="tools") from None
        from edge_llama.structured.constraint import Structurer

        return await asyncio.to_thread(Structurer, vocabulary)
