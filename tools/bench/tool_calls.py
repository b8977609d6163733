"""Missed and false tool calls (issue 15 item 4), on the labelled set tests/data/tool_calls_eval.json: 21 requests
that need one of six Home Assistant-like tools and 20 chit-chat / knowledge questions that need none.

- daemon: a real `edge-llama serve` (embedded SmolLM2-135M, greedy: temperature 0) on a temporary socket, asked
  with the official `openai` client, tool_choice "auto" (the default), each case on its own. Reported: call rate
  (needs-tool prompts that got a call) and, of those, the right tool (the first call names the expected one);
  false-call rate (chit-chat prompts that got a call); the schema-valid rate of every returned call (`jsonschema`
  against the tool's schema as the set declares it: 100% expected).
- engine, what the lazy trigger changed: the same prompts (ChatTemplate.tokenize with the tools, as the daemon
  builds them: the generic Hermes/Qwen preamble for SmolLM2) through the llama.cpp engine in this process, greedy,
  once with structured's LazyCalls constraint (what the daemon does) and once without any constraint, the model's
  text parsed afterwards by the same structured.Splitter (the Ollama way: tools in the prompt, no grammar).
  Counted in both modes: malformed calls (text after a trigger that is not a call), invented tool names,
  invalid arguments, calls cut by the token budget, and call-like text left in the content.
- masks, "with the real Llama 3.2 tokenizer": no Llama 3.2 weights here, so generations are driven by random
  logits (numpy, seeded; the argmax of iid normal logits under the mask: a uniformly random allowed token) over
  the 128,256 tokens of Llama 3.2's tokenizer.json (tests/conftest.py llama_tokenizer_dir), with the set's tool
  schemas, tool_choice "required" and "auto" with a forced trigger (free text, then one of the trigger's
  spellings, then only masked tokens). What comes out is parsed by the Splitter and validated with `jsonschema`
  (100% expected); "cut" counts the generations still inside a call when the budget ran out.

The set was written once and not tuned to the model. SmolLM2-135M is a very small model: its choice of WHEN to
call and WHICH tool is weak, and these figures say so; what the constraint guarantees is the form of a call (a
real tool's name, arguments valid against its schema), never that a call was wanted.

    .venv/bin/python tools/bench/tool_calls.py [--parts daemon engine masks] [--max-tokens 96] [--random-n 100]

The last line is one JSON object; the markdown table (README-ready) and each case's replies go to stderr.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "tool_calls_eval.json"
MAX_TOKENS = 96  # a call is ~40 SmolLM2 tokens; an answer that runs longer is cut, which decides nothing here
LLAMA_EOS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
LLAMA_LOGITS = 128256
# Call-like text in content: the tagged format's tags, a call's JSON keys (a tool's name is checked apart).
CALL_SYNTAX = re.compile(r'</?tool_call>|"(?:name|arguments|parameters)"\s*:')
NOT_OFFERED = "which is not one of the tools offered"  # structured.formats' problem for an invented name
# Lazy mode of the random-logits run: free text, then a trigger as models spell it (formats.LLAMA_TRIGGER and
# TAGGED_TRIGGER); the generation continues from there under the mask.
FREE_TEXTS = ("", "Sure. ", "Let me check that for you.\n")
TRIGGERS = ('{"name": "', '{ "name" : "', '{"type": "function", "name": "', "<tool_call>\n", "<tool_call>")


# --- the set -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    prompt: str
    tool: str | None  # the tool the request needs; None: it must be answered without a call
    near_miss: bool = False  # a no-tool question that uses a tool's words


@dataclass(frozen=True)
class EvalSet:
    system: str
    tools: tuple[Any, ...]  # protocol.ToolSpec
    cases: tuple[Case, ...]

    @property
    def schemas(self) -> dict[str, Mapping[str, Any]]:
        return {t.name: t.parameters for t in self.tools}

    def openai_tools(self) -> list[dict[str, Any]]:
        return [t.as_dict() for t in self.tools]


def load_set(path: Path = DATA) -> EvalSet:
    from edge_llama.protocol import ToolSpec

    data = json.loads(path.read_text())
    tools = tuple(ToolSpec(t["name"], t["description"], t["parameters"]) for t in data["tools"])
    cases = tuple(Case(c["prompt"], c["tool"], c.get("near_miss", False)) for c in data["cases"])
    return EvalSet(data["system"], tools, cases)


# --- scoring -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observed:
    """One reply as a client gets it: content, calls (name, arguments: OpenAI's JSON text or the object), the
    finish reason; and, where we parsed the text ourselves, why the text after a trigger gave no call (`problem`,
    structured.Reply's) and whether it ran out of tokens inside one (`cut`)."""

    content: str
    calls: tuple[tuple[str, Any], ...] = ()
    finish: str = "stop"
    problem: str | None = None
    cut: bool = False


@dataclass(frozen=True)
class Score:
    called: bool  # at least one call came back
    right_tool: bool  # the first call names the tool the case needs
    valid_calls: int  # calls naming an offered tool with arguments valid against its schema
    invalid_calls: int  # calls returned with an unknown name, or arguments that are not valid
    invented: bool  # a call named a tool that was not offered (returned, or refused by the parser)
    malformed: bool  # text after a trigger that is neither a call nor a call cut by the budget
    cut: bool  # the budget ran out inside a call
    leaked: bool  # call-like text (tags, a call's keys, a tool's name) in the content
    length: bool  # finish "length"


def from_reply(reply: Any, finish: str) -> Observed:
    """A structured.Reply as the daemon returns it (service/handlers.py): a reply cut inside a call returns no
    call at all (finish "length"), not the calls before the cut."""
    calls = () if reply.cut else tuple((c.name, dict(c.arguments)) for c in reply.tool_calls)
    return Observed(reply.content, calls, finish, reply.problem, reply.cut)


def call_valid(name: str, arguments: Any, schemas: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a call names an offered tool and its arguments are a JSON object valid against that tool's schema."""
    if name not in schemas:
        return False
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return False
    if not isinstance(arguments, dict):
        return False
    try:
        jsonschema.validate(arguments, schemas[name])
    except jsonschema.ValidationError:
        return False
    return True


def leaked(content: str, names: Sequence[str]) -> bool:
    return bool(CALL_SYNTAX.search(content)) or any(re.search(rf"\b{re.escape(n)}\b", content) for n in names)


def score(observed: Observed, case: Case, schemas: Mapping[str, Mapping[str, Any]]) -> Score:
    valid = sum(call_valid(name, args, schemas) for name, args in observed.calls)
    problem = observed.problem or ""
    invented = NOT_OFFERED in problem or any(name not in schemas for name, _ in observed.calls)
    return Score(
        called=bool(observed.calls),
        right_tool=bool(observed.calls) and case.tool is not None and observed.calls[0][0] == case.tool,
        valid_calls=valid,
        invalid_calls=len(observed.calls) - valid,
        invented=invented,
        malformed=bool(problem) and not observed.cut and NOT_OFFERED not in problem,
        cut=observed.cut,
        leaked=leaked(observed.content, list(schemas)),
        length=observed.finish == "length",
    )


def summarize(scores: Sequence[Score], cases: Sequence[Case]) -> dict[str, Any]:
    """The figures of one mode over the set."""
    need = [s for s, c in zip(scores, cases, strict=True) if c.tool is not None]
    chat = [s for s, c in zip(scores, cases, strict=True) if c.tool is None]
    called = sum(s.called for s in need)
    valid = sum(s.valid_calls for s in scores)
    returned = valid + sum(s.invalid_calls for s in scores)
    return {
        "needs_tool": len(need), "called": called, "right_tool": sum(s.right_tool for s in need),
        "call_rate": _rate(called, len(need)), "right_tool_rate": _rate(sum(s.right_tool for s in need), called),
        "chit_chat": len(chat), "false_calls": sum(s.called for s in chat),
        "false_call_rate": _rate(sum(s.called for s in chat), len(chat)),
        "calls_returned": returned, "schema_valid": valid, "schema_valid_rate": _rate(valid, returned),
        "invented_names": sum(s.invented for s in scores), "invalid_arguments": sum(s.invalid_calls for s in scores),
        "malformed": sum(s.malformed for s in scores), "cut_in_call": sum(s.cut for s in scores),
        "leaked_into_content": sum(s.leaked for s in scores), "finish_length": sum(s.length for s in scores),
    }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 3) if whole else None


# --- the daemon, with the openai client --------------------------------------------------------------------------
def run_daemon(evalset: EvalSet, config: Mapping[str, Any], max_tokens: int = MAX_TOKENS,
               cases: Sequence[Case] | None = None, log: Any = None) -> list[Observed]:
    """Each case through a fresh `edge-llama serve` started with `config`, tool_choice "auto"."""
    import httpx
    import openai
    import yaml

    from edge_llama.launch import DaemonProcess

    cases = evalset.cases if cases is None else cases
    out: list[Observed] = []
    with tempfile.TemporaryDirectory(prefix="eltc", dir="/tmp") as tmp:  # a socket path must stay short
        work = Path(tmp)
        server = {"state_dir": str(work / "state"), **config.get("server", {})}
        (work / "config.yaml").write_text(yaml.safe_dump({**config, "server": server}))
        with DaemonProcess(work / "d.sock", ["--config", str(work / "config.yaml")], log=work / "daemon.log") as d:
            d.wait_ready(timeout=300)
            client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                                   http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket))))
            for case in cases:
                answer = client.chat.completions.create(
                    model="edge-llama", temperature=0, max_tokens=max_tokens, tools=evalset.openai_tools(),
                    tool_choice="auto", messages=[{"role": "system", "content": evalset.system},
                                                  {"role": "user", "content": case.prompt}])
                choice = answer.choices[0]
                calls = tuple((c.function.name, c.function.arguments) for c in choice.message.tool_calls or ())
                out.append(Observed(choice.message.content or "", calls, choice.finish_reason))
                if log:
                    log("daemon", case, out[-1])
    return out


