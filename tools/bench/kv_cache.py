"""What engine.kv_cache_type and engine.speculative cost on the CPU, end to end: the summarizer's map steps, cold.

llama.cpp's CPU flash attention has three kernels for an f16 K and V (ggml-cpu/ops.cpp): 64+ query tokens tiled
(prompts), one token split over the cache across threads (decode once the cache holds >= 512 cells), a plain
per-row loop otherwise (drafts). They round differently, so exact speculative decoding needs a cache that always
takes the plain loop: V in bf16 (kv_cache_type bf16) or q8_0. This measures what that costs and what drafts win.

Configurations, loaded side by side in this process and run in a rotating order: f16/off (the default), bf16/off,
bf16/ngram, q8_0/off, q8_0/ngram; 2 threads, KV 2,048. Prompts: the summarizer's own map steps
(tools/bench/ngram.py map_prompts: the bundled text and the held-out text's first --chunks chunks), each run cold
(the KV cache emptied, no prompt cache), greedy, 160 tokens. Per configuration, medians over prompts and rounds:
- prompt_ms: generate() called to its first token (the prompt's evaluation);
- decode_tok_s: (tokens - 1) / (last token - first token);
- step_s: the whole map step (prompt and reply);
and per cache type, whether ngram gave the same text as off on every prompt (exactness; must be true).

Last line: one JSON object with those, and default_step_vs_exact_ngram = step_s of f16/off / step_s of
bf16/ngram (< 1: the default finishes a map step sooner).

    .venv/bin/python tools/bench/kv_cache.py [--rounds 2] [--chunks 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge_llama.config import EngineConfig
from edge_llama.engine.llamacpp import LlamaCppEngine
from edge_llama.prompting.template import ChatTemplate, template_for
from edge_llama.protocol import Message

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ngram import SUMMARY_TOKENS, map_prompts  # noqa: E402
from overhead import direct  # noqa: E402
from peer import KV_TOKENS, THREADS  # noqa: E402

CONFIGS = [("f16", "off"), ("bf16", "off"), ("bf16", "ngram"), ("q8_0", "off"), ("q8_0", "ngram")]


def cold_step(engine: LlamaCppEngine, template: ChatTemplate, text: str) -> dict:
    """One map step with nothing cached (greedy, SUMMARY_TOKENS)."""
    engine._forget_from(0)
    return direct(engine, template, text, SUMMARY_TOKENS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=2, help="map steps of the held-out text to run")
    args = parser.parse_args()

    engines = {f"{cache}/{spec}": LlamaCppEngine(EngineConfig(kv_tokens=KV_TOKENS, threads=THREADS,
                                                               kv_cache_type=cache, speculative=spec,
                                                               prompt_cache_mib=0))
               for cache, spec in CONFIGS}
    for engine in engines.values():
        engine.load()
    default = engines["f16/off"]
    template = template_for(None, default.template_info)
    prompts = [(f"{name}{i}", messages[0].content)
               for name, chunks in map_prompts(default, args.chunks).items() for i, messages in enumerate(chunks)]
    sizes = {name: len(template.tokenize([Message("user", text)], default.tokenize)) for name, text in prompts}
    rows: dict[str, dict[str, list[dict]]] = {name: {} for name in engines}
    try:
        names = list(engines)
        for r in range(args.rounds):
            for p, (prompt_name, text) in enumerate(prompts):
                k = (r * len(prompts) + p) % len(names)
                for name in names[k:] + names[:k]:
                    rows[name].setdefault(prompt_name, []).append(cold_step(engines[name], template, text))
                last = {n: rows[n][prompt_name][-1] for n in names}
                print(f"round {r} {prompt_name}: " + ", ".join(
                    f"{n} {x['ttft_ms']:.0f} ms + {x['decode_tok_s']:.1f} tok/s" for n, x in last.items()),
                    file=sys.stderr)
    finally:
        for engine in engines.values():
            engine.close()

    def med(name: str, key: str) -> float:
        return statistics.median(row[key] for runs in rows[name].values() for row in runs)

    result: dict = {name: {"prompt_ms": round(med(name, "ttft_ms")),
                           "decode_tok_s": round(med(name, "decode_tok_s"), 1),
                           "step_s": round(med(name, "step_s"), 2)} for name in engines}
    for cache in ("bf16", "q8_0"):
        result[f"{cache}_ngram_same_text"] = all(
            [row["text"] for row in rows[f"{cache}/ngram"][p]] == [row["text"] for row in rows[f"{cache}/off"][p]]
            for p in rows[f"{cache}/off"])
    result["default_step_vs_exact_ngram"] = round(result["f16/off"]["step_s"] / result["bf16/ngram"]["step_s"], 3)
    result["prompts"] = sizes
    result.update(rounds=args.rounds, summary_tokens=SUMMARY_TOKENS, kv_tokens=KV_TOKENS, threads=THREADS)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
