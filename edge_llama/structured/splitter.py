"""The daemon's side of a structured reply: which streamed text is content and which is tool calls.

The Splitter reads the text the daemon streams (feed), releases what is content as soon as it cannot be the start
of a call, holds back what could still be (the same triggers as the constraint: formats.py), and at the end
(finish) gives the content and the calls. A call is never released as content; a call naming a tool outside the
plan's is never returned; a reply that ended inside a call (its token budget ran out) says so in `cut` and returns
no partial call.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from edge_llama.protocol import ToolCall
from edge_llama.structured import formats
from edge_llama.structured.plan import Plan


@dataclass(frozen=True)
class Reply:
    """A finished reply: content, the complete calls, and what went wrong with the structured part, if anything.

    `problem` is None when the structured part is whole and valid. Otherwise it says why (e.g. "the reply ended
    inside a tool call"): the daemon must not present the broken part as a valid call or as valid JSON content.
    `cut` is true when the text simply ran out inside it (the daemon reports finish "length")."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    problem: str | None = None
    cut: bool = False


def new_call_id() -> str:
    """OpenAI's style of call id: "call_" and 24 hex digits."""
    return "call_" + secrets.token_hex(12)


class Splitter:
    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        # Lazy tools: content until a trigger. Otherwise the whole reply is the structure: kind "tools" is calls
        # only; "tools_or_json" is undecided until the end; "json" is content, released as it comes.
        self._in_calls = plan.kind != "json" and not plan.lazy
        self._held = ""  # lazy: an unfinished trigger at the end of the text so far; else the structure's text
        self._content: list[str] = []

    def feed(self, text: str) -> str:
        """The part of the text so far that is content and can be released now ("" while it is held)."""
        if self._plan.kind == "json":
            self._content.append(text)
            return text
        self._held += text
        if self._in_calls:
            return ""
        start = formats.find_trigger(self._held)
        if start is not None:
            self._in_calls = True
        else:
            start = formats.pending_trigger(self._held)
        if start is None:
            start = len(self._held)
        out, self._held = self._held[:start], self._held[start:]
        self._content.append(out)
        return out

    def finish(self) -> Reply:
        """The reply once its text has ended: content (all of it was released by feed, except for kinds "tools"
        and "tools_or_json" not lazy, which release nothing before this), calls, and any problem."""
        if self._plan.kind == "json":
            return _json_reply("".join(self._content))
        if not self._in_calls:  # free text that ended with what looked like the start of a call
            return Reply("".join(self._content) + self._held)
        parsed = formats.parse_calls(self._held, self._plan.tool_names)
        if self._plan.kind == "tools_or_json" and (parsed.problem or not parsed.calls):
            reply = _json_reply(self._held)
            if reply.problem is None:
                return reply
            # neither whole calls nor whole content: nothing of it is returned
            return Reply("", (), parsed.problem or reply.problem, parsed.cut or reply.cut)
        calls, problem = parsed.calls, parsed.problem
        if not self._plan.parallel and len(calls) > 1:
            calls, problem = calls[:1], problem or "several tool calls while parallel_tool_calls is false"
        return Reply("".join(self._content), tuple(ToolCall(new_call_id(), name, args) for name, args in calls),
                     problem, parsed.cut)


def _json_reply(text: str) -> Reply:
    """Content that must be one JSON value."""
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        if formats.cut_short(text, 0):
            return Reply(text, problem="the reply ended inside its JSON content", cut=True)
        return Reply(text, problem=f"the reply is not valid JSON: {exc.msg} at character {exc.pos}")
    return Reply(text)