# --- the engine in this process: the lazy constraint on and off ---------------------------------------------------
def run_engine(evalset: EvalSet, max_tokens: int = MAX_TOKENS, kv_tokens: int = 2048,
               log: Any = None) -> tuple[list[Observed], list[Observed]]:
    """(constraint on, constraint off) for each case: the prompt the daemon builds, the engine the daemon runs."""
    from edge_llama.config import EngineConfig
    from edge_llama.engine.base import GenParams
    from edge_llama.engine.llamacpp import LlamaCppEngine
    from edge_llama.prompting.context import fit_prompt
    from edge_llama.prompting.template import template_for
    from edge_llama.protocol import Message
    from edge_llama.structured.constraint import Structurer
    from edge_llama.structured.plan import plan_reply
    from edge_llama.structured.splitter import Splitter

    # No prompt-lookup drafting (the daemon turns it off under a constraint, so the "on" runs have none either):
    # greedy without and with the mask then differ only where the mask refused a token.
    engine = LlamaCppEngine(EngineConfig(kv_tokens=kv_tokens, speculative="off"))
    engine.load()
    try:
        template = template_for(None, engine.template_info)
        structurer = Structurer(engine.vocabulary())
        plan = plan_reply(evalset.tools, "auto", True)
        assert plan is not None
        on: list[Observed] = []
        off: list[Observed] = []
        for case in evalset.cases:
            messages = [Message("system", evalset.system), Message("user", case.prompt)]
            ids = fit_prompt(template, engine.tokenize, messages, max_tokens, kv_tokens, tools=evalset.tools).ids
            for constrained, into in ((False, off), (True, on)):
                params = GenParams(max_tokens=max_tokens, temperature=0,
                                   constraint=structurer.constraint(plan) if constrained else None)
                splitter = Splitter(plan)
                finish = "stop"
                for chunk in engine.generate(ids, params, threading.Event()):
                    if chunk.text:
                        splitter.feed(chunk.text)
                    finish = chunk.finish or finish
                into.append(from_reply(splitter.finish(), finish))
                if log:
                    log("constraint on" if constrained else "constraint off", case, into[-1])
    finally:
        engine.close()
    return on, off


