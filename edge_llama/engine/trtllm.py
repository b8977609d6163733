"""TensorRT-LLM backend (Jetson, TRT-LLM 0.12.0-jetson): an INT4-AWQ engine built by `edge-llama build`.

NOT VERIFIED ON HARDWARE: this machine has no GPU. Every call below was written against the v0.12.0-jetson
sources (NVIDIA/TensorRT-LLM 20a7cec; tests/data/trtllm_0_12_jetson.json quotes them) and is tested against a
stand-in runner that enforces the same asserts and checks (tests/trtllm_standin/).

- from_dir: `max_input_len + max_output_len` must not exceed the engine's max_seq_len (an assert in 0.12), so we
  pass the engine's own max_input_len and the rest of its max_seq_len, read from the engine's config.json.
- KV cache: `max_tokens_in_paged_kv_cache` = engine.kv_tokens, an explicit token count. Never a fraction of
  free memory: on Jetson's unified memory that starves the OS (and free-memory readings ignore page cache).
  The fraction is still passed (0.9), because when both are set TRT-LLM takes the smaller.
- `use_mmap=True`: the engine file is mapped instead of read into a heap buffer. Without it the process holds a
  second copy of the weights (NVIDIA's README4Jetson: 12.3 GB total vs 7.3 GB for an INT4 8B engine); with it the
  file's pages are clean page cache the kernel can drop, which is why the plan does not count them as resident.
- Block reuse (`kv_cache_enable_block_reuse`) keeps a conversation's earlier turns in the paged cache.
- Tokenization is ours (`tokenizers` + the model's chat template); TRT-LLM's runner only sees ids.
- Sampling: 0.12 takes `random_seed` (`seed` is 0.13+ and would be silently dropped); each request gets its own
  seed, else a random one, so sampled replies differ.
- Streaming and cancel: 0.12's generator reads the executor's ONE response queue (`await_responses()` with no id
  and no timeout). A reader thread drains it, so the engine thread can watch the cancel flag while the executor
  computes and can bound the wait for a cancelled request to end. Every stream is read to its end (a final
  response left unread would reach the next request's generator, which fails on the unknown id). An error
  response for a cancelled request ends it as cancelled. If a cancelled request does not end within
  CANCEL_WAIT_S (0.12 has a cancel race, fixed in 0.13), the request still ends as cancelled and the engine
  reports a fault until the executor's final response arrives: meanwhile requests get `unavailable`, `health`
  shows it, and the systemd watchdog is not pinged, so the service restarts if it never does.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_llama.config import EngineConfig
from edge_llama.engine.base import Capacity, Chunk, Engine, GenParams, tokenizer_config_info
from edge_llama.errors import ConfigError, InternalError, ModelError, Unavailable
from edge_llama.manifest import verify_manifest

log = logging.getLogger("edge_llama.engine")

KV_FRACTION_CEILING = 0.9  # TRT-LLM uses min(this x free memory, max_tokens_in_paged_kv_cache)
CANCEL_WAIT_S = 5.0  # a cancelled request must end on the executor within this, else the engine is faulted
POLL_S = 0.02  # how often the engine thread looks at the cancel flag while the executor computes


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


@dataclass(frozen=True)
class EngineLimits:
    """The limits an engine was built with (its config.json `build_config`, written by trtllm-build)."""

    max_batch_size: int
    max_beam_width: int
    max_input_len: int
    max_seq_len: int

    @classmethod
    def read(cls, folder: Path) -> EngineLimits:
        try:
            build = json.loads((folder / "config.json").read_text())["build_config"]
            return cls(int(build["max_batch_size"]), int(build["max_beam_width"]), int(build["max_input_len"]),
                       int(build["max_seq_len"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{folder}/config.json is not a TensorRT-LLM engine config ({exc!r}): rebuild the "
                             "engine with `edge-llama build`") from None


_END = object()  # the reader thread's "the generator returned"


class _Responses:
    """Drains one streaming generator on its own thread into a queue, so its reader never blocks the engine
    thread: outputs (dicts), an exception the generator raised, then _END."""

    def __init__(self, stream: Iterator[dict[str, Any]]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._drain, args=(stream,), name="trtllm-responses", daemon=True)
        self._thread.start()

    def _drain(self, stream: Iterator[dict[str, Any]]) -> None:
        try:
            for output in stream:
                self._queue.put(output)
        except BaseException as exc:  # noqa: BLE001 - handed to the engine thread
            self._queue.put(exc)
        self._queue.put(_END)

    def get(self, timeout: float) -> Any:
        """The next item, or None when nothing came within `timeout` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()


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
        self._unfinished: tuple[list[int], float, _Responses] | None = None  # a cancel the executor never ended

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
        limits = EngineLimits.read(self._dir)
        kv_tokens = self._config.kv_tokens
        planned = int(self._manifest.get("build", {}).get("max_kv_tokens", kv_tokens))
        if kv_tokens > planned:
            raise ConfigError(f"engine.kv_tokens={kv_tokens} is more than the plan this engine was built for "
                              f"allows ({planned}): re-plan or lower it")
        if kv_tokens > limits.max_input_len + 1:
            # The context policy may fill all but one token of the budget with prompt; 0.12's generate() raises
            # for a prompt longer than max_input_len.
            raise ConfigError(f"engine.kv_tokens={kv_tokens} needs an engine built with --max_input_len >= "
                              f"{kv_tokens - 1}; this one has {limits.max_input_len}: lower engine.kv_tokens")
        self._capacity = Capacity(kv_tokens=kv_tokens, max_seq_len=limits.max_seq_len)
        try:
            from tensorrt_llm.runtime import ModelRunnerCpp
        except ImportError:
            raise ModelError("tensorrt_llm is not importable: the trtllm backend runs on a Jetson with "
                             "TensorRT-LLM 0.12.0-jetson (see README, Jetson deployment)") from None
        self._runner = ModelRunnerCpp.from_dir(**self.runner_kwargs(limits))

    def runner_kwargs(self, limits: EngineLimits) -> dict[str, Any]:
        """Keywords for ModelRunnerCpp.from_dir; the values satisfy 0.12's asserts against the engine's limits."""
        return {
            "engine_dir": str(self._dir),
            "max_batch_size": 1,
            "max_beam_width": 1,
            # from_dir asserts max_input_len + max_output_len <= the engine's max_seq_len.
            "max_input_len": limits.max_input_len,
            "max_output_len": limits.max_seq_len - limits.max_input_len,
            "max_tokens_in_paged_kv_cache": self._config.kv_tokens,
            "kv_cache_free_gpu_memory_fraction": KV_FRACTION_CEILING,
            "kv_cache_enable_block_reuse": True,
            "enable_chunked_context": bool(self._manifest.get("build", {}).get("use_paged_context_fmha", True)),
            "use_mmap": True,
        }

    def generate_kwargs(self, prompt_ids: Sequence[int], params: GenParams) -> dict[str, Any]:
        """Keywords for ModelRunnerCpp.generate; sampling ones are among those 0.12 accepts (others are dropped
        silently there, so a wrong name would not even fail)."""
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
            "random_seed": params.seed if params.seed is not None else secrets.randbits(63),
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

    def fault(self) -> str | None:
        if self._unfinished is None or self._unfinished[2].done:
            return None  # (a late final response ends the fault: the executor's queue is clean again)
        request_ids, since, _ = self._unfinished
        return (f"TensorRT-LLM has not ended cancelled request {request_ids} for {time.monotonic() - since:.0f} s "
                "(a known 0.12 executor race): no request can be served until it does or the daemon restarts")

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
        fault = self.fault()
        if fault:
            raise Unavailable(fault)
        self._unfinished = None
        if cancel.is_set():
            yield Chunk("", "cancelled")
            return
        prompt_len = len(prompt_ids)
        try:
            stream = self._runner.generate(**self.generate_kwargs(prompt_ids, params))
        except RuntimeError as exc:  # 0.12's _check_inputs: the context policy should make this impossible
            raise InternalError(f"TensorRT-LLM refused the request: {exc}") from exc
        # 0.12's generate() enqueues the request, then returns `self._stream(request_ids, ...)`: the ids are the
        # generator's argument, readable before it runs. They are what the executor cancels.
        request_ids = list(stream.gi_frame.f_locals["request_ids"])
        responses = _Responses(stream)
        detok = IncrementalDetokenizer(self.detokenize)
        produced = 0
        ended = False  # an end token or max_tokens seen: the request is finishing on its own
        cancelled_at: float | None = None
        while True:
            item = responses.get(POLL_S)
            if item is _END:
                break
            if isinstance(item, BaseException):
                if cancelled_at is not None:  # the executor's answer to the cancel: the request ended
                    log.debug("cancelled request %s ended with: %s", request_ids, item)
                    break
                raise InternalError(f"TensorRT-LLM failed: {item}") from item
            if item is not None and not ended and cancelled_at is None:
                # output_ids[0][0] is the prompt + every token so far, padded with end_id to max_seq_len.
                seq_len = int(item["sequence_lengths"][0][0])
                for token in item["output_ids"][0][0][prompt_len + produced:seq_len].tolist():
                    if token in self._end_ids:
                        ended = True
                        break
                    produced += 1
                    yield Chunk(detok.add(token))
                ended = ended or produced >= params.max_tokens
            if cancel.is_set() and cancelled_at is None and not ended:
                cancelled_at = time.monotonic()
                if not responses.done:  # never cancel a request whose stream already ended
                    for request_id in request_ids:
                        self._runner.session.cancel_request(request_id)
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_WAIT_S:
                # Its reader stays blocked on the shared queue: a next request's responses would go to it.
                self._unfinished = (request_ids, cancelled_at, responses)
                log.error("%s", self.fault())
                break
        # The end token itself may or may not be in the output: a request that ended short of max_tokens stopped.
        if cancelled_at is not None:
            finish = "cancelled"
        else:
            finish = "stop" if produced < params.max_tokens else "length"
        yield Chunk("", finish)  # type: ignore[arg-type]
