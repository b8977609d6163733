"""`edge-llama build`: checkpoint + plan -> a TensorRT-LLM engine folder with its manifest.

Runs `trtllm-build` (TensorRT-LLM 0.12.0-jetson) with the planned flags, streams its log to the terminal and to
build.log, copies the tokenizer files the runtime needs, and writes manifest.json (flags, plan, versions, file
hashes). Engines are tied to the GPU, the TensorRT version and the JetPack release, so this runs on the target
device; without TensorRT-LLM it stops with one clear error saying so.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from edge_llama import __version__
from edge_llama.errors import ConfigError, EdgeLlamaError, ModelError
from edge_llama.manifest import MANIFEST, file_entries, sha256_file, verify_manifest, write_manifest
from edge_llama.pipeline.plan import load_plan
from edge_llama.pipeline.quantize import TOKENIZER_FILES


def find_trtllm_build() -> str:
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise ModelError(
            "trtllm-build was not found: TensorRT-LLM engines must be built on the Jetson that runs them (they are "
            "tied to its GPU, TensorRT version and JetPack). On the device: install the TensorRT-LLM "
            "0.12.0-jetson wheel in the venv, then run `edge-llama build` there (README: Jetson deployment)")
    return exe


def build_command(exe: str, checkpoint: Path, out: Path, plan: dict[str, Any]) -> list[str]:
    return [exe, "--checkpoint_dir", str(checkpoint), "--output_dir", str(out), *plan["trtllm_build_flags"],
            "--log_level", "info"]


def _versions() -> dict[str, str]:
    out = {"edge-llama": __version__}
    for dist in ("tensorrt_llm", "tensorrt", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def build(checkpoint: Path, plan_path: Path, out: Path, force: bool = False) -> Path:
    source = verify_manifest(checkpoint, kind="trtllm-checkpoint", backend="trtllm")
    plan = load_plan(plan_path)
    quantization = source["quantization"]
    kv_cache, planned_kv = quantization.get("kv_cache", "fp16"), plan.get("kv_dtype", "fp16")
    if kv_cache != planned_kv:  # the plan's flags differ for INT8 KV (no paged context FMHA) and its memory too
        raise ConfigError(f"the checkpoint has an {kv_cache.upper()} KV cache but the plan assumes {planned_kv}: "
                          f"re-plan with --kv-dtype {kv_cache}")
    lm_head, planned_head = quantization.get("lm_head", "fp16"), plan.get("lm_head", "fp16")
    if lm_head != planned_head:
        raise ConfigError(f"the checkpoint has an {lm_head.upper()} lm_head but the plan assumes {planned_head}: "
                          f"re-plan with --lm-head {lm_head}")
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out} is not empty (use --force to overwrite)")
    exe = find_trtllm_build()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = build_command(exe, checkpoint, out, plan)
    print("build: " + " ".join(command), file=sys.stderr)
    started = time.monotonic()
    tail: deque[str] = deque(maxlen=20)
    with open(out / "build.log", "w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # streamed as it comes: a Jetson build takes minutes
            sys.stderr.write(line)
            log.write(line)
            tail.append(line.rstrip())
    if proc.returncode != 0:
        raise EdgeLlamaError(f"trtllm-build failed with status {proc.returncode} (log: {out / 'build.log'}); "
                             "last lines:\n  " + "\n  ".join(tail))
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copy2(checkpoint / name, out / name)
    flags = plan["trtllm_build_flags"]
    value = dict(zip(flags[::2], flags[1::2], strict=True))  # flag, value pairs
    return write_manifest(out, kind="trtllm-engine", fields={
        "source_checkpoint": {"path": str(checkpoint),
                              "manifest_sha256": sha256_file(checkpoint / MANIFEST)},
        "quantization": source["quantization"],
        "model": {**source.get("model", {}), "name": plan["model"]["name"]},
        "build": {"command": command[1:], "max_seq_len": int(value["--max_seq_len"]),
                  "max_input_len": int(value["--max_input_len"]), "max_num_tokens": int(value["--max_num_tokens"]),
                  "max_kv_tokens": plan["kv_tokens"],
                  "use_paged_context_fmha": value.get("--use_paged_context_fmha") == "enable",
                  "seconds": round(time.monotonic() - started, 1)},
        "plan": {k: plan.get(k) for k in ("device", "kv_tokens", "kv_dtype", "lm_head", "resident_bytes",
                                           "decode_ceiling_tok_s")},
        "tools": _versions(),
        "files": file_entries(out),
    })
