"""The KV-budget context policy (design.md): prompt tokens + reserved reply tokens <= KV budget.

System messages at the start are pinned, the newest turn is always kept, and whole older turns are dropped oldest
first. A turn is a user message with everything that follows it up to the next user message: the assistant's
answer, or its tool calls, their results (role `tool`) and the answer after them, so a call is never kept without
its result or the reverse. A conversation that ends with tool results is a tool round of its newest turn. The tool
definitions are rendered in every prompt and count in the budget; they are never cut. Nothing is ever cut inside
a message or inside the template's structure; what was dropped is reported, and when the newest turn alone cannot
fit the request fails with `context_overflow`. Never silent truncation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge_llama.errors import ContextOverflow
from edge_llama.prompting.template import ChatTemplate, Tokenize
from edge_llama.protocol import Message, ToolSpec


@dataclass(frozen=True)
class FittedPrompt:
    ids: list[int]  # the rendered prompt's token ids, generation prompt included
    messages: tuple[Message, ...]  # what was rendered
    dropped_messages: int
    dropped_tokens: int  # prompt tokens saved by dropping (full prompt length - fitted length)

    @property
    def truncated(self) -> dict[str, int] | None:
        if not self.dropped_messages:
            return None
        return {"messages": self.dropped_messages, "tokens": self.dropped_tokens}


def split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]]]:
    """Leading system messages, then turns: each starts at a user message (or stray assistant ones at first) and
    holds the assistant messages, tool calls and tool results after it."""
    i = 0
    while i < len(messages) and messages[i].role == "system":
        i += 1
    pinned = list(messages[:i])
    turns: list[list[Message]] = []
    for m in messages[i:]:
        if m.role == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return pinned, turns


def fit_prompt(
    template: ChatTemplate,
    tokenize: Tokenize,
    messages: Sequence[Message],
    reserve_tokens: int,
    kv_tokens: int,
    tools: Sequence[ToolSpec] = (),
) -> FittedPrompt:
    """Render as much of the conversation as fits `kv_tokens - reserve_tokens`, dropping whole old turns; the
    `tools` the model may call are in every rendering."""
    pinned, turns = split_turns(messages)
    limit = kv_tokens - reserve_tokens

    def render(drop: int) -> tuple[tuple[Message, ...], list[int]]:
        kept = tuple(pinned + [m for turn in turns[drop:] for m in turn])
        return kept, template.tokenize(kept, tokenize, tools=tools)

    kept, ids = render(0)
    if len(ids) <= limit:
        return FittedPrompt(ids, kept, 0, 0)
    full_len = len(ids)
    newest = len(turns) - 1
    kept, ids = render(newest)
    if len(ids) > limit:
        after = len(turns[-1]) - 1  # a tool round: the calls and results after the last user message
        what = f"the newest turn (the last user message and {after} after it)" if after else "the newest message"
        raise ContextOverflow(
            f"{what} needs {len(ids)} prompt tokens "
            f"({'system prompt and tool definitions' if tools else 'system prompt'} included) and "
            f"{reserve_tokens} are reserved for the reply, but the KV budget is {kv_tokens} tokens: "
            "shorten the message or ask for fewer max_tokens"
        )
    # Dropping more turns never lengthens the prompt: binary-search the fewest drops that fit, between
    # `fails` (0 drops did not fit) and `fits` (all but the newest turn dropped did), in O(log turns) renders.
    fails, fits, best = 0, newest, (kept, ids)
    while fits - fails > 1:
        mid = (fails + fits) // 2
        kept_mid, ids_mid = render(mid)
        if len(ids_mid) <= limit:
            fits, best = mid, (kept_mid, ids_mid)
        else:
            fails = mid
    kept, ids = best
    dropped_messages = sum(len(turn) for turn in turns[:fits])
    return FittedPrompt(ids, kept, dropped_messages, full_len - len(ids))