# --- masks at Llama 3.2's vocabulary, driven by random logits -----------------------------------------------------
def llama_structurer() -> Any:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import llama_tokenizer_dir

    from edge_llama.engine.base import Vocabulary
    from edge_llama.structured.constraint import Structurer

    tokenizer_json = (llama_tokenizer_dir() / "tokenizer.json").read_text()
    return Structurer(Vocabulary(eos_ids=LLAMA_EOS, logits_size=LLAMA_LOGITS, tokenizer_json=tokenizer_json))


def random_generation(structurer: Any, plan: Any, rng: Any, budget: int, forced: Sequence[int] = ()) -> Observed:
    """One generation: the `forced` tokens first (each must be allowed by its step's mask), then up to `budget`
    tokens, each the argmax of random logits over the tokens the mask allows; parsed by the Splitter."""
    import numpy as np

    from edge_llama.structured.splitter import Splitter

    constraint = structurer.constraint(plan)
    pieces: list[bytes] = []
    forced = list(forced)
    finish = "length"
    for _ in range(budget + len(forced)):
        mask = constraint.mask()
        allowed = None if mask is None else np.unpackbits(mask.view(np.uint8), bitorder="little")[:LLAMA_LOGITS]
        if forced:
            token = forced.pop(0)
            if allowed is not None and not allowed[token]:
                raise AssertionError(f"the mask refused the forced token {token} after {b''.join(pieces)!r}")
        elif allowed is None:
            raise AssertionError("no mask after the trigger")
        else:
            logits = rng.standard_normal(LLAMA_LOGITS, dtype=np.float32)
            logits[allowed == 0] = -np.inf
            token = int(np.argmax(logits))
            assert allowed[token], "the mask allows no token"
        constraint.accept(token)
        if token in LLAMA_EOS:
            finish = "stop"
            break
        pieces.append(structurer.piece(token))
        if constraint.done:
            finish = "stop"
            break
    data = b"".join(pieces)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # only a cut in the middle of a character is acceptable
        if finish != "length":
            return Observed(data.decode("utf-8", "replace"), (), finish, "not UTF-8")
        text = data.decode("utf-8", "ignore")
    splitter = Splitter(plan)
    splitter.feed(text)
    return from_reply(splitter.finish(), finish)


