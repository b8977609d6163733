"""The labelled tool-call set (tests/data/tool_calls_eval.json) is well-formed, and tools/bench/tool_calls.py scores
replies as it says: hand-made replies, the structured.Splitter's own verdicts, a few random-logit generations under
Llama 3.2 masks, and a 2-prompt run through a real daemon on the scripted engine. The figures themselves come from
the bench: .venv/bin/python tools/bench/tool_calls.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import fake_config

from edge_llama.structured.plan import plan_reply
from edge_llama.structured.splitter import Splitter

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "tool_calls.py"
_spec = importlib.util.spec_from_file_location("tool_calls_bench", BENCH)
assert _spec is not None and _spec.loader is not None
bench: Any = importlib.util.module_from_spec(_spec)
sys.modules["tool_calls_bench"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)

EVAL = bench.load_set()
SCHEMAS = EVAL.schemas
LIGHT = bench.Case("Turn on the kitchen light.", "set_light")
CHAT = bench.Case("Tell me a joke.", None)


def test_the_set_is_well_formed() -> None:
    raw = json.loads(bench.DATA.read_text())
    assert raw["about"] and raw["system"]
    names = [t.name for t in EVAL.tools]
    assert 4 <= len(names) <= 6 and len(set(names)) == len(names)
    for tool in EVAL.tools:
        jsonschema.Draft202012Validator.check_schema(tool.parameters)
        assert tool.description and tool.parameters["type"] == "object"
    assert plan_reply(EVAL.tools, "auto", True) is not None  # the daemon accepts these tools as they are
    prompts = [c.prompt for c in EVAL.cases]
    assert len(set(prompts)) == len(prompts)
    needs = [c for c in EVAL.cases if c.tool is not None]
    assert all(c.tool in names for c in needs), [c for c in needs if c.tool not in names]
    assert {c.tool for c in needs} == set(names)  # every tool is needed by some prompt
    assert len(needs) >= 20 and len(EVAL.cases) - len(needs) >= 20
    assert all(c.tool is None for c in EVAL.cases if c.near_miss)


def score(observed: Any, case: Any = LIGHT) -> Any:
    return bench.score(observed, case, SCHEMAS)


def test_calls_are_scored_by_name_and_schema() -> None:
    right = score(bench.Observed("", (("set_light", '{"room": "kitchen", "on": true}'),), "tool_calls"))
    assert right.called and right.right_tool and (right.valid_calls, right.invalid_calls) == (1, 0)
    wrong_tool = score(bench.Observed("", (("read_sensor", {"sensor": "door"}),), "tool_calls"))
    assert wrong_tool.called and not wrong_tool.right_tool and wrong_tool.valid_calls == 1
    bad_args = score(bench.Observed("", (("set_light", {"room": "kitchen", "on": True, "brightness": 150}),
                                         ("set_light", '{"room": "kitchen"'), ("set_light", "[]"))))
    assert bad_args.right_tool and (bad_args.valid_calls, bad_args.invalid_calls) == (0, 3)
    invented = score(bench.Observed("", (("turn_on_light", {}),)))
    assert invented.invented and invented.invalid_calls == 1 and not invented.right_tool
    none = score(bench.Observed("The capital is Canberra."), CHAT)
    assert not (none.called or none.invented or none.malformed or none.cut or none.leaked or none.length)


@pytest.mark.parametrize(("content", "leaks"), [
    ("Sure, the kitchen light is on now.", False),
    ("A light year is the distance light travels in a year.", False),
    ('I will call {"name": "set_light"} for you', True),
    ("<tool_call> set the light </tool_call>", True),
    ("You can use set_light(room='kitchen').", True),
    ('{"arguments" : {"room": "kitchen"}}', True),
])
def test_call_like_content_is_a_leak(content: str, leaks: bool) -> None:
    assert score(bench.Observed(content)).leaked is leaks


def through_splitter(text: str, finish: str = "stop") -> Any:
    """What the bench records for a reply it parses itself (the engine runs, the random-logit ones)."""
    splitter = Splitter(plan_reply(EVAL.tools, "auto", True))
    splitter.feed(text)
    return bench.from_reply(splitter.finish(), finish)


def test_the_splitters_verdicts_are_classified() -> None:
    invented = score(through_splitter('Ok. {"name": "turn_on_light", "parameters": {"room": "kitchen"}}'))
    assert invented.invented and not invented.malformed and not invented.called and not invented.leaked
    cut = score(through_splitter('Ok. <tool_call>\n{"name": "set_light", "arguments": {"room": "kit', "length"))
    assert cut.cut and cut.length and not cut.malformed and not cut.called
    malformed = score(through_splitter('{"name": "set_light", "arguments": {"room": kitchen}} and more text'))
    assert malformed.malformed and not malformed.cut and not malformed.invented
    unchecked = score(through_splitter('<tool_call>\n{"name": "set_light", "arguments": {"on": "yes"}}\n</tool_call>'))
    assert unchecked.called and unchecked.invalid_calls == 1  # without a constraint, arguments are not checked
    cut_second = score(through_splitter('{"name": "set_light", "parameters": {"room": "kitchen", "on": true}}\n'
                                        '{"name": "set_light", "parameters": {"ro', "length"))
    assert cut_second.cut and not cut_second.called  # as the daemon answers: no call from a cut reply
    fine = score(through_splitter('Sure. {"name": "set_light", "parameters": {"room": "kitchen", "on": true}}'))
    assert fine.right_tool and fine.valid_calls == 1 and not (fine.leaked or fine.malformed)


def test_summary_counts_each_class_apart() -> None:
    cases = [LIGHT, bench.Case("Set a timer for 10 minutes.", "start_timer"), CHAT, bench.Case("Hi!", None)]
    light = bench.Observed("", (("set_light", {"room": "kitchen", "on": True}),), "tool_calls")
    scores = [score(light, c) for c in cases[:2]] + [score(light, CHAT), score(bench.Observed("Hello!"), cases[3])]
    figures = bench.summarize(scores, cases)
    assert (figures["needs_tool"], figures["called"], figures["right_tool"]) == (2, 2, 1)
    assert (figures["chit_chat"], figures["false_calls"], figures["false_call_rate"]) == (2, 1, 0.5)
    assert (figures["calls_returned"], figures["schema_valid_rate"]) == (3, 1.0)
    table = bench.table({"mode": figures})
    assert "| chit-chat prompts that got a call (false calls) | 1/2 (50%) |" in table


def test_random_logit_generations_under_llama32_masks_validate() -> None:
    structurer = bench.llama_structurer()
    rng = __import__("numpy").random.default_rng(0)
    lazy = plan_reply(EVAL.tools, "auto", True)
    forced = structurer.tokenizer.tokenize_str('Sure. <tool_call>\n{"name": "')
    for plan, prefix in ((plan_reply(EVAL.tools, "required", True), ()), (lazy, forced)):
        for _ in range(3):
            observed = bench.random_generation(structurer, plan, rng, 256, prefix)
            assert observed.calls and observed.problem is None and not observed.cut, observed
            assert all(bench.call_valid(name, args, SCHEMAS) for name, args in observed.calls)
    assert bench.random_generation(structurer, lazy, rng, 3, forced).cut  # a budget that ends inside the call


def test_a_two_prompt_run_through_the_daemon() -> None:
    config = fake_config(reply='Sure. {"name": "set_light", "parameters": {"room": "kitchen", "on": true}}')
    config["engine"]["kv_tokens"] = 8192  # the fake's tokens are bytes: the tool preamble is ~2,000 of them
    config["generation"] = {"max_tokens": 128, "max_tokens_ceiling": 1024}
    observed = bench.run_daemon(EVAL, config, 128, [LIGHT, CHAT])
    light, chat = (score(o, c) for o, c in zip(observed, [LIGHT, CHAT], strict=True))
    assert light.right_tool and light.valid_calls == 1 and observed[0].content == "Sure. "
    assert chat.called and not chat.leaked  # the scripted model calls for a joke too: a false call
