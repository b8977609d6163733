"""What a tool call looks like in the model's text: the triggers that start one, the grammar of the calls, and
their parsing. The constraint (constraint.py) and the stream splitter (splitter.py) both take their definitions from
here, so the text that starts a constrained call is exactly the text the splitter holds back and parses.

Two formats, both accepted whatever the chat template asked for (a model trained on one sometimes writes the other):
- "llama3_json", Meta's Llama 3.x template: `{"name": "get_weather", "parameters": {"city": "Paris"}}`; Meta's own
  parser (llama-models `models/llama3/api/tool_utils.py`) also takes a leading `"type": "function", `.
- "tagged", the Hermes/Qwen/SmolLM style our generic preamble asks for:
  `<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>`.
Either key, "parameters" or "arguments", is accepted in both. Several calls (parallel_tool_calls) follow one another,
one newline apart. JSON inside a call has fixed separators ", " and ": " and no free whitespace: a model fond of
whitespace cannot fill the reply budget with it (Ollama issue #1910).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

CallFormat = Literal["llama3_json", "tagged"]
ARGUMENT_KEYS = ("parameters", "arguments")
# Calls in one reply at most: small models given parallel_tool_calls repeat a call until the budget runs out
# (SmolLM2-135M, greedy, wrote get_weather(Paris) over and over); this bounds the loop, not a real request.
MAX_CALLS = 8

# JSON compile options for every schema we embed (llguidance JsonCompileOptions, set through the schema's
# "x-guidance" key, which overrides the defaults): fixed separators, no optional whitespace anywhere.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# A trigger is a sequence of parts: a literal string, WS (a run of JSON whitespace, possibly empty) or a list (an
# optional group of parts). From one definition come the regex of a whole trigger (the same text for Python's `re`
# and for llguidance's Rust regex) and the regex of every prefix of one (what a stream must hold back).
WS = object()
_WS_CLASS = "[ \\t\\n\\r]"
# llama.cpp's trigger for Llama 3.x (common/chat.cpp, common_chat_params_init_llama_3_x), with JSON's whitespace
# instead of \s (whose meaning differs between Python and Rust).
LLAMA_TRIGGER = ("{", WS, ['"type"', WS, ":", WS, '"function"', WS, ",", WS], '"name"', WS, ":", WS, '"')
TAGGED_TRIGGER = ("<tool_call>",)
TAGGED_END = "</tool_call>"
_META = set("\\.+*?()|[]{}^$#&-~/")


def _escape(text: str) -> str:
    return "".join("\\" + c if c in _META else c for c in text)


def _full(parts: Sequence[Any]) -> str:
    out = []
    for part in parts:
        if part is WS:
            out.append(_WS_CLASS + "*")
        elif isinstance(part, list):
            out.append("(?:" + _full(part) + ")?")
        else:
            out.append(_escape(part))
    return "".join(out)


def _prefixes(parts: Sequence[Any]) -> str:
    """A regex matching every prefix (the empty one included) of the language of `parts`."""
    if not parts:
        return ""
    head, rest = parts[0], parts[1:]
    if head is WS:  # a prefix of WS+rest is some whitespace, then a prefix of rest
        return _WS_CLASS + "*(?:" + _prefixes(rest) + ")"
    if isinstance(head, list):
        return "(?:" + _prefixes(head) + "|" + _full(head) + _prefixes(rest) + "|" + _prefixes(rest) + ")"
    proper = ""  # the proper prefixes of the literal, nested: (?:a(?:b)?)? for "abc"
    for c in reversed(head[:-1]):
        proper = "(?:" + _escape(c) + proper + ")?"
    return "(?:" + proper + "|" + _escape(head) + _prefixes(rest) + ")"


TRIGGERS = (LLAMA_TRIGGER, TAGGED_TRIGGER)
TRIGGER_REGEX = "|".join("(?:" + _full(t) + ")" for t in TRIGGERS)  # for llguidance's lark too
_TRIGGER = re.compile(TRIGGER_REGEX)
_TRIGGER_PREFIX = re.compile("|".join("(?:" + _prefixes(t) + ")" for t in TRIGGERS))
_TRIGGER_B = re.compile(TRIGGER_REGEX.encode())
_TRIGGER_PREFIX_B = re.compile(_TRIGGER_PREFIX.pattern.encode())
_STARTS = tuple(t[0][0] for t in TRIGGERS)  # "{", "<": every trigger's first character, found nowhere else in it


def find_trigger(text: str) -> int | None:
    """Where the first complete trigger in `text` starts, or None."""
    match = _TRIGGER.search(text)
    return match.start() if match else None


def pending_trigger(text: str) -> int | None:
    """Where the unfinished trigger at the end of `text` starts (a non-empty suffix that a trigger could still
    extend), or None. Each trigger's first character occurs once in it, so only its last occurrence can start one."""
    return _pending(text, _TRIGGER_PREFIX, _STARTS)