def mask_guarantee(evalset: EvalSet, n: int, budget: int, seed: int = 0) -> dict[str, Any]:
    """What the masks guarantee at 128,256 tokens: `n` random-logit generations per mode."""
    import numpy as np

    from edge_llama.structured.plan import plan_reply

    start = time.perf_counter()
    structurer = llama_structurer()
    build_s = time.perf_counter() - start
    rng = np.random.default_rng(seed)
    schemas = evalset.schemas
    out: dict[str, Any] = {"vocabulary": LLAMA_LOGITS, "budget_tokens": budget, "structurer_build_s": round(build_s, 2)}
    prefixes = [structurer.tokenizer.tokenize_str(free + trigger) for free in FREE_TEXTS for trigger in TRIGGERS]
    for mode, choice in (("required", "required"), ("lazy_forced_trigger", "auto")):
        plan = plan_reply(evalset.tools, choice, True)
        runs = [random_generation(structurer, plan, rng, budget, prefixes[i % len(prefixes)] if choice == "auto"
                                  else ()) for i in range(n)]
        whole = [o for o in runs if not o.cut]
        calls = [c for o in runs for c in o.calls]
        valid = sum(call_valid(name, args, schemas) for name, args in calls)
        out[mode] = {
            "generations": n, "cut": sum(o.cut for o in runs), "cut_rate": _rate(sum(o.cut for o in runs), n),
            "whole_replies": len(whole), "whole_with_calls": sum(bool(o.calls) for o in whole),
            "problems_when_whole": sum(o.problem is not None for o in whole),
            "calls": len(calls), "schema_valid": valid, "schema_valid_rate": _rate(valid, len(calls)),
            "tools_named": dict(sorted(collections.Counter(name for name, _ in calls).items())),
        }
    return out


