"""A stand-in `tensorrt_llm` that behaves like TensorRT-LLM 0.12.0-jetson, for tests without a GPU.

Put `tests/trtllm_standin` on PYTHONPATH (also for a daemon subprocess). `tensorrt_llm.bindings.executor` is the
executor API (Executor, ExecutorConfig, Request, ... with the real constructor signatures, keyword names and the
checks of the real sources, including logits post-processor callbacks and external draft tokens) over a stand-in
model that streams real Llama-3.2 token ids from the executor's own thread; `tensorrt_llm.runtime.ModelRunnerCpp`
is 0.12's Python wrapper over it (from_dir signature and asserts, generate's _check_inputs, sampling keyword
filtering, _stream / _fill_output). Every check cites the real source: "@20a7cec" is NVIDIA/TensorRT-LLM commit
20a7cec991b83dace860bfc32e57eb59d65a6ad3 (tag v0.12.0-jetson); the data behind it is
tests/data/trtllm_0_12_jetson.json. What no public 0.12 source shows is marked ASSUMPTION where it is modelled.

Knobs (environment variables, read at each use, so a daemon subprocess can be configured):
- EDGE_LLAMA_STANDIN_TOKEN_MS      ms per executor iteration (one token per active request), default 5.
- EDGE_LLAMA_STANDIN_REPLY_TOKENS  words the model says before its end token, default 12.
- EDGE_LLAMA_STANDIN_END_TOKEN     the token the model emits after its reply (default: the request's end_id).
                                   E.g. 128009 (<|eot_id|>) with end_id 128001: the request then only stops if
                                   128009 is in its stop_words_list; otherwise the model rambles on to
                                   max_new_tokens, as a real model would.
- EDGE_LLAMA_STANDIN_END_IN_OUTPUT 1: the end_id token is part of the output; 0 (default): it is not.
- EDGE_LLAMA_STANDIN_CANCEL        what a cancelled request produces:
                                   final (default): a final response (later executors do this);
                                   lost: nothing, ever: await_responses() without timeout blocks forever (the 0.12
                                   race fixed in 0.13: "Fixed the hang caused by race condition when canceling
                                   requests");
                                   error: an error response, which _fill_output raises as RuntimeError(error_msg).
- EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S unset (default): a wait that would block forever does; set: it raises
                                   RuntimeError after that many seconds instead (a test-safety valve, not real).
- EDGE_LLAMA_STANDIN_TOKEN_MS=0    no delay at all: tokens as fast as the stand-in can make them (benchmarks).
- EDGE_LLAMA_STANDIN_RECORD        a file path: every Executor construction, enqueue_request and ModelRunnerCpp
                                   from_dir/generate call is appended to it as a JSON line
                                   ({"call": ..., "kwargs": {...}}), for tests that drive a daemon subprocess.
In-process, tensorrt_llm.bindings.executor.CALLS holds the same records (ModelRunnerCpp.calls its own ones) and
each runner keeps `from_dir_kwargs`.

The model (tensorrt_llm/bindings/_model.py): greedy (top_k == 1) output is a fixed function of the prompt ids;
sampled output also depends on random_seed (and temperature/top_k/top_p). Tokens are ids of common English words
("Ġthe", "Ġquick", ...); under a logits post-processor, whatever token the callback leaves the highest.
"""

__version__ = "0.12.0"