def find_trigger_bytes(data: bytes) -> int | None:
    match = _TRIGGER_B.search(data)
    return match.start() if match else None


def pending_trigger_bytes(data: bytes) -> int | None:
    return _pending(data, _TRIGGER_PREFIX_B, tuple(s.encode() for s in _STARTS))


def _pending(text: Any, prefix: re.Pattern, starts: tuple[Any, ...]) -> int | None:
    for start in starts:
        i = text.rfind(start)
        if i >= 0 and prefix.fullmatch(text, i):
            return i
    return None


# --- grammars (llguidance's Lark dialect; %json embeds a JSON schema) -------------------------------------------
def _lark_str(text: str) -> str:
    return json.dumps(text)


def json_rule(schema: Mapping[str, Any]) -> str:
    """A Lark %json embed of `schema` with our separators and no free whitespace."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def calls_grammar(tools: Sequence[tuple[str, Mapping[str, Any]]], *, lazy: bool, parallel: bool) -> str:
    """Grammar of a reply made of tool calls, each naming one of `tools` (name, parameters schema) with arguments
    valid against its schema; one call, or (parallel) several one newline apart; then the end of the reply.

    lazy: the first call's opening was written freely (before the trigger fired): it is the trigger's own regex, so
    whatever text fired the trigger is consumable. Later openings, and all of them when not lazy, allow at most one
    space where JSON allows whitespace, so a constrained model cannot run away with whitespace."""
    name_end, key_end = '", "', '": '  # "get_weather", "parameters": {...
    bodies = [f"f{i}: {_lark_str(name + name_end)} ARGS_KEY {_lark_str(key_end)} {json_rule(schema)}"
              for i, (name, schema) in enumerate(tools)]
    first_open = "LAZY_OPEN" if lazy else "OPEN"
    rest = f' ("\\n" call){{0,{MAX_CALLS - 1}}}' if parallel else ""
    return "\n".join([
        f'start: first{rest} "\\n"?',
        f"first: {first_open} body \"}}\" | tagged",
        "call: OPEN body \"}\" | tagged",
        f'tagged: "<tool_call>" "\\n"? OPEN body "}}" "\\n"? {_lark_str(TAGGED_END)}',
        "body: " + " | ".join(f"f{i}" for i in range(len(tools))),
        *bodies,
        "ARGS_KEY: " + " | ".join(_lark_str(k) for k in ARGUMENT_KEYS),
        f"LAZY_OPEN: /{_full(LLAMA_TRIGGER)}/",
        '''OPEN: /\\{ ?"name" ?: ?"/''',
    ])


def calls_or_content_grammar(tools: Sequence[tuple[str, Mapping[str, Any]]], content: Mapping[str, Any], *,
                             parallel: bool) -> str:
    """Grammar of a reply that is either tool calls or JSON content valid against `content`, constrained from the
    first token. Both begin with "{", so here each call is itself a JSON schema (name const + arguments): llguidance
    merges the lexers of sibling %json embeds and can tell them apart past the first byte, which it cannot do
    between a Lark regex and a %json embed."""
    def call(key: str) -> str:
        return json_rule({"anyOf": [{"type": "object", "properties": {"name": {"const": name}, key: schema},
                                     "required": ["name", key], "additionalProperties": False}
                                    for name, schema in tools]})

    rest = f' ("\\n" call){{0,{MAX_CALLS - 1}}}' if parallel else ""
    return "\n".join([
        f"start: content | call{rest}",
        "call: llama | tagged",
        f"llama: {call('parameters')}",
        f'tagged: "<tool_call>\\n" {call("arguments")} "\\n" {_lark_str(TAGGED_END)}',
        f"content: {json_rule(content)}",
    ])


def content_grammar(schema: Mapping[str, Any]) -> str:
    return f"start: {json_rule(schema)}"


# The trigger and everything a model may write after it, for the "is this token still on a trigger's path" mask
# of the lazy constraint: tokens outside it leave the trigger (free text), tokens inside must satisfy the calls.
TRIGGER_THEN_ANYTHING = f"start: TRIGGER_ANY\nTRIGGER_ANY: /(?:{TRIGGER_REGEX})(?s:.*)/"


# --- text -----------------------------------------------------------------------------------------------------
def format_call(fmt: CallFormat, name: str, arguments: Mapping[str, Any]) -> str:
    """A call as the model writes it in `fmt` (for prompts that show earlier calls, and for tests)."""
    args = json.dumps(dict(arguments), ensure_ascii=False, separators=(", ", ": "))
    if fmt == "llama3_json":
        return f'{{"name": {json.dumps(name)}, "parameters": {args}}}'
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "arguments": {args}}}\n{TAGGED_END}'


@dataclass(frozen=True)
class ParsedCalls:
    calls: list[tuple[str, dict[str, Any]]]  # (name, arguments), in order
    problem: str | None = None  # why the text after the last good call is not a call; None when all of it was
    cut: bool = False  # the text ends inside a call (a reply cut by its token budget)


def parse_calls(text: str, names: Sequence[str]) -> ParsedCalls:
    """The calls in `text`, which starts at a trigger. A call naming a tool outside `names` is never returned."""
    calls: list[tuple[str, dict[str, Any]]] = []
    decoder = json.JSONDecoder()
    pos = 0
    while True:
        pos = _skip_ws(text, pos)
        if pos == len(text):
            return ParsedCalls(calls, None if calls else "no tool call")
        start = pos
        tagged = text.startswith(TAGGED_TRIGGER[0], pos)
        if tagged:
            pos = _skip_ws(text, pos + len(TAGGED_TRIGGER[0]))
        elif TAGGED_TRIGGER[0].startswith(text[pos:]):
            return ParsedCalls(calls, "the reply ended inside a tool call", cut=True)
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            if pos == len(text) or cut_short(text, pos):
                return ParsedCalls(calls, "the reply ended inside a tool call", cut=True)
            return ParsedCalls(calls, f"a tool call is not valid JSON: {text[start:start + 80]!r}")
        if tagged:
            pos = _skip_ws(text, pos)
            if not text.startswith(TAGGED_END, pos):
                if TAGGED_END.startswith(text[pos:]):
                    return ParsedCalls(calls, "the reply ended inside a tool call", cut=True)
                return ParsedCalls(calls, f"a tool call lacks its closing {TAGGED_END}")
            pos += len(TAGGED_END)
        call, problem = _call(obj, names)
        if problem:
            return ParsedCalls(calls, problem)
        calls.append(call)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def cut_short(text: str, pos: int) -> bool:
    """Whether the JSON value at `pos` is unfinished (an open string, object or array at the end of the text), as
    opposed to wrong. A quick scan: it does not check the grammar, the constraint did."""
    depth, in_string, escaped = 0, False, False
    for c in text[pos:]:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth < 0:
                return False
    return in_string or depth > 0


def _call(obj: Any, names: Sequence[str]) -> tuple[tuple[str, dict[str, Any]], str | None]:
    if not isinstance(obj, dict):
        return ("", {}), "a tool call is not a JSON object"
    name = obj.get("name")
    keys = [k for k in ARGUMENT_KEYS if k in obj]
    extra = set(obj) - {"name", "type", *ARGUMENT_KEYS}
    if obj.get("type", "function") != "function" or extra or len(keys) != 1:
        return ("", {}), 'a tool call must be {"name": ..., "parameters": {...}}'
    if not isinstance(name, str) or name not in names:
        return ("", {}), f"the model called {name!r}, which is not one of the tools offered"
    arguments = obj[keys[0]]
    if not isinstance(arguments, dict):
        return ("", {}), f"the arguments of {name!r} are not a JSON object"
    return (name, arguments), None
