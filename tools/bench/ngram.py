"""Prompt-lookup speculative decoding on summaries: our engine with engine.speculative "ngram" against "off", and
llama-server's own n-gram modes (--spec-type) against its plain decoding, on the same prompts, in one run.

Ours runs three ways: "ngram" and "off" on the bf16 V cache that exact drafts need (kv_cache_type bf16: the same
greedy text is required of them), and "default" (off, f16 cache: what the daemon runs unless configured).

The prompts are the summarizer's own map steps (edge_llama/service/summarize.py: its instruction, its chunking
for a 2048-token KV budget, its reply budget of 160 tokens) for the bundled text (edge_llama/data/sample.txt)
and the held-out one (tools/bench/heldout.txt, its first --chunks chunks), sampled as the summarizer samples
(temperature 0.2, top_p 0.9, seed 0) and greedy. Each configuration runs every prompt once per round, in an order
that rotates; after the first round every prompt is cached on every side, so decode is what is compared.

decode tok/s = (tokens - 1) / (last token - first token), ours measured around the engine (in this process),
llama-server's by its own timings (predicted_per_second; its client-side figure is given too).

Last line: one JSON object; per text and temperature: ours_off / ours_ngram decode tok/s and their ratio
(speedup: ngram / off, > 1 = faster; target >= 1.3), ours_default and speedup_vs_default (ngram / default), draft
acceptance, same_text (greedy: must be true), and llama-server's figures per mode with its own speedup.

    .venv/bin/python tools/bench/ngram.py [--rounds 3] [--chunks 2] [--their-modes none,ngram-simple]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from edge_llama.config import EngineConfig, SummarizeConfig
from edge_llama.engine.base import GenParams
from edge_llama.engine.llamacpp import LlamaCppEngine
from edge_llama.prompting.template import template_for
from edge_llama.protocol import Message
from edge_llama.service.summarize import SAFETY_TOKENS, TEMPERATURE, spans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer import KV_TOKENS, THREADS, LlamaServer, build_llama_server  # noqa: E402

HERE = Path(__file__).resolve().parent
SUMMARY_TOKENS = SummarizeConfig().summary_tokens


def texts() -> dict[str, str]:
    heldout = "\n".join(line for line in (HERE / "heldout.txt").read_text().splitlines() if not line.startswith("# "))
    sample = (HERE.parents[1] / "edge_llama" / "data" / "sample.txt").read_text(encoding="utf-8")
    return {"sample": sample, "heldout": heldout}


def map_prompts(engine: LlamaCppEngine, chunks: int) -> dict[str, list[list[Message]]]:
    """The summarizer's map-step prompts per text (its instruction and chunking), the held-out text's first
    `chunks`."""
    template = template_for(None, engine.template_info)
    instruction = SummarizeConfig().instruction
    overhead = len(template.tokenize([Message("user", instruction + "\n\n")], engine.tokenize))
    limit = KV_TOKENS - SUMMARY_TOKENS - overhead - SAFETY_TOKENS  # as Summarizer computes it
    return {name: [[Message("user", f"{instruction}\n\n{text[a:b]}")]
                   for a, b in spans(text, limit, engine.count_tokens)[:chunks]]
            for name, text in texts().items()}


def ours(engine: LlamaCppEngine, ids: list[int], params: GenParams) -> dict:
    stats = {"drafted": 0, "accepted": 0}
    original = engine._speculate

    def counted(token, draft, sampler, n):  # type: ignore[no-untyped-def]
        result = original(token, draft, sampler, n)
        stats["drafted"] += len(draft)
        stats["accepted"] += len(result[1])
        return result

    engine._speculate = counted  # type: ignore[method-assign]
    try:
        first = last = 0.0
        n = 0
        pieces = []
        for chunk in engine.generate(ids, params, threading.Event()):
            if chunk.finish is None:
                n += 1
                last = time.perf_counter()
                first = first or last
            pieces.append(chunk.text)
    finally:
        del engine._speculate
    return {"decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0, "tokens": n, "text": "".join(pieces),
            **stats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=2, help="map steps of the held-out text to run")
    parser.add_argument("--their-modes", default="none,ngram-simple", help="llama-server --spec-type values")
    parser.add_argument("--port", type=int, default=18451)
    args = parser.parse_args()

    engines = {name: LlamaCppEngine(EngineConfig(kv_tokens=KV_TOKENS, threads=THREADS, kv_cache_type=cache,
                                                 speculative=speculative))
               for name, cache, speculative in (("off", "bf16", "off"), ("ngram", "bf16", "ngram"),
                                                ("default", "f16", "off"))}
    for engine in engines.values():
        engine.load()
    template = template_for(None, engines["off"].template_info)
    prompts = map_prompts(engines["off"], args.chunks)

    binary = build_llama_server()
    modes = args.their_modes.split(",")
    servers = {mode: LlamaServer(binary, args.port + i, Path(f"/tmp/el-ngram-{mode}.log"),
                                 [] if mode == "none" else ["--spec-type", mode]) for i, mode in enumerate(modes)}
    temperatures = {"sampled": TEMPERATURE, "greedy": 0.0}
    results: dict[tuple[str, str, str], list[dict]] = {}
    try:
        for server in servers.values():
            server.wait_ready()
        sides = [f"ours_{n}" for n in engines] + [f"theirs_{m}" for m in modes]
        for r in range(args.rounds):
            for text_name, messages_list in prompts.items():
                for temp_name, temperature in temperatures.items():
                    for messages in messages_list:
                        order = sides[r % len(sides):] + sides[:r % len(sides)]
                        for side in order:
                            if side.startswith("ours_"):
                                engine = engines[side[5:]]
                                ids = template.tokenize(messages, engine.tokenize)
                                row = ours(engine, ids, GenParams(max_tokens=SUMMARY_TOKENS, temperature=temperature,
                                                                  top_p=0.9, seed=0))
                            else:
                                row = servers[side[7:]].complete(
                                    template.render(messages), SUMMARY_TOKENS, temperature=temperature, top_p=0.9,
                                    top_k=40, min_p=0.05, seed=0)
                                row["decode_tok_s"], row["client_decode_tok_s"] = (row["server_decode_tok_s"],
                                                                                   row["decode_tok_s"])
                            results.setdefault((text_name, temp_name, side), []).append(row)
                    print(f"round {r} {text_name} {temp_name}: " + ", ".join(
                        f"{s} {results[text_name, temp_name, s][-1]['decode_tok_s']:.1f}" for s in sides),
                        file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
        for engine in engines.values():
            engine.close()

    summary: dict[str, dict] = {}
    for text_name in prompts:
        for temp_name in temperatures:
            rate = {side: statistics.median(row["decode_tok_s"] for row in results[text_name, temp_name, side])
                    for side in ["ours_off", "ours_ngram", "ours_default", *(f"theirs_{m}" for m in modes)]}
            ngram_rows = results[text_name, temp_name, "ours_ngram"]
            off_rows = results[text_name, temp_name, "ours_off"]
            entry = {
                "ours_off_tok_s": round(rate["ours_off"], 1), "ours_ngram_tok_s": round(rate["ours_ngram"], 1),
                "speedup": round(rate["ours_ngram"] / rate["ours_off"], 3),
                "ours_default_tok_s": round(rate["ours_default"], 1),
                "speedup_vs_default": round(rate["ours_ngram"] / rate["ours_default"], 3),
                "acceptance": round(sum(x["accepted"] for x in ngram_rows) /
                                    max(1, sum(x["drafted"] for x in ngram_rows)), 3),
                "same_text": [x["text"] for x in ngram_rows] == [x["text"] for x in off_rows],
                **{f"theirs_{m}_tok_s": round(rate[f"theirs_{m}"], 1) for m in modes},
            }
            for m in modes:
                if m != "none" and "none" in modes:
                    entry[f"theirs_{m}_speedup"] = round(rate[f"theirs_{m}"] / rate["theirs_none"], 3)
            summary[f"{text_name}_{temp_name}"] = entry
    print(json.dumps({**summary, "prompts": {k: len(v) for k, v in prompts.items()}, "rounds": args.rounds,
                      "summary_tokens": SUMMARY_TOKENS, "kv_tokens": KV_TOKENS, "threads": THREADS,
                      "target": {"speedup": ">= 1.3 (summaries, ours ngram / ours off)"}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
