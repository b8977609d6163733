"""Tools in the prompt: how a conversation with tools reaches a chat template, in one of two call formats.

`ChatTemplate.tool_format` names the format the prompt asks the model for; structured/ constrains and parses
exactly these two:

- "llama3_json": Meta's Llama 3.x templates render the tools themselves (as JSON schemas in the first user
  message) and ask for one call as `{"name": <name>, "parameters": <object>}`. Past calls come back the same
  way under the assistant header, tool results under an `ipython` header. Meta's template refuses an assistant
  message with several calls ("This model only supports single tool-calls at once!"), so such a message is split
  first, each call followed by its own result (`one_call_per_message`).
- "tagged": the Hermes / Qwen2.5 convention. Templates that render tools this way themselves get them as they
  are; every other template (ChatML without tools, SmolLM2's, the fake engine's) gets the conversation rewritten
  by `as_tagged`: the generic tool preamble appended to the system message, past calls as `<tool_call>` blocks
  inside the assistant's content (structured/formats.py's format_call, one newline apart), and tool results as a
  user message of `<tool_response>` blocks. For a ChatML template this is the text Qwen2.5-Instruct's own
  template renders for a conversation with tools (plus one line, see tools_section), so the models most likely
  to know a tool convention without a template for it (ChatML-family fine-tunes) see the one they were trained
  on; the tags keep a tool's output apart from what the user wrote, and ChatML models know no `tool` role.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from edge_llama.protocol import Message, ToolSpec
from edge_llama.structured.formats import CallFormat, format_call

LLAMA3_JSON: CallFormat = "llama3_json"
TAGGED: CallFormat = "tagged"


def tools_section(tools: Sequence[ToolSpec]) -> str:
    """The generic tool preamble: Qwen2.5-Instruct's tool section, word for word (tools as tojson, one a line),
    plus one line for answering without a call (small models call a tool for "hi": Ollama issues #8152, #9947)."""
    schemas = "\n".join(json.dumps(t.as_dict(), ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{schemas}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n'
        "If no function is needed, answer normally, without <tool_call> tags."
    )


def response_block(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def as_tagged(messages: Sequence[Message], tools: Sequence[ToolSpec]) -> list[Message]:
    """The conversation for a template that cannot render tools: plain system/user/assistant messages only.

    The tool section goes at the end of the leading system message (after a blank line), or is the system
    message when there is none (a template's own default system prompt, like SmolLM2's, is then not shown).
    Consecutive tool results become one user message, one `<tool_response>` block each, in order."""
    out: list[Message] = []
    for n, m in enumerate(messages):
        if m.role == "tool":
            block = response_block(m.content)
            if n and messages[n - 1].role == "tool":
                out[-1] = Message("user", f"{out[-1].content}\n{block}")
            else:
                out.append(Message("user", block))
        elif m.tool_calls:
            parts = [m.content] if m.content else []
            calls = [format_call(TAGGED, c.name, c.arguments) for c in m.tool_calls]
            out.append(Message("assistant", "\n".join(parts + calls)))
        else:
            out.append(Message(m.role, m.content))
    if tools:
        section = tools_section(tools)
        if out and out[0].role == "system":
            system = out[0].content
            out[0] = Message("system", f"{system}\n\n{section}" if system.strip() else section)
        else:
            out.insert(0, Message("system", section))
    return out


def one_call_per_message(messages: Sequence[Message]) -> list[Message]:
    """Split every assistant message with several calls into one message per call, each followed by the tool
    result that answers it: the result whose tool_call_id is the call's id, else the next result not claimed by
    id (clients that send no ids answer in order). Results no call claims follow, in their order. The content of
    the split message stays on its first part (Meta's template shows no content beside a call)."""
    out: list[Message] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        i += 1
        if len(m.tool_calls) < 2:
            out.append(m)
            continue
        results: list[Message] = []
        while i < len(messages) and messages[i].role == "tool":
            results.append(messages[i])
            i += 1
        ids = {c.id for c in m.tool_calls}
        for n, call in enumerate(m.tool_calls):
            out.append(Message("assistant", m.content if n == 0 else "", (call,)))
            mine = next((r for r in results if r.tool_call_id == call.id), None)
            if mine is None:
                mine = next((r for r in results if r.tool_call_id not in ids), None)
            if mine is not None:
                results.remove(mine)
                out.append(mine)
        out.extend(results)
    return out
