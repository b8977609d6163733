"""A chat request's tools / tool_choice / response_format, checked and turned into a Plan: what one reply is
constrained to, as grammar text. The constraint (built from the Plan by a Structurer) and the stream splitter
(built from the same Plan) therefore agree on which tools exist and when a call starts.

Checks raise BadRequest with `field` set to the request field at fault, in protocol v1's names ("tools[2].parameters",
"tools[2].name", "tool_choice", "response_format.schema"); each API maps them to its own. A schema is checked by
compiling it with llguidance (the library that will enforce it), so what is accepted is exactly what can be
enforced: wrong keyword types, unknown formats, unsatisfiable schemas and keywords llguidance does not implement
("if", "not", "uniqueItems", ...) are a 400 naming the field, never a 500. The `jsonschema` package is not needed at
run time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edge_llama.errors import BadRequest
from edge_llama.protocol import TOOL_NAME, ResponseFormat, ToolSpec
from edge_llama.structured import formats

PlanKind = Literal["tools", "json", "tools_or_json"]


@dataclass(frozen=True)
class Plan:
    """What one reply is constrained to.

    kind "tools": tool calls; `lazy` (tool_choice "auto") leaves the text free until a trigger starts a call, else
    (tool_choice "required" or a tool's name) the reply is calls from its first token. kind "json": JSON content
    valid against the response_format's schema. kind "tools_or_json" (tools with tool_choice "auto" and a
    response_format): from the first token, either calls or schema-valid JSON content.
    """

    kind: PlanKind
    grammar: str  # llguidance Lark
    lazy: bool = False
    tool_names: tuple[str, ...] = ()  # the tools a call may name
    parallel: bool = False


def plan_reply(tools: Sequence[ToolSpec], tool_choice: str = "auto", parallel_tool_calls: bool = True,
               response_format: ResponseFormat | None = None) -> Plan | None:
    """The Plan of a request, or None when its reply is free text. Raises BadRequest (with `field`)."""
    names = _check_names(tools)
    if tool_choice not in ("auto", "none", "required") and tool_choice not in names:
        if not tools:
            raise BadRequest(f"tool_choice names the tool {tool_choice!r} but the request has no tools",
                             field="tool_choice")
        raise BadRequest(f"tool_choice names the tool {tool_choice!r}, which is not in tools "
                         f"({', '.join(names)})", field="tool_choice")
    if tool_choice == "required" and not tools:
        raise BadRequest("tool_choice \"required\" needs at least one tool in tools", field="tool_choice")
    content = content_schema(response_format) if response_format is not None else None
    if not tools or tool_choice == "none":
        return Plan("json", formats.content_grammar(content)) if content is not None else None

    chosen = [i for i, t in enumerate(tools) if tool_choice in ("auto", "required") or t.name == tool_choice]
    specs = [(tools[i].name, tool_schema(tools[i].parameters, f"tools[{i}].parameters")) for i in chosen]
    tool_names = tuple(name for name, _ in specs)
    if tool_choice == "auto" and content is not None:
        grammar = formats.calls_or_content_grammar(specs, content, parallel=parallel_tool_calls)
        return Plan("tools_or_json", _checked(grammar, "tools"), False, tool_names, parallel_tool_calls)
    lazy = tool_choice == "auto"
    grammar = formats.calls_grammar(specs, lazy=lazy, parallel=parallel_tool_calls)
    return Plan("tools", _checked(grammar, "tools"), lazy, tool_names, parallel_tool_calls)


def _check_names(tools: Sequence[ToolSpec]) -> list[str]:
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool.name, str) or not TOOL_NAME.fullmatch(tool.name):
            raise BadRequest(f"tools[{i}].name must be 1 to 64 characters of A-Z a-z 0-9 _ -", field=f"tools[{i}].name")
        if tool.name in ("auto", "none", "required"):  # tool_choice names a tool by its name: these would clash
            raise BadRequest(f"tools[{i}].name {tool.name!r} is reserved (a tool_choice value): rename the tool",
                             field=f"tools[{i}].name")
        if tool.name in seen:
            raise BadRequest(f"tools[{i}].name {tool.name!r} is also the name of tools[{seen[tool.name]}]; "
                             "tool names must be unique", field=f"tools[{i}].name")
        seen[tool.name] = i
    return list(seen)


def tool_schema(parameters: Any, field: str) -> dict[str, Any]:
    """A tool's parameters schema as the grammar embeds it. Arguments are a JSON object (ToolCall.arguments), so
    a schema without "type" gets "type": "object" and one of another type is refused."""
    if not isinstance(parameters, Mapping):
        raise BadRequest(f"{field} must be a JSON schema object, got {type(parameters).__name__}", field=field)
    kind = parameters.get("type", "object")  # checked before closing: a list of types is refused here
    if kind != "object":
        raise BadRequest(f"{field}: a tool's parameters must be an object schema (\"type\": \"object\"), "
                         f"got \"type\": {json.dumps(kind)}", field=field)
    return _checked_schema(_closed({**parameters, "type": "object"}, field), field)


def _closed(schema: Mapping[str, Any], field: str) -> dict[str, Any]:
    try:
        return closed(schema)
    except RecursionError:  # json.loads takes ~1000 levels; we would not
        raise BadRequest(f"{field} is nested too deeply", field=field) from None


def closed(schema: Any) -> Any:
    """`schema` where every object schema that lists "properties" and says nothing of "additionalProperties"
    allows no others, as llama.cpp's json-schema-to-grammar does: a small model otherwise pads the arguments with
    keys of its own (SmolLM2 wrote "type": "string", "required": [...] into get_weather's). What it generates is
    still valid against the schema as given. Branches of "allOf" are left alone: closing each would make them
    exclude one another's properties."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs", "definitions") and isinstance(value, Mapping):
            out[key] = {k: closed(v) for k, v in value.items()}
        elif key in ("items", "prefixItems", "additionalProperties", "anyOf", "oneOf"):
            out[key] = closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def content_schema(response_format: ResponseFormat) -> dict[str, Any]:
    if response_format.kind == "json_object":
        return {"type": "object"}
    field = "response_format.schema"
    if not isinstance(response_format.schema, Mapping):
        raise BadRequest(f"{field} must be a JSON schema object", field=field)
    return _checked_schema(_closed(response_format.schema, field), field)


def _checked_schema(schema: Mapping[str, Any], field: str) -> dict[str, Any]:
    """`schema` without any "x-guidance" of its own (the compile options are ours: no free whitespace), once
    llguidance compiled it. Raises BadRequest naming `field`."""
    clean = {k: v for k, v in schema.items() if k != "x-guidance"}
    try:
        text = json.dumps(clean, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:  # NaN, or a non-JSON value from a caller
        raise BadRequest(f"{field} is not JSON: {exc}", field=field) from None
    problem = _schema_problem(text)
    if problem:
        raise BadRequest(f"{field} is not a JSON schema that constrained decoding supports: {problem}", field=field)
    return clean


@functools.lru_cache(maxsize=256)
def _schema_problem(schema_json: str) -> str | None:
    """llguidance's complaint about a schema, or None. Cached: clients send the same tools with every request."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema_json, overrides=formats.JSON_OPTIONS)  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    return _grammar_problem(grammar)


def _checked(lark: str, field: str) -> str:
    problem = _lark_problem(lark)
    if problem:
        raise BadRequest(f"{field} cannot be turned into a grammar: {problem}", field=field)
    return lark


@functools.lru_cache(maxsize=64)
def _lark_problem(lark: str) -> str | None:
    import llguidance

    return _grammar_problem(llguidance.LLMatcher.grammar_from_lark(lark))


def _grammar_problem(grammar: str) -> str | None:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if not is_error:
        return None
    message = messages[0] if messages else "invalid"
    if message.startswith("Unimplemented keys"):
        message += " (these JSON-schema keywords cannot be enforced while decoding)"
    return message