# --- report ------------------------------------------------------------------------------------------------------
ROWS = (
    ("needs-tool prompts that got a call", "called", "needs_tool"),
    ("... of those, the right tool", "right_tool", "called"),
    ("chit-chat prompts that got a call (false calls)", "false_calls", "chit_chat"),
    ("returned calls schema-valid (jsonschema)", "schema_valid", "calls_returned"),
    ("replies with an invented tool name", "invented_names", None),
    ("returned calls with invalid arguments", "invalid_arguments", None),
    ("replies with a malformed call (dropped)", "malformed", None),
    ("replies cut inside a call (budget)", "cut_in_call", None),
    ("replies whose content names a tool or spells call keys (prose; not a call)", "leaked_into_content", None),
    ("replies that hit max_tokens", "finish_length", None),
)


def table(modes: Mapping[str, Mapping[str, Any]]) -> str:
    """The markdown table of the modes' figures."""
    lines = ["| SmolLM2-135M, greedy, tool_choice auto, 41 prompts | " + " | ".join(modes) + " |",
             "| --- |" + " --- |" * len(modes)]
    for label, key, whole in ROWS:
        cells = []
        for figures in modes.values():
            part = figures[key]
            if part is None:
                cells.append("n/a")
            elif whole is None:
                cells.append(str(part))
            else:
                cells.append(f"{part}/{figures[whole]}" + (f" ({100 * part / figures[whole]:.0f}%)"
                                                            if figures[whole] else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_case(mode: str, case: Case, observed: Observed) -> None:
    calls = ", ".join(f"{name}({args if isinstance(args, str) else json.dumps(args)})" for name, args in observed.calls)
    print(f"[{mode}] {case.prompt!r} (needs {case.tool}) -> finish {observed.finish}; calls: {calls or '-'}; "
          f"content: {observed.content[:120]!r}" + (f"; problem: {observed.problem}" if observed.problem else ""),
          file=sys.stderr, flush=True)


def agreement(a: Sequence[Observed], b: Sequence[Observed]) -> int:
    """Cases where two runs returned the same calls (names and arguments) and the same content."""
    def key(o: Observed) -> Any:
        return o.content, [(n, json.loads(x) if isinstance(x, str) else x) for n, x in o.calls]
    return sum(key(x) == key(y) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("daemon", "engine", "masks"),
                        default=["daemon", "engine", "masks"])
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    parser.add_argument("--random-n", type=int, default=100, help="random-logit generations per mode")
    parser.add_argument("--budget", type=int, default=128, help="token budget of a random-logit generation")
    args = parser.parse_args()

    evalset = load_set()
    started = time.perf_counter()
    result: dict[str, Any] = {"cases": len(evalset.cases), "max_tokens": args.max_tokens}
    modes: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[Observed]] = {}
    if "daemon" in args.parts:
        config = {"engine": {"kv_tokens": 2048}, "generation": {"temperature": 0, "max_tokens_ceiling": 1024},
                  "safety": {"enabled": False}}
        runs["daemon"] = run_daemon(evalset, config, args.max_tokens, log=print_case)
    if "engine" in args.parts:
        runs["constraint on"], runs["constraint off"] = run_engine(evalset, args.max_tokens, log=print_case)
    for mode, observed in runs.items():
        scores = [score(o, c, evalset.schemas) for o, c in zip(observed, evalset.cases, strict=True)]
        modes[mode] = summarize(scores, evalset.cases)
        for flag in ("called", "invented", "malformed", "cut", "leaked"):
            prompts = [c.prompt for s, c in zip(scores, evalset.cases, strict=True) if getattr(s, flag)]
            print(f"{mode}, {flag}: {prompts}", file=sys.stderr)
    if "daemon" in modes:  # a client never sees these: the daemon drops a broken or cut call (finish "length")
        modes["daemon"].update(malformed=None, cut_in_call=None)
    result["modes"] = modes
    if "daemon" in runs and "constraint on" in runs:
        result["daemon_same_as_constraint_on"] = agreement(runs["daemon"], runs["constraint on"])
    if modes:
        print(table(modes), file=sys.stderr)
    if "masks" in args.parts:
        result["llama32_masks"] = mask_guarantee(evalset, args.random_n, args.budget)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
