"""The stand-in `Executor` (bound in executor.cpp@20a7cec L103-143; API in executor.h@20a7cec L796-899).

Sources and abbreviations as in executor.py. How it behaves:
- Construction reads <model_path>/config.json (GptJsonConfig, as the real one reads the engine folder) and needs
  rank0.engine. The executor's own maximum input length follows trtGptModel.h (later, index id 36894874673):
  max_seq_len - 1 with chunked context, else min(max_seq_len - 1, max_num_tokens) when context FMHA and packed
  input are on, else the engine's max_input_len.
- enqueue_request refuses at once (RuntimeError) what later executorImpl.cpp checks "in enqueue thread, so
  Exceptions can be thrown to user": a logits_post_processor_name that is not in the ExecutorConfig's map
  ("LogitsPostProcessor %s not found.") and any request after shutdown() ("Shutdown called, cannot enqueue
  requests"). ASSUMPTION for 0.12 (its executor is prebuilt): the same checks, made at enqueue.
- A request is validated when the loop fetches it (the NOTE at model_runner_cpp.py@20a7cec L235-238: "C++ runtime
  will throw an error when fetching new requests"), with llmRequest.h's validate (earlier version 5862269913):
  "Prompt length (%d) exceeds maximum input length (%d).", "Draft tokens length (%d) exceeds maximum draft tokens
  length (%d).", "Prompt length + number of draft tokens (%d + %d) exceeds maximum input length (%d)." -> an error
  response; prompt + max_new_tokens + draft tokens per step (the engine's max_draft_len when the request has none)
  beyond max_seq_len -> max_new_tokens is CLAMPED with a warning, not refused.
- One iteration produces one token per active request (up to the engine's max_batch_size), after
  EDGE_LLAMA_STANDIN_TOKEN_MS; a request with external draft tokens gets, in its first iteration, every draft
  token the model agrees with plus one (greedy acceptance by token ids). A named logits post-processor is called
  before each token is chosen, from the executor's thread, as fn(request_id, logits [1, 1, vocab_size_padded]
  float32, [prompt + output], stream_ptr 0, client_id) (the stub's signature); the token is chosen from what the
  callback left. ASSUMPTION: a callback that raises, or leaves every logit -inf, ends its request with an error
  response.
- Responses are kept per request id. await_responses(id) returns that request's ready responses; "If all
  responses have already been given ... this method will hang unless a timeout is specified" (executor.h
  L862-863); with a timeout, [] when it expires. After shutdown(), await_responses raises "Shutdown called"
  (later executorImpl.cpp's TLLM_CHECK_WITH_INFO(!mShutdownCalled, "Shutdown called")).
- shutdown(): "This call is blocking. Only returns when all requests have terminated or timeout has been reached"
  (executor.h L879-881): queued and active requests run to their end first; a cancelled request the executor lost
  (EDGE_LLAMA_STANDIN_CANCEL=lost) never ends, so shutdown() blocks (EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S bounds it
  for tests). A lost request also keeps its batch slot, so with max_batch_size 1 nothing else is served.
"""

from __future__ import annotations

import datetime
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import GptJsonConfig
from ._model import Speaker, knobs
from .executor import ExecutorConfig, ModelType, Request, Response, Result, _check_int, record

_TIMEOUT_TYPES = "Optional[datetime.timedelta | float seconds]"
_MISSING = object()


