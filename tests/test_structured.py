"""Structured output (edge_llama/structured/): request checks, tool-call triggers and parsing, and token masks with
the real Llama 3.2 tokenizer (scripted token sequences) and the real SmolLM2-135M (a greedy decode loop on its
logits through llama_cpp, the mask applied as the engines apply it)."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import jsonschema
import numpy as np
import pytest
from conftest import llama_tokenizer_dir

from edge_llama.engine.base import Vocabulary
from edge_llama.errors import BadRequest
from edge_llama.protocol import ResponseFormat, ToolSpec
from edge_llama.structured import formats
from edge_llama.structured.constraint import Structurer
from edge_llama.structured.plan import Plan, plan_reply
from edge_llama.structured.splitter import Splitter

WEATHER = ToolSpec("get_weather", "Get the current weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]})
LIGHT = ToolSpec("set_light", "Turn a light on or off", {
    "type": "object", "properties": {"room": {"type": "string"}, "on": {"type": "boolean"},
                                     "level": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["room", "on"]})
TOOLS = (WEATHER, LIGHT)
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "pets": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age"]}
LLAMA_EOS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>


def allowed(mask: Any, token: int) -> bool:
    return mask is None or bool((int(mask[token // 32]) >> (token % 32)) & 1)


def validate_call(name: str, arguments: dict[str, Any], tools: tuple[ToolSpec, ...] = TOOLS) -> None:
    schema = next(t.parameters for t in tools if t.name == name)
    jsonschema.validate(arguments, schema)


# --- triggers and the splitter (no tokenizer) ---------------------------------------------------------------
@pytest.mark.parametrize(("text", "pending", "whole"), [
    ("Sure.", None, None),
    ("Use a dict {", 11, None),
    ('x {"', 2, None),
    ('{ "type" : "func', 0, None),
    ('{"name"', 0, None),
    ('{"name":"', None, 0),
    ('{\n  "type": "function",\n  "name": "', None, 0),
    ('{"x', None, None),
    ("a < b", None, None),
    ("ok <tool", 3, None),
    ("ok <tool_call>", None, 3),
    ('{"na{', 4, None),
])
def test_triggers_and_what_could_still_become_one(text: str, pending: int | None, whole: int | None) -> None:
    assert formats.find_trigger(text) == whole
    if whole is None:
        assert formats.pending_trigger(text) == pending
        assert formats.pending_trigger_bytes(text.encode()) == pending


def lazy_plan(parallel: bool = True) -> Plan:
    plan = plan_reply(TOOLS, "auto", parallel)
    assert plan is not None and plan.lazy
    return plan


def test_splitter_releases_content_at_once_and_never_a_call() -> None:
    text = 'Sure {thing} a < b. Checking:\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
    splitter = Splitter(lazy_plan())
    released = ""
    for i, c in enumerate(text):
        released += splitter.feed(c)
        if c == " " and i < text.index('{"name"'):
            assert released == text[: i + 1]  # free text is not held back
        assert '{"' not in released and "get_weather" not in released
    reply = splitter.finish()
    assert released == reply.content == "Sure {thing} a < b. Checking:\n"
    assert [(c.name, dict(c.arguments)) for c in reply.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert reply.tool_calls[0].id.startswith("call_") and reply.problem is None


def test_splitter_reads_both_formats_and_parallel_calls() -> None:
    text = ('{"type": "function", "name": "set_light", "parameters": {"room": "hall", "on": true}}\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n')
    splitter = Splitter(lazy_plan())
    assert splitter.feed(text) == ""
    reply = splitter.finish()
    assert [c.name for c in reply.tool_calls] == ["set_light", "get_weather"] and reply.problem is None
    assert len({c.id for c in reply.tool_calls}) == 2


@pytest.mark.parametrize("text", ['{"name": "get_weather", "parameters": {"city": "Par',
                                  '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_',
                                  'Hm. <tool_call>'])
def test_a_reply_cut_inside_a_call_says_so_and_returns_no_partial_call(text: str) -> None:
    splitter = Splitter(lazy_plan())
    splitter.feed(text)
    reply = splitter.finish()
    assert reply.cut and reply.problem and reply.tool_calls == ()
    assert "get_weather" not in reply.content and "tool_call" not in reply.content


def test_a_call_to_a_tool_not_offered_is_never_returned() -> None:
    splitter = Splitter(lazy_plan())
    splitter.feed('{"name": "rm_rf", "parameters": {}}')
    reply = splitter.finish()
    assert reply.tool_calls == () and "rm_rf" in (reply.problem or "") and not reply.cut
    named = plan_reply(TOOLS, "get_weather", True)
    assert named is not None
    splitter = Splitter(named)
    splitter.feed('{"name": "set_light", "parameters": {"room": "x", "on": true}}')
    assert splitter.finish().tool_calls == ()


def test_a_dangling_trigger_start_at_the_end_is_content() -> None:
    splitter = Splitter(lazy_plan())
    assert splitter.feed("Use {") == "Use "
    assert splitter.finish().content == "Use {"


def test_json_content_splitter() -> None:
    plan = plan_reply((), response_format=ResponseFormat("json_schema", PERSON))
    assert plan is not None and plan.kind == "json"
    for text, cut in (('{"name": "Ann", "age": 3}', None), ('{"name": "An', True), ("Sure!", False)):
        splitter = Splitter(plan)
        assert splitter.feed(text) == text
        reply = splitter.finish()
        assert reply.content == text and (reply.problem is None) == (cut is None) and reply.cut == bool(cut)


def test_tools_or_json_content_that_looks_like_a_call_stays_content() -> None:
    plan = plan_reply(TOOLS, "auto", True, ResponseFormat("json_schema", PERSON))
    assert plan is not None and plan.kind == "tools_or_json"
    splitter = Splitter(plan)
    assert splitter.feed('{"name": "Ann", "age": 3}') == ""
    reply = splitter.finish()
    assert reply.content == '{"name": "Ann", "age": 3}' and reply.tool_calls == () and reply.problem is None
    splitter = Splitter(plan)
    splitter.feed('{"name": "get_weather", "parameters": {"city": "Osl')
    reply = splitter.finish()
    assert reply.cut and reply.content == "" and reply.tool_calls == ()  # cut: neither a call nor content


# --- request checks --------------------------------------------------------------------------------------------
def tool(parameters: Any, name: str = "t") -> ToolSpec:
    return ToolSpec(name, "", parameters)


@pytest.mark.parametrize(("tools", "choice", "response_format", "field", "words"), [
    ((tool({"type": "object", "properties": []}),), "auto", None, "tools[0].parameters", "properties"),
    ((WEATHER, tool({"type": "object", "required": "city"})), "auto", None, "tools[1].parameters", "required"),
    ((tool({"type": "string"}),), "auto", None, "tools[0].parameters", "object"),
    ((tool(["not", "a", "schema"]),), "auto", None, "tools[0].parameters", "JSON schema"),
    ((tool({"type": "object", "properties": {"a": {"type": "strnig"}}}),), "auto", None, "tools[0].parameters",
     "strnig"),
    ((tool({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),), "required", None,
     "tools[0].parameters", "cannot be enforced"),
    ((tool({"type": "object", "properties": {"a": {"$ref": "http://example.com/s.json"}}}),), "auto", None,
     "tools[0].parameters", "example.com"),
    ((tool({"type": "object", "properties": {"a": {"type": "string", "pattern": "[a-"}}}),), "auto", None,
     "tools[0].parameters", "regex"),
    ((WEATHER, WEATHER), "auto", None, "tools[1].name", "unique"),
    ((WEATHER,), "get_time", None, "tool_choice", "get_time"),
    ((), "get_weather", None, "tool_choice", "no tools"),
    ((), "required", None, "tool_choice", "required"),
    ((), "auto", ResponseFormat("json_schema", {"type": "integer", "minimum": 5, "maximum": 2}),
     "response_format.schema", "minimum"),
    ((), "auto", ResponseFormat("json_schema", {"type": "array", "uniqueItems": True}), "response_format.schema",
     "uniqueItems"),
])
def test_malformed_requests_are_bad_requests_naming_the_field(tools: tuple[ToolSpec, ...], choice: str,
                                                              response_format: ResponseFormat | None, field: str,
                                                              words: str) -> None:
    with pytest.raises(BadRequest) as info:
        plan_reply(tools, choice, True, response_format)
    assert info.value.field == field
    assert field in info.value.message and words in info.value.message


def test_plans_of_each_mode() -> None:
    assert plan_reply((), "auto") is None
    assert plan_reply(TOOLS, "none") is None
    auto, required = plan_reply(TOOLS, "auto"), plan_reply(TOOLS, "required")
    named = plan_reply(TOOLS, "set_light")
    assert auto and auto.lazy and auto.tool_names == ("get_weather", "set_light")
    assert required and not required.lazy and required.kind == "tools"
    assert named and named.tool_names == ("set_light",) and not named.lazy
    json_only = plan_reply(TOOLS, "none", response_format=ResponseFormat("json_object"))
    assert json_only and json_only.kind == "json"


# --- masks with the real Llama 3.2 tokenizer (128,256 tokens) --------------------------------------------------
@pytest.fixture(scope="module")
def llama() -> Structurer:
    tokenizer_json = (llama_tokenizer_dir() / "tokenizer.json").read_text()
    return Structurer(Vocabulary(eos_ids=LLAMA_EOS, logits_size=128256, tokenizer_json=tokenizer_json))


class Script:
    """Drives a constraint with the tokens of a text, as an engine would: mask(), check, accept()."""

    def __init__(self, structurer: Structurer, plan: Plan) -> None:
        self.s = structurer
        self.c = structurer.constraint(plan)
        self.masks: list[Any] = []
        self.text = ""

    def ids(self, text: str) -> list[int]:
        return self.s.tokenizer.tokenize_str(text)

    def feed(self, text: str) -> None:
        for token in self.ids(text):
            self.step(token)

    def step(self, token: int) -> None:
        mask = self.c.mask()
        self.masks.append(None if mask is None else mask.copy())
        assert allowed(mask, token), f"token {self.s.tokenizer.dbg_tokens([token])} refused after {self.text!r}"
        self.c.accept(token)
        self.text += self.s.tokenizer.decode_str([token])

    def refuses(self, text: str) -> bool:
        return not allowed(self.c.mask(), self.ids(text)[0])


def test_masks_are_the_engines_width(llama: Structurer) -> None:
    run = Script(llama, plan_reply(TOOLS, "required"))
    mask = run.c.mask()
    assert mask.dtype == np.int32 and mask.shape == (128256 // 32,)
    assert llama.free_mask is None  # no Llama 3.2 token holds a whole trigger


def test_lazy_free_text_stays_free(llama: Structurer) -> None:
    run = Script(llama, lazy_plan())
    run.feed("The capital of France is Paris. A dict looks like {1: 2}; <b>bold</b> and {\"x\": 1}.")
    assert sum(m is None for m in run.masks) >= len(run.masks) - 6  # masked only where a trigger could start
    # where a trigger could start, leaving it is allowed: the model is not pushed into a call
    assert all(m is None or m.any() for m in run.masks) and not run.c.done


def test_lazy_trigger_constrains_the_call(llama: Structurer) -> None:
    run = Script(llama, lazy_plan(parallel=False))
    run.feed("Let me check.\n")
    assert run.masks[-1] is None
    run.feed('{"name": "')
    assert run.refuses("get_time") is False  # "get" is a prefix of get_weather
    run.feed("get")
    assert run.refuses("_time") and not run.refuses("_weather")  # an invented name cannot be written
    run.feed('_weather", "parameters": {"')
    assert run.refuses("country") and not run.refuses("city")  # only get_weather's properties
    run.feed('city": "Paris"')
    assert run.refuses(" ") and run.refuses("\n") and run.refuses(" }")  # no free whitespace
    run.feed("}}")
    assert run.refuses(" ") and allowed(run.c.mask(), 128009)  # <|eot_id|> may end it
    run.feed("\n")  # parallel_tool_calls false: one call, so nothing but the end may follow
    assert run.c.done and np.array_equal(run.c.mask(), llama.eos_mask)


@pytest.mark.parametrize("opening", ['{"name":"', '{ "name" : "', '{\n  "type": "function",\n  "name": "',
                                     "<tool_call>\n"])
def test_lazy_trigger_takes_the_spellings_models_write(llama: Structurer, opening: str) -> None:
    run = Script(llama, lazy_plan())
    run.feed("Sure. " + opening)
    body = '{"name": "set_light", "arguments": {"room": "hall", "on": true}}' if opening.startswith("<") else \
        'set_light", "arguments": {"room": "hall", "on": true}}'
    run.feed(body)
    assert run.masks[-1] is not None
    if opening.startswith("<"):
        run.feed("\n</tool_call>")
    splitter = Splitter(lazy_plan())
    splitter.feed(run.text)
    reply = splitter.finish()
    assert reply.content == "Sure. " and [c.name for c in reply.tool_calls] == ["set_light"]


def test_a_token_that_completes_the_trigger_cannot_run_into_an_invented_name(llama: Structurer) -> None:
    run = Script(llama, lazy_plan())
    run.feed('Ok {"name":')
    the = llama.tokenizer.tokenize_str('"The')
    assert len(the) == 1 and not allowed(run.c.mask(), the[0])  # `"The` would start a call to "The..."
    assert not run.refuses(' "') and not run.refuses("5")  # on to a call, or away from it


def test_parallel_calls(llama: Structurer) -> None:
    run = Script(llama, lazy_plan(parallel=True))
    run.feed('{"name": "set_light", "parameters": {"room": "hall", "on": true}}\n')
    assert run.refuses("Done") and not run.refuses("<tool_call>") and not run.refuses("{")
    run.feed('{"name": "set_light", "parameters": {"room": "attic", "on": false, "level": 10}}')
    assert not run.c.done and allowed(run.c.mask(), 128009)


def test_required_and_named_constrain_the_first_token(llama: Structurer) -> None:
    run = Script(llama, plan_reply(TOOLS, "required"))
    assert run.refuses("Sure") and run.refuses(" ") and not run.refuses("{") and not run.refuses("<tool_call>")
    named = Script(llama, plan_reply(TOOLS, "get_weather", False))
    named.feed('{"name": "')
    assert named.refuses("set") and not named.refuses("get")
    named.feed('get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}')
    named.feed("\n")
    assert named.c.done


@pytest.mark.parametrize("fmt", ["llama3_json", "tagged"])
def test_each_format_as_written_is_allowed_and_read_back(llama: Structurer, fmt: formats.CallFormat) -> None:
    arguments = {"room": "Küche \"2\"", "on": True, "level": 55}
    text = formats.format_call(fmt, "set_light", arguments)
    plan = plan_reply(TOOLS, "required", False)
    run = Script(llama, plan)
    run.feed(text)
    assert allowed(run.c.mask(), LLAMA_EOS[2])
    reply = split(plan, run.text)
    assert [(c.name, dict(c.arguments)) for c in reply.tool_calls] == [("set_light", arguments)]


def test_json_object_and_schema_masks(llama: Structurer) -> None:
    run = Script(llama, plan_reply((), response_format=ResponseFormat("json_object")))
    assert run.refuses("[") and run.refuses(" ") and run.refuses("Sure")
    run.feed('{"a": [1, {"b": null}], "c": "d"}')
    assert run.c.done and np.array_equal(run.c.mask(), llama.eos_mask)
    run = Script(llama, plan_reply((), response_format=ResponseFormat("json_schema", PERSON, strict=False)))
    run.feed('{"name": "Ann", "')
    assert run.refuses("nick") and run.refuses("pets") and not run.refuses("age")  # order, and only known keys
    run.feed('age": 7, "pets": ["cat"]}')
    assert run.c.done
    jsonschema.validate(json.loads(run.text), PERSON)


def test_whitespace_cannot_run_away(llama: Structurer) -> None:
    run = Script(llama, plan_reply((), response_format=ResponseFormat("json_object")))
    run.feed("{")
    spaces = [t for t in range(128000) if llama.tokenizer.decode_bytes([t]).strip(b" \t\n\r") == b""
              and llama.tokenizer.decode_bytes([t])]
    mask = run.c.mask()
    assert len(spaces) > 100 and not any(allowed(mask, t) for t in spaces)


def test_tools_or_json_content(llama: Structurer) -> None:
    plan = plan_reply(TOOLS, "auto", True, ResponseFormat("json_schema", PERSON))
    for text in ('{"name": "Ann", "age": 3}', '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
                 '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'):
        run = Script(llama, plan)
        assert run.refuses("Sure")
        run.feed(text)
        assert run.c.done or allowed(run.c.mask(), 128009)


# --- the real SmolLM2-135M: its GGUF vocabulary and a greedy decode loop on its logits --------------------------
@pytest.fixture(scope="module")
def smol() -> Any:
    import llama_cpp

    from edge_llama.engine.llamacpp import embedded_model_path

    llm = llama_cpp.Llama(str(embedded_model_path()), n_ctx=2048, n_threads=2, verbose=False)
    yield llm, Structurer(gguf_vocabulary(llm))
    llm.close()


def gguf_vocabulary(llm: Any) -> Vocabulary:
    """The vocabulary as the llama.cpp engine builds it (llguidance/llamacpp.py's convention): each token's piece
    with special tokens rendered, control tokens (and user-defined ones that look like <...>) prefixed b"\\xff"."""
    import llama_cpp

    vocab = llm._model.vocab
    size = llama_cpp.llama_vocab_n_tokens(vocab)
    buffer = ctypes.create_string_buffer(256)
    pieces = []
    for token in range(size):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, True)
        piece = buffer.raw[:n]
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL or (attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
                                                         and piece.startswith(b"<") and piece.endswith(b">")):
            piece = b"\xff" + piece
        pieces.append(piece)
    eos = tuple(t for t in range(size) if llama_cpp.llama_vocab_is_eog(vocab, t))
    return Vocabulary(eos_ids=eos, logits_size=size, pieces=pieces,
                      tokenize=lambda data: llm.tokenize(bytes(data), add_bos=False, special=False))


def chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


TOOL_PROMPT = ("You can call functions. Tools:\n" + "\n".join(json.dumps(t.as_dict()) for t in TOOLS) +
               '\nTo call one, write <tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>')


def greedy(smol: Any, plan: Plan | None, prompt: str, max_tokens: int = 80, forced: str = "") -> tuple[str, Any]:
    """Greedy decoding of SmolLM2 under `plan`'s constraint; `forced` is text taken as the model's first tokens
    (to reach a state a 135M model would not reach by itself). Returns the text and the constraint."""
    import llama_cpp

    llm, structurer = smol
    constraint = structurer.constraint(plan) if plan is not None else None
    eos = {t for t in range(llm.n_vocab()) if allowed(structurer.eos_mask, t)}
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    forced_ids = llm.tokenize(forced.encode(), add_bos=False, special=False) if forced else []
    out: list[int] = []
    for step in range(max_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
        mask = constraint.mask() if constraint is not None else None
        if mask is not None:  # the layout engines read: bit t of word t // 32
            bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: len(logits)]
            logits[bits == 0] = -np.inf
        token = forced_ids[step] if step < len(forced_ids) else int(np.argmax(logits))
        assert allowed(mask, token)
        if constraint is not None:
            constraint.accept(token)
        if token in eos:
            break
        out.append(token)
        if constraint is not None and constraint.done:
            break
        llm.eval([token])
    return llm.detokenize(out).decode("utf-8", errors="replace"), constraint


def split(plan: Plan, text: str) -> Any:
    splitter = Splitter(plan)
    splitter.feed(text)
    return splitter.finish()


def test_smollm2_vocabulary(smol: Any) -> None:
    llm, structurer = smol
    assert structurer.width == (llm.n_vocab() + 31) // 32 and structurer.free_mask is None
    assert allowed(structurer.eos_mask, llm.token_eos())


@pytest.mark.parametrize("question", ["What is the weather in Paris?", "Hi!"])
def test_smollm2_required_calls_always_validate(smol: Any, question: str) -> None:
    plan = plan_reply(TOOLS, "required", False)
    text, constraint = greedy(smol, plan, chatml(TOOL_PROMPT, question))
    reply = split(plan, text)
    assert constraint.done and reply.problem is None and len(reply.tool_calls) == 1, text
    for call in reply.tool_calls:
        validate_call(call.name, dict(call.arguments))


def test_smollm2_named_tool(smol: Any) -> None:
    plan = plan_reply(TOOLS, "set_light", False)
    text, _ = greedy(smol, plan, chatml(TOOL_PROMPT, "What is the weather in Paris?"))
    (call,) = split(plan, text).tool_calls
    assert call.name == "set_light"
    validate_call(call.name, dict(call.arguments))


def test_smollm2_lazy_free_answer_and_triggered_call(smol: Any) -> None:
    plan = lazy_plan(parallel=False)
    text, constraint = greedy(smol, plan, chatml(TOOL_PROMPT, "Hi! How are you?"), max_tokens=16)
    reply = split(plan, text)
    assert reply.content == text and reply.tool_calls == () and not constraint.triggered
    # The model writes the trigger (forced here: a 135M model rarely does); from there its call is constrained.
    text, constraint = greedy(smol, plan, chatml(TOOL_PROMPT, "Is it cold in Oslo?"), forced="Let me see. <tool_call>")
    reply = split(plan, text)
    assert constraint.triggered and reply.content == "Let me see. " and reply.problem is None, text
    (call,) = reply.tool_calls
    validate_call(call.name, dict(call.arguments))


def test_smollm2_json_schema_and_object(smol: Any) -> None:
    schema_plan = plan_reply((), response_format=ResponseFormat("json_schema", PERSON, strict=True))
    text, constraint = greedy(smol, schema_plan, chatml("You are helpful.", "Describe a person as JSON."), 60)
    assert constraint.done, text
    jsonschema.validate(json.loads(text), PERSON)
    object_plan = plan_reply((), response_format=ResponseFormat("json_object"))
    text, constraint = greedy(smol, object_plan, chatml("You are helpful.", "Describe a cat as JSON."), 60)
    assert constraint.done and isinstance(json.loads(text), dict), text


def test_smollm2_budget_cut_is_reported(smol: Any) -> None:
    plan = plan_reply(TOOLS, "required", True)
    text, constraint = greedy(smol, plan, chatml(TOOL_PROMPT, "What is the weather in Paris?"), max_tokens=9)
    reply = split(plan, text)
    assert not constraint.done and reply.cut and reply.tool_calls == () and reply.problem
