"""TensorRT-LLM backend (Jetson, TRT-LLM 0.12.0-jetson): an INT4-AWQ engine built by `edge-llama build`.

NOT VERIFIED ON HARDWARE: this machine has no GPU. The calls below use only keywords present in the 0.12-era
API (tests/data/trtllm_api_0_12.json records them and where they come from; tests/test_trtllm_contract.py checks
every keyword we pass). What is tested here: manifest checks, tokenization, chat template, detokenization and
the streaming loop against a stand-in runner.

- KV cache: `max_tokens_in_paged_kv_cache` = engine.kv_tokens, an explicit token count. Never a fraction of
  free memory: on Jetson's unified memory that starves the OS (and free-memory readings ignore page cache).
  The fraction is still passed (0.9), because when both are set TRT-LLM takes the smaller.
- Block reuse (`kv_cache_enable_block_reuse`) keeps a conversation's earlier turns in the paged cache.
- Tokenization is ours (`tokenizers` + the model's chat template); TRT-LLM's runner only sees ids.
- Cancellation: ModelRunnerCpp's streaming generator does not expose its request ids; they are read from the
  generator's frame and cancelled on the executor (`session` in 0.12, `executor` later), so a cancelled answer
  frees the engine instead of running to max_new_tokens in the background.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_llama.config import EngineConfig
from edge_llama.engine.base import Capacity, Chunk, Engine, GenParams, tokenizer_config_info
from edge_llama.errors import ConfigError, InternalError, ModelError
from edge_llama.pipeline.manifest import verify_manifest

KV_FRACTION_CEILING = 0.9  # TRT-LLM uses min(this x free memory, max_tokens_in_paged_kv_cache)


class IncrementalDetokenizer:
    """Text of a growing id sequence, emitted piece by piece without ever splitting a character.

    Byte-level BPE tokens can end inside a UTF-8 character, and some tokenizers change earlier text when later
    tokens arrive; decoding a short window (from `prefix` to the end) and emitting only what follows the part
    already sent handles both (the approach of text-generation-inference).
    """

    def __init__(self, decode: Any) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids[:read] are already emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text):]
        return ""


class TrtLlmEngine(Engine):
    name = "trtllm"

    def __init__(self, config: EngineConfig) -> None:
        if not config.model:
            raise ConfigError("engine.model must name the engine folder made by `edge-llama build`")
        self._config = config
        self._dir = Path(config.model).expanduser()
        self._manifest = verify_manifest(self._dir, kind="trtllm-engine", backend="trtllm")
        self._runner: Any = None
        self._tokenizer: Any = None
        self._plain_tokenizer: Any = None  # the same vocabulary, special-token text encoded as plain text
        self._end_ids: list[int] = []
        self._pad_id = 0

    def load(self) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ModelError("the trtllm backend needs `tokenizers`: pip install 'edge-llama[jetson]'") from None
        tokenizer_file = self._dir / "tokenizer.json"
        if not tokenizer_file.exists():
            raise ModelError(f"{self._dir} has no tokenizer.json (`edge-llama build` copies it from the checkpoint)")
        self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._plain_tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self._plain_tokenizer.encode_special_tokens = True  # tokenizers >= 0.19
        self._template = tokenizer_config_info(self._dir / "tokenizer_config.json")
        self._end_ids = self._end_token_ids()
        self._pad_id = self._end_ids[0]
        build = self._manifest.get("build", {})
        max_seq_len = int(build.get("max_seq_len", self._config.kv_tokens))
        if self._config.kv_tokens > int(build.get("max_kv_tokens", self._config.kv_tokens)):
            raise ConfigError(f"engine.kv_tokens={self._config.kv_tokens} is more than the plan this engine was "
                              f"built for allows ({build['max_kv_tokens']}): re-plan or lower it")
        self._capacity = Capacity(kv_tokens=self._config.kv_tokens, max_seq_len=max_seq_len)
        try:
            from tensorrt_llm.runtime import ModelRunnerCpp
        except ImportError:
            raise ModelError("tensorrt_llm is not importable: the trtllm backend runs on a Jetson with "
                             "TensorRT-LLM 0.12.0-jetson (see README, Jetson deployment)") from None
        self._runner = ModelRunnerCpp.from_dir(**self.runner_kwargs(build))

    def runner_kwargs(self, build: dict[str, Any]) -> dict[str, Any]:
        """Keywords for ModelRunnerCpp.from_dir (all in the 0.12 API; checked by the contract test)."""
        return {
            "engine_dir": str(self._dir),
            "max_batch_size": 1,
            "max_input_len": int(build.get("max_input_len", self._config.kv_tokens - 1)),
            "max_output_len": int(build.get("max_seq_len", self._config.kv_tokens)) - 1,
            "max_beam_width": 1,
            "max_tokens_in_paged_kv_cache": self._config.kv_tokens,
            "kv_cache_free_gpu_memory_fraction": KV_FRACTION_CEILING,
            "kv_cache_enable_block_reuse": True,
            "enable_chunked_context": bool(build.get("use_paged_context_fmha", True)),
        }

    def generate_kwargs(self, prompt_ids: Sequence[int], params: GenParams) -> dict[str, Any]:
        """Keywords for ModelRunnerCpp.generate (all in the 0.12 API; checked by the contract test)."""
        import torch

        return {
            "batch_input_ids": [torch.tensor(list(prompt_ids), dtype=torch.int32)],
            "max_new_tokens": params.max_tokens,
            "end_id": self._end_ids[0],
            "pad_id": self._pad_id,
            "stop_words_list": [[[i] for i in self._end_ids[1:]]] if len(self._end_ids) > 1 else None,
            "streaming": True,
            "return_dict": True,
            "output_sequence_lengths": True,
            # TRT-LLM samples greedily at top_k=1; temperature 0 is not a valid value there.
            "temperature": max(params.temperature, 1e-5),
            "top_k": 1 if params.temperature == 0 else 40,
            "top_p": params.top_p,
            "random_seed": params.seed if params.seed is not None else 0,
        }

    def _end_token_ids(self) -> list[int]:
        """eos from tokenizer_config / generation_config, plus Llama 3's <|eot_id|> and <|eom_id|>."""
        ids: list[int] = []
        gen = self._dir / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
        for text in (self._template.eos_token if self._template else "", "<|eot_id|>", "<|eom_id|>", "<|im_end|>"):
            token = self._tokenizer.token_to_id(text) if text else None
            if token is not None and token not in ids:
                ids.append(token)
        if not ids:
            raise ModelError(f"{self._dir}: no end-of-sequence token found in the tokenizer files")
        return ids

    def close(self) -> None:
        self._runner = None

    @property
    def model_name(self) -> str:
        return str((self._manifest.get("model") or {}).get("name") or self._dir.name)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        tokenizer = self._tokenizer if special else self._plain_tokenizer
        return tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        if self._runner is None:
            raise InternalError("engine used before load()")
        if cancel.is_set():
            yield Chunk("", "cancelled")
            return
        prompt_len = len(prompt_ids)
        stream = self._runner.generate(**self.generate_kwargs(prompt_ids, params))
        detok = IncrementalDetokenizer(self.detokenize)
        produced = 0
        stopped = cancelled = False
        try:
            # Read to the end even after an end token or a cancel: 0.12's generator reads the executor's one
            # response queue without filtering by request, so a response left unread (the final one of a
            # cancelled request) would reach the next generate(), which fails on the unknown request id.
            for output in stream:
                if stopped or cancelled:
                    continue
                seq_len = int(output["sequence_lengths"][0][0])  # output_ids[0][0] = prompt + tokens so far
                for token in output["output_ids"][0][0][prompt_len + produced:seq_len].tolist():
                    if token in self._end_ids:
                        stopped = True
                        break
                    produced += 1
                    yield Chunk(detok.add(token))
                if not stopped and cancel.is_set():
                    cancelled = True
                    self._cancel(stream)
        finally:
            stream.close()
        # The end token itself may or may not be in the output: a request that ended short of max_tokens stopped.
        finish = "cancelled" if cancelled else "stop" if stopped or produced < params.max_tokens else "length"
        yield Chunk("", finish)  # type: ignore[arg-type]

    def _cancel(self, stream: Any) -> None:
        """Cancel the streaming request on the executor (see the module docstring)."""
        frame = getattr(stream, "gi_frame", None)
        request_ids = frame.f_locals.get("request_ids") if frame is not None else None
        executor = getattr(self._runner, "session", None) or getattr(self._runner, "executor", None)
        if executor is None or not request_ids:
            return
        for request_id in request_ids:
            executor.cancel_request(request_id)