def _timeout_seconds(value: Any) -> float | None:
    """pybind11/chrono.h (included by executor.cpp@20a7cec L23) loads std::chrono::milliseconds from a
    datetime.timedelta or a Python float (seconds); an int is refused. None -> std::nullopt (no timeout)."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, float):
        return value
    raise TypeError


class _StepError(Exception):
    """A request the executor cannot continue: it ends with an error response."""


class _Sequence:
    """One request inside the stand-in executor."""

    def __init__(self, request_id: int, request: Request, k: dict[str, Any]) -> None:
        self.id = request_id
        self.request = request
        end_token = k["end_token"] if k["end_token"] is not None else request.end_id
        self.speaker = Speaker(request.input_token_ids, request.sampling_config, k["reply_tokens"], end_token)
        self.max_new = request.max_new_tokens  # clamped by validation
        self.drafts = request.draft_tokens  # verified in the first iteration
        self.generated: list[int] = []  # every token chosen
        self.emitted: list[int] = []  # the ones that go into the output
        self.cancelled = False
        self.lost = False  # cancelled, and the executor never ends it (EDGE_LLAMA_STANDIN_CANCEL=lost)
        self.finished = False


class Executor:
    """Stand-in for the pybind11 class of executor.cpp@20a7cec L103-143."""

    _next_id = 1  # ASSUMPTION: id numbering (IdType is uint64; how the real one counts is not public)
    _id_lock = threading.Lock()

    def __init__(self, model_path: Any, model_type: ModelType, executor_config: ExecutorConfig,
                 use_mmap: Any = _MISSING) -> None:
        # executor.cpp L105-106: (model_path, model_type, executor_config) and, in this jetson tree only, the same
        # with use_mmap (L111-112). The encoder-decoder and engine-buffer overloads are not modelled.
        if not isinstance(model_path, (str, Path)) or not isinstance(model_type, ModelType) or \
                not isinstance(executor_config, ExecutorConfig) or \
                (use_mmap is not _MISSING and not isinstance(use_mmap, bool)):
            raise TypeError("__init__(): incompatible constructor arguments (model_path: os.PathLike, model_type: "
                            "ModelType, executor_config: ExecutorConfig[, use_mmap: bool])")
        if model_type != ModelType.DECODER_ONLY:
            raise NotImplementedError("stand-in: only decoder-only engines are modelled")
        self.model_path = str(model_path)
        self.model_type = model_type
        self.config = executor_config
        self.use_mmap = False if use_mmap is _MISSING else use_mmap
        record("Executor", {"model_path": self.model_path, "model_type": model_type.name, "use_mmap": self.use_mmap,
                            "executor_config": executor_config})
        model = GptJsonConfig.parse_file(Path(model_path) / "config.json").model_config
        engine_file = Path(model_path) / "rank0.engine"
        if not engine_file.exists():
            raise RuntimeError(f"[stand-in] no engine file {engine_file} (the real executor fails to load it)")
        self.model_config = model
        self.vocab_size_padded = model.vocab_size_padded(1)
        self.max_seq_len = model.max_seq_len
        self.max_draft_len = model.max_draft_len
        if executor_config.enable_chunked_context:
            self.max_input_len = model.max_seq_len - 1
        elif model.context_fmha and model.use_packed_input:
            self.max_input_len = min(model.max_seq_len - 1, model.max_num_tokens or 0)
        else:
            self.max_input_len = model.max_input_len
        self.batch_slots = min(model.max_batch_size, executor_config.max_batch_size or model.max_batch_size)
        self._cv = threading.Condition()
        self._queued: list[_Sequence] = []
        self._active: list[_Sequence] = []
        self._responses: dict[int, list[Response]] = {}
        self._shutdown_called = False
        self._stop = False
        self.cancelled_ids: list[int] = []
        self.enqueued: list[tuple[int, Request]] = []
        self.post_processor_calls = 0  # stand-in only
        self.accepted_draft_tokens = 0  # stand-in only
        self._thread = threading.Thread(target=self._loop, name="standin-executor", daemon=True)
        self._thread.start()

    # -- requests
    def enqueue_request(self, request: Request) -> int:
        """executor.cpp L126: `.def("enqueue_request", &Executor::enqueueRequest, py::arg("request"))`."""
        if not isinstance(request, Request):
            raise TypeError("incompatible function arguments: request must be a Request")
        if self._shutdown_called:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Shutdown called, cannot enqueue requests")
        name = request.logits_post_processor_name
        if name == Request.BATCHED_POST_PROCESSOR_NAME:
            raise NotImplementedError("stand-in: the batched logits post-processor is not modelled")
        if name is not None and name not in (self.config.logits_post_processor_map or {}):
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: LogitsPostProcessor {name} not found.")
        with Executor._id_lock:
            request_id = Executor._next_id
            Executor._next_id += 1
        record("enqueue_request", {"id": request_id, "request": request})
        sequence = _Sequence(request_id, request, knobs())
        with self._cv:
            self.enqueued.append((request_id, request))
            self._queued.append(sequence)
            self._cv.notify_all()
        return request_id

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        """executor.cpp L127: `.def("enqueue_requests", ..., py::arg("requests"))`."""
        return [self.enqueue_request(r) for r in requests]

    def _validate(self, s: _Sequence) -> str | None:
        """llmRequest.h validate (earlier version, see the module docstring), when the loop fetches the request."""
        request = s.request
        prompt, drafts = len(request.input_token_ids), len(s.drafts)
        if prompt > self.max_input_len:
            return f"Prompt length ({prompt}) exceeds maximum input length ({self.max_input_len})."
        if drafts:
            if drafts > self.max_draft_len:
                return f"Draft tokens length ({drafts}) exceeds maximum draft tokens length ({self.max_draft_len})."
            if prompt + drafts > self.max_input_len:
                return (f"Prompt length + number of draft tokens ({prompt} + {drafts}) exceeds maximum input length "
                        f"({self.max_input_len}).")
        per_step = drafts or self.max_draft_len
        if prompt + s.max_new + per_step > self.max_seq_len:
            s.max_new = self.max_seq_len - prompt - per_step
            print(f"[TensorRT-LLM][WARNING] Prompt length + number of requested output tokens + draft tokens per "
                  f"step ({prompt} + {request.max_new_tokens} + {per_step}) exceeds maximum sequence length "
                  f"({self.max_seq_len}). Number of requested output tokens is changed to ({s.max_new}).",
                  file=sys.stderr)
        if request.sampling_config.beam_width != 1:
            return "[stand-in] beam search is not modelled by the stand-in executor"
        return None

    def cancel_request(self, *args: Any, **kwargs: Any) -> None:
        """executor.cpp L140: `.def("cancel_request", &Executor::cancelRequest, py::arg("id") = py::none())` over
        executor.h L877 `void cancelRequest(IdType requestId);` -- a plain IdType, so the py::none() default cannot
        be converted: call it with an id.

        What follows a cancel is EDGE_LLAMA_STANDIN_CANCEL (ASSUMPTION, the implementation is not public):
        final -> the request ends with a final response (as later executorImpl.cpp does: terminateRequestSync with
        FinishReason kCANCELLED, then populateNewResponses); lost -> no final response ever comes (the 0.12 race
        the 0.13 release notes fix); error -> its final response is an error response.
        The cancel takes effect at the executor's next iteration, so tokens already in flight still arrive."""
        if len(args) + len(kwargs) != 1 or (kwargs and set(kwargs) != {"id"}):
            raise TypeError("cancel_request(): incompatible function arguments. Supported: (self, id: int = None)")
        request_id = args[0] if args else kwargs["id"]
        _check_int("id", request_id, optional=False, unsigned=True)
        with self._cv:
            self.cancelled_ids.append(request_id)
            for s in self._queued + self._active:
                if s.id == request_id:
                    s.cancelled = True
            # ASSUMPTION: cancelling an unknown or finished id does nothing (later versions log and ignore it).
            self._cv.notify_all()

    # -- responses
    def await_responses(self, *args: Any, **kwargs: Any) -> Any:
        """The three overloads of executor.cpp L128-138, tried in order as pybind11 does:
        1. await_responses(timeout=None) -> list[Response]: any ready responses, of any request
           (executor.h L841-842: "awaits for any ready responses ... without order guarantees");
        2. await_responses(id, timeout=None) -> list[Response] of that request;
        3. await_responses(ids, timeout=None) -> list[list[Response]], one list per id, "as if
           awaitResponses(IdType, timeout) were invoked on all IDs"; "Responses may be empty"; "If all responses
           have already been given for one of the requestIds, then this method will hang unless a timeout is
           specified." (executor.h L857-863).
        timeout: datetime.timedelta or float seconds (pybind11/chrono.h); an int is refused. Without a timeout the
        call blocks until a response comes, forever if none does (see EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S)."""
        names = list(kwargs)
        for overload in ("any", "id", "ids"):
            params = ["timeout"] if overload == "any" else [overload, "timeout"]
            if len(args) > len(params) or any(n not in params for n in names) or \
                    any(n in params[:len(args)] for n in names):
                continue
            bound = dict(zip(params, args, strict=False))
            bound.update(kwargs)
            if overload != "any" and overload not in bound:
                continue
            try:
                timeout = _timeout_seconds(bound.get("timeout"))
            except TypeError:
                continue
            if overload == "any":
                return self._await(None, timeout)
            if overload == "id":
                value = bound["id"]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    continue
                return self._await(value, timeout)
            value = bound["ids"]
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
                continue
            return [self._await(i, timeout) for i in value]
        raise TypeError("await_responses(): incompatible function arguments. The following argument types are "
                        f"supported:\n    1. (self, timeout: {_TIMEOUT_TYPES} = None) -> list[Response]\n"
                        f"    2. (self, id: int, timeout: {_TIMEOUT_TYPES} = None) -> list[Response]\n"
                        f"    3. (self, ids: list[int], timeout: {_TIMEOUT_TYPES} = None) -> list[list[Response]]\n"
                        f"Invoked with: {args!r}, {kwargs!r}")

    def _await(self, request_id: int | None, timeout: float | None) -> list[Response]:
        if self._shutdown_called:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Shutdown called")
        limit = knobs()["block_limit_s"]
        start = time.monotonic()
        with self._cv:
            while True:
                if request_id is None:
                    taken = [r for responses in self._responses.values() for r in responses]
                    self._responses.clear()
                else:
                    taken = self._responses.pop(request_id, [])
                if taken:
                    return taken
                waited = time.monotonic() - start
                if timeout is not None:
                    if waited >= timeout:
                        return []
                    self._cv.wait(timeout - waited)
                elif limit is not None and waited >= limit:
                    raise RuntimeError(f"[stand-in] await_responses({'' if request_id is None else request_id}) "
                                       f"waited {limit:g} s for a response that will never come: the real call "
                                       "blocks forever (EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S)")
                else:
                    self._cv.wait(None if limit is None else max(0.001, limit - waited))

    def get_num_responses_ready(self, id: int | None = None) -> int:  # noqa: A002 - the binding's name
        """executor.cpp L139."""
        with self._cv:
            if id is None:
                return sum(len(r) for r in self._responses.values())
            return len(self._responses.get(id, []))

    def can_enqueue_requests(self) -> bool:
        """executor.cpp L143; a single-process executor is the leader."""
        return True

    def get_latest_iteration_stats(self) -> list[Any]:
        return []

    def get_latest_request_stats(self) -> list[Any]:
        return []

    def shutdown(self) -> None:
        """executor.cpp L91-99 (releases the GIL, then mExecutor->shutdown()); executor.h L879-881: "This call is
        blocking. Only returns when all requests have terminated or timeout has been reached"."""
        limit = knobs()["block_limit_s"]
        start = time.monotonic()
        with self._cv:
            self._shutdown_called = True
            while self._queued or self._active:
                waited = time.monotonic() - start
                if limit is not None and waited >= limit:
                    raise RuntimeError(f"[stand-in] shutdown() waited {limit:g} s for requests that never terminate "
                                       f"({[s.id for s in self._active]}): the real call blocks "
                                       "(EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S)")
                self._cv.wait(None if limit is None else max(0.001, limit - waited))
            self._stop = True
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def end_lost_requests(self) -> None:
        """Stand-in only (not in the binding): the race resolves late -- each lost cancelled request ends now with
        a final response and frees its batch slot."""
        with self._cv:
            for s in [s for s in self._active if s.lost]:
                self._active.remove(s)
                self._responses.setdefault(s.id, []).append(Response(s.id, result=Result(True, [[]])))
            self._cv.notify_all()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # -- the iteration loop
    def _has_work(self) -> bool:
        return any(not s.lost for s in self._active) or (bool(self._queued) and len(self._active) < self.batch_slots)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._has_work():
                    self._cv.wait()
                if self._stop:
                    return
            token_ms = knobs()["token_ms"] or 0.0
            if token_ms > 0:
                time.sleep(token_ms / 1000.0)
            k = knobs()
            with self._cv:
                while self._queued and len(self._active) < self.batch_slots:
                    s = self._queued.pop(0)
                    error = self._validate(s)
                    if error is not None:
                        self._responses.setdefault(s.id, []).append(Response(s.id, error_msg=error))
                    else:
                        self._active.append(s)
                batch = [s for s in self._active if not s.lost]
            # Outside the lock, as the real loop runs the model (and the post-processor callbacks) while callers
            # await responses.
            produced = [(s, self._iterate(s, k)) for s in batch]
            with self._cv:
                for s, response in produced:
                    if response is not None:
                        self._responses.setdefault(s.id, []).append(response)
                    if s.finished:
                        self._active.remove(s)
                self._cv.notify_all()

    def _iterate(self, s: _Sequence, k: dict[str, Any]) -> Response | None:
        request = s.request
        if s.cancelled:
            if k["cancel"] == "lost":
                s.lost = True
                return None
            s.finished = True
            if k["cancel"] == "error":
                return Response(s.id, error_msg=f"[stand-in] Request {s.id} was cancelled")
            return Response(s.id, result=Result(True, [[] if request.streaming else self._output(s)]))
        try:
            new = self._step(s, k["end_in_output"])
        except _StepError as exc:
            s.finished = True
            return Response(s.id, error_msg=str(exc))
        if request.streaming:
            # Each streamed response carries the new tokens only (ModelRunnerCpp._stream pre-fills the prompt and
            # appends them, model_runner_cpp.py@20a7cec L549-553 and L586-587), or with return_all_generated_tokens
            # the whole beam so far.
            tokens = s.emitted if request.return_all_generated_tokens else new
            return Response(s.id, result=Result(s.finished, [list(tokens)]))
        if s.finished:
            return Response(s.id, result=Result(True, [self._output(s)]))
        return None

    def _output(self, s: _Sequence) -> list[int]:
        """A non-streamed final output: the prompt too unless exclude_input_from_output (OutputConfig, executor.h
        L170-171 "Controls if output tokens in Result should include the input tokens. Default is false.")."""
        if s.request.output_config.exclude_input_from_output:
            return list(s.emitted)
        return s.request.input_token_ids + s.emitted

    def _step(self, s: _Sequence, end_in_output: bool) -> list[int]:
        """One iteration of one request: the tokens it adds to the output."""
        drafts, s.drafts = s.drafts, []
        if drafts and s.request.logits_post_processor_name is not None:
            raise _StepError("[stand-in] draft tokens together with a logits post-processor are not modelled")
        out: list[int] = []
        while True:
            token = self._choose(s)
            out += self._append(s, token, end_in_output)
            if s.finished or not drafts or token != drafts[0]:
                return out
            drafts.pop(0)  # accepted: the next position was computed in the same forward pass
            self.accepted_draft_tokens += 1

    def _choose(self, s: _Sequence) -> int:
        meant = s.speaker.meant(len(s.generated))
        name = s.request.logits_post_processor_name
        if name is None:
            return meant
        callback = (self.config.logits_post_processor_map or {})[name]
        logits = s.speaker.logits(meant, self.vocab_size_padded)
        self.post_processor_calls += 1
        try:
            callback(s.id, logits, [s.request.input_token_ids + s.generated], 0, s.request.client_id)
        except Exception as exc:  # noqa: BLE001 - ASSUMPTION: the request fails, the executor goes on
            raise _StepError(f"[stand-in] the logits post-processor {name!r} raised {exc!r}") from exc
        token = s.speaker.choose(logits)
        if token is None:
            raise _StepError(f"[stand-in] every logit is -inf after the logits post-processor {name!r}: no token "
                             "can be chosen")
        return token

    def _append(self, s: _Sequence, token: int, end_in_output: bool) -> list[int]:
        request = s.request
        s.generated.append(token)
        s.speaker.chosen(token)
        out = [token]
        if request.end_id is not None and token == request.end_id:
            # ASSUMPTION: whether the end token is part of the output is not shown by public 0.12 source.
            s.finished = True
            out = [token] if end_in_output else []
        elif any(w and s.generated[-len(w):] == w for w in request.stop_words):
            s.finished = True  # ASSUMPTION: the stop word's tokens stay in the output
        if len(s.generated) >= s.max_new:
            s.finished = True
        s.emitted += out
        return out
