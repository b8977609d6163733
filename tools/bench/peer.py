"""Our daemon against llama.cpp's own server (llama-server), side by side in one run.

llama-server is built once from the llama.cpp tree vendored in the llama-cpp-python sdist we pin (the llama.cpp
our engine runs), with the portable flags of our wheel, and cached under ~/.cache/edge-llama/ (~7 min on 2
cores the first time). It runs on 127.0.0.1 beside real `edge-llama serve` daemons on temporary sockets: the
embedded GGUF, the same threads and context (2048), one sequence (-np 1, as our daemon), greedy. Requests
alternate between the servers, rotating who goes first, within one run. Timings are the client's.

Servers: ours with the safety guard off ("ours"), ours with the default guard ("guarded"), llama-server
("theirs"), each with its defaults otherwise (ours: engine.speculative off and an f16 KV cache; --speculative
ngram runs ours with drafts and the bf16 V cache they need).

- warm: the same chat prompt each round (its KV is cached on every server), 96 tokens. TTFT = sending the request
  to the first token event; decode = (tokens - 1) / (last token event - first token event).
- cold: a new ~330-token prompt each round (a different text from the start of the user turn), 16 tokens.

Last line, one JSON object:
- warm_decode_ratio = our warm decode tok/s / theirs (medians): ours is faster when > 1 (target >= 1.0)
- warm_ttft_ratio = our warm TTFT / theirs (medians, guard off): ours is faster when < 1 (target <= 1.0)
- cold_ttft_ratio = our cold TTFT / theirs (medians): ours is faster when < 1 (target <= 1.0)
- guard_first_text_added_ms = p50 over rounds of (first text with the guard - without it), warm prompt, our two
  daemons (target <= 5)
plus each side's medians and whether both produced the same text.

    .venv/bin/python tools/bench/peer.py [--rounds 10] [--speculative off|ngram]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from overhead import via_socket

from edge_llama.client import Client
from edge_llama.engine.base import TemplateInfo
from edge_llama.engine.llamacpp import embedded_model_path
from edge_llama.launch import DaemonProcess
from edge_llama.prompting.template import ChatTemplate, template_for
from edge_llama.protocol import Message

LLAMA_CPP_PYTHON = "0.3.36"
CMAKE_FLAGS = ["-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"]
CACHE = Path.home() / ".cache" / "edge-llama" / f"llama-server-{LLAMA_CPP_PYTHON}-native-off"
KV_TOKENS = 2048
THREADS = 2
WARM_TOKENS = 96
COLD_TOKENS = 16
WARM_PROMPT = "Write a long story about a lighthouse keeper."
HERE = Path(__file__).resolve().parent


def build_llama_server(log=sys.stderr) -> Path:  # type: ignore[no-untyped-def]
    """llama-server from the pinned sdist's vendored llama.cpp, cached with the shared libraries it links."""
    binary = CACHE / "llama-server"
    if binary.exists():
        return binary
    with tempfile.TemporaryDirectory(prefix="el-llama-server-") as tmp:
        work = Path(tmp)
        print(f"building llama-server from llama-cpp-python {LLAMA_CPP_PYTHON} (~7 min)...", file=log)
        subprocess.run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                        "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)], check=True)
        (sdist,) = work.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work)  # noqa: S202 - the pinned sdist from the package index
        src = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
        subprocess.run(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=src, check=True, stdout=log, stderr=log)
        subprocess.run(["cmake", "--build", "build", "--target", "llama-server", f"-j{os.cpu_count() or 2}"],
                       cwd=src, check=True, stdout=log, stderr=log)
        staging = CACHE.with_name(CACHE.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        # Its RUNPATH points into the build tree: run it with LD_LIBRARY_PATH on this folder (llama_server_env).
        for item in [src / "build" / "bin" / "llama-server", *(src / "build").rglob("*.so*")]:
            if not (staging / item.name).exists():
                shutil.copy2(item, staging / item.name, follow_symlinks=False)
        staging.rename(CACHE)
    return binary


class LlamaServer:
    """llama-server on 127.0.0.1:`port`; `extra` adds flags (e.g. --spec-type ngram-simple)."""

    def __init__(self, binary: Path, port: int, log: Path, extra: list[str] = ()) -> None:  # type: ignore[assignment]
        self.port = port
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
        self.proc = subprocess.Popen(
            [str(binary), "-m", str(embedded_model_path()), "-c", str(KV_TOKENS), "-t", str(THREADS), "-np", "1",
             "--host", "127.0.0.1", "--port", str(port), *extra], stdout=self._log, stderr=self._log, env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with status {self.proc.returncode}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("llama-server not ready")

    def complete(self, prompt: str, max_tokens: int, **sampling: float) -> dict:
        """One streamed /completion; client-side timings, and the server's own."""
        # A connection per request (llama-server may close it after a stream), opened before the clock starts.
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.connect()
        body = json.dumps({"prompt": prompt, "n_predict": max_tokens, "stream": True, "cache_prompt": True,
                           "temperature": 0.0, **sampling})
        sent = time.perf_counter()
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        first = last = 0.0
        pieces: list[str] = []
        final: dict = {}
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if event.get("content"):
                last = time.perf_counter()
                first = first or last
                pieces.append(event["content"])
            if event.get("stop"):
                final = event
                break
        conn.close()
        n = final["tokens_predicted"]
        return {"ttft_ms": (first - sent) * 1000, "decode_tok_s": (n - 1) / (last - first) if n > 1 else 0.0,
                "tokens": n, "text": "".join(pieces), "prompt_tokens": final["tokens_evaluated"],
                "server_decode_tok_s": final["timings"]["predicted_per_second"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()


def chat_template() -> ChatTemplate:
    """The model's own template, as our daemon renders it (llama-server gets the rendered text)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(embedded_model_path()), vocab_only=True, verbose=False)
    try:
        meta = llm.metadata
        bos, eos = (llm.detokenize([t], special=True).decode() for t in (llm.token_bos(), llm.token_eos()))
        return template_for(None, TemplateInfo(meta.get("tokenizer.chat_template"), bos, eos))
    finally:
        llm.close()


def cold_texts(rounds: int) -> list[str]:
    """A different ~330-token text per round: consecutive slices of the held-out text."""
    lines = [line for line in (HERE / "heldout.txt").read_text().splitlines() if line.strip() and
             not line.startswith("# ")]
    text = " ".join(lines)
    size = 1300  # characters: ~330 tokens with the question
    return [f"{text[i * size:(i + 1) * size]}\n\nWhat is this text about?" for i in range(rounds)]


def median(rows: list[dict], side: str, key: str) -> float:
    return statistics.median(r[side][key] for r in rows)


def start_ours(workdir: Path, name: str, guard: bool, speculative: str) -> DaemonProcess:
    config = {"engine": {"kv_tokens": KV_TOKENS, "threads": THREADS}, "server": {"state_dir": str(workdir / name)},
              "safety": {"enabled": guard}}
    if speculative == "ngram":  # exact drafts need a batch-independent KV cache (config.py)
        config["engine"].update(speculative="ngram", kv_cache_type="bf16")
    (workdir / f"{name}.yaml").write_text(json.dumps(config))
    return DaemonProcess(workdir / f"{name}.sock", ["--config", str(workdir / f"{name}.yaml")],
                         log=workdir / f"{name}.log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--speculative", choices=["off", "ngram"], default="off",
                        help="our engine.speculative (ngram: with kv_cache_type bf16)")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--build-only", action="store_true", help="build (or find) llama-server and exit")
    args = parser.parse_args()
    binary = build_llama_server()
    if args.build_only:
        print(binary)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="el-peer-", dir="/tmp"))
    template = chat_template()
    daemons = {"ours": start_ours(workdir, "ours", False, args.speculative),
               "guarded": start_ours(workdir, "guarded", True, args.speculative)}
    theirs = LlamaServer(binary, args.port, workdir / "llama-server.log")
    warm: list[dict] = []
    cold: list[dict] = []
    try:
        for d in daemons.values():
            d.wait_ready(120)
        theirs.wait_ready()
        clients = {name: Client(d.socket) for name, d in daemons.items()}
        runners = {
            "ours": lambda text, n: via_socket(clients["ours"], text, n),
            "guarded": lambda text, n: via_socket(clients["guarded"], text, n),
            "theirs": lambda text, n: theirs.complete(template.render([Message("user", text)]), n),
        }
        for run in runners.values():  # the warm prompt's KV cached everywhere; threads and caches warmed up
            run(WARM_PROMPT, WARM_TOKENS)
        texts = cold_texts(args.rounds)
        for i in range(args.rounds):
            names = list(runners)
            names = names[i % 3:] + names[:i % 3]  # who goes first rotates
            row = {}
            for name in names:
                time.sleep(0.2)  # let the previous server's threads go idle
                row[name] = runners[name](WARM_PROMPT, WARM_TOKENS)
            warm.append(row)
            row = {}
            for name in (names if i % 2 else names[::-1]):
                if name == "guarded":
                    continue
                time.sleep(0.2)
                row[name] = runners[name](texts[i], COLD_TOKENS)
            cold.append(row)
            print(f"round {i}: warm decode ours {warm[-1]['ours']['decode_tok_s']:.1f} guarded "
                  f"{warm[-1]['guarded']['decode_tok_s']:.1f} theirs {warm[-1]['theirs']['decode_tok_s']:.1f} tok/s; "
                  f"warm ttft ours {warm[-1]['ours']['ttft_ms']:.1f} guarded {warm[-1]['guarded']['ttft_ms']:.1f} "
                  f"theirs {warm[-1]['theirs']['ttft_ms']:.1f} ms; cold ttft ours {row['ours']['ttft_ms']:.0f} "
                  f"theirs {row['theirs']['ttft_ms']:.0f} ms", file=sys.stderr)
    finally:
        for d in daemons.values():
            d.stop()
        theirs.stop()

    added = sorted(r["guarded"]["ttft_ms"] - r["ours"]["ttft_ms"] for r in warm)
    result = {
        "warm_decode_ratio": round(median(warm, "ours", "decode_tok_s") / median(warm, "theirs", "decode_tok_s"), 4),
        "warm_ttft_ratio": round(median(warm, "ours", "ttft_ms") / median(warm, "theirs", "ttft_ms"), 4),
        "cold_ttft_ratio": round(median(cold, "ours", "ttft_ms") / median(cold, "theirs", "ttft_ms"), 4),
        "guard_first_text_added_ms": round(added[len(added) // 2], 2),
        "ours_warm_decode_tok_s": round(median(warm, "ours", "decode_tok_s"), 1),
        "theirs_warm_decode_tok_s": round(median(warm, "theirs", "decode_tok_s"), 1),
        "theirs_server_decode_tok_s": round(median(warm, "theirs", "server_decode_tok_s"), 1),
        "ours_warm_ttft_ms": round(median(warm, "ours", "ttft_ms"), 2),
        "theirs_warm_ttft_ms": round(median(warm, "theirs", "ttft_ms"), 2),
        "guarded_warm_first_text_ms": round(median(warm, "guarded", "ttft_ms"), 2),
        "ours_cold_ttft_ms": round(median(cold, "ours", "ttft_ms"), 1),
        "theirs_cold_ttft_ms": round(median(cold, "theirs", "ttft_ms"), 1),
        "cold_prompt_tokens": [cold[0]["ours"]["prompt_tokens"], cold[0]["theirs"]["prompt_tokens"]],
        "same_text_warm": all(r["ours"]["text"] == r["theirs"]["text"] == r["guarded"]["text"] for r in warm),
        "same_text_cold": all(r["ours"]["text"] == r["theirs"]["text"] for r in cold),
        "rounds": args.rounds, "warm_tokens": WARM_TOKENS, "cold_tokens": COLD_TOKENS, "kv_tokens": KV_TOKENS,
        "threads": THREADS, "speculative": args.speculative,
        "targets": {"warm_decode_ratio": ">= 1.0", "warm_ttft_ratio": "<= 1.0", "cold_ttft_ratio": "<= 1.0",
                    "guard_first_text_added_ms": "<= 5"},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
