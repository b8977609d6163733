"""Stand-in for tensorrt_llm/runtime/model_runner_cpp.py at v0.12.0-jetson.

Every "L<n>" below is a line of tensorrt_llm/runtime/model_runner_cpp.py at NVIDIA/TensorRT-LLM commit
20a7cec991b83dace860bfc32e57eb59d65a6ad3 (v0.12.0-jetson). The control flow of from_dir, _check_inputs,
generate, _initialize_and_fill_output, _stream and _fill_output is ported line for line; what differs is marked:
tensors are on the CPU (the real one puts them on "cuda"), and paths the stand-in does not model
(encoder-decoder, prompt tables, log probs, logits) raise NotImplementedError instead of silently passing.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import torch

import tensorrt_llm.bindings.executor as trtllm

from ..bindings import GptJsonConfig, ModelConfig, WorldConfig


def _record(call: str, kwargs: dict[str, Any]) -> None:
    trtllm.record(call, kwargs)
    ModelRunnerCpp.calls.append(trtllm.CALLS[-1])


class ModelRunnerCpp:
    """L43-45: "An interface class that wraps Executor and provides generation methods." """

    calls: list[dict[str, Any]] = []  # every from_dir/generate call, in order (stand-in only)

    def __init__(self, executor: trtllm.Executor, max_batch_size: int, max_input_len: int, max_seq_len: int,
                 max_beam_width: int, model_config: ModelConfig, world_config: WorldConfig) -> None:
        # L47-61. The executor is kept as `session` (L51); later versions call it `executor`.
        self.session = executor
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        self.max_beam_width = max_beam_width
        self.model_config = model_config
        self.world_config = world_config
        self.from_dir_kwargs: dict[str, Any] = {}

    @classmethod
    def from_dir(
        cls,
        engine_dir: str,
        *,
        lora_dir: str | None = None,
        rank: int = 0,
        max_batch_size: int | None = None,
        max_input_len: int | None = None,
        max_output_len: int | None = None,
        max_beam_width: int | None = None,
        max_attention_window_size: int | None = None,
        sink_token_length: int | None = None,
        kv_cache_free_gpu_memory_fraction: float | None = None,
        medusa_choices: list[list[int]] | None = None,
        debug_mode: bool = False,
        lora_ckpt_source: str = "hf",
        gpu_weights_percent: float = 1,
        max_tokens_in_paged_kv_cache: int | None = None,
        kv_cache_enable_block_reuse: bool = False,
        enable_chunked_context: bool = False,
        is_enc_dec: bool = False,
        multi_block_mode: bool | None = None,
        enable_context_fmha_fp32_acc: bool | None = None,
        use_mmap: bool = False,
    ) -> ModelRunnerCpp:
        # L65-90: the signature, keyword-only after engine_dir, same names and defaults. An unknown keyword or a
        # positional limit is a TypeError from Python itself, as with the real one.
        given = {name: value for name, value in locals().items() if name != "cls"}
        _record("from_dir", given)

        # L144-149
        extended_runtime_perf_knob_config = trtllm.ExtendedRuntimePerfKnobConfig()
        if multi_block_mode is not None:
            extended_runtime_perf_knob_config.multi_block_mode = multi_block_mode
        if enable_context_fmha_fp32_acc is not None:
            extended_runtime_perf_knob_config.enable_context_fmha_fp32_acc = enable_context_fmha_fp32_acc

        if is_enc_dec:  # L151-197
            raise NotImplementedError("stand-in: the encoder-decoder path of from_dir is not modelled")

        # L199-201: the engine's limits come from <engine_dir>/config.json through GptJsonConfig.
        config_path = Path(engine_dir) / "config.json"
        json_config = GptJsonConfig.parse_file(config_path)
        model_config = json_config.model_config

        # L206-212
        tp_size = json_config.tensor_parallelism
        pp_size = json_config.pipeline_parallelism
        gpus_per_node = json_config.gpus_per_node
        world_config = WorldConfig.mpi(tensor_parallelism=tp_size, pipeline_parallelism=pp_size,
                                       gpus_per_node=gpus_per_node)
        assert rank == world_config.rank

        # L216-221
        kv_cache_config = trtllm.KvCacheConfig(
            free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
            max_attention_window=max_attention_window_size,
            sink_token_length=sink_token_length,
            max_tokens=max_tokens_in_paged_kv_cache,
            enable_block_reuse=kv_cache_enable_block_reuse)

        # L223-227
        decoding_config = trtllm.DecodingConfig()
        if medusa_choices is not None:
            decoding_config.medusa_choices = medusa_choices
            if multi_block_mode is not None:
                multi_block_mode = False  # Medusa doesn't support multi-block mode.

        # L229-232: the runtime batch size may not exceed the engine's.
        if max_batch_size is None:
            max_batch_size = model_config.max_batch_size
        else:
            assert max_batch_size <= model_config.max_batch_size
        # L233-234; L235-238 "NOTE{pengyunl}: remove assertion here for temp fix, model_config.max_input_len is not
        # the upper bound of input length. If runtime max_input_len is not properly set, C++ runtime will throw an
        # error when fetching new requests" -- so max_input_len is NOT checked against the engine here.
        if max_input_len is None:
            max_input_len = model_config.max_input_len
        # L239-243: max_output_len is an addend of the runtime max_seq_len, checked against the ENGINE max_seq_len.
        if max_output_len is None:
            max_seq_len = model_config.max_seq_len
        else:
            max_seq_len = max_input_len + max_output_len
            assert max_seq_len <= model_config.max_seq_len
        # L244-247
        if max_beam_width is None:
            max_beam_width = model_config.max_beam_width
        else:
            assert max_beam_width <= model_config.max_beam_width

        # L249-255: only max_beam_width, the KV cache, decoding and weights settings reach the executor.
        trtllm_config = trtllm.ExecutorConfig(
            max_beam_width=max_beam_width,
            kv_cache_config=kv_cache_config,
            decoding_config=decoding_config,
            gpu_weights_percent=gpu_weights_percent)
        trtllm_config.enable_chunked_context = enable_chunked_context
        trtllm_config.extended_runtime_perf_knob_config = extended_runtime_perf_knob_config

        # L257-258: trtllm.Executor(engine_dir, DECODER_ONLY, trtllm_config, use_mmap) -- it reads the engine
        # folder itself (and applies its own limits to each request).
        executor = trtllm.Executor(engine_dir, trtllm.ModelType.DECODER_ONLY, trtllm_config, use_mmap)

        # L265-271
        runner = cls(executor,
                     max_batch_size=max_batch_size,
                     max_input_len=max_input_len,
                     max_seq_len=max_seq_len,
                     max_beam_width=max_beam_width,
                     model_config=model_config,
                     world_config=world_config)
        runner.from_dir_kwargs = given
        return runner

    def _check_inputs(self, batch_input_ids: list[list[int]], sampling_config: trtllm.SamplingConfig,
                      max_new_tokens: int) -> None:
        # L273-294, messages verbatim.
        batch_size = len(batch_input_ids)
        if batch_size > self.max_batch_size:
            raise RuntimeError(
                f"Input batch size ({batch_size}) exceeds the engine or specified limit ({self.max_batch_size})"
            )
        input_lengths = [len(x) for x in batch_input_ids]
        max_length = max(input_lengths)
        if max_length > self.max_input_len:
            raise RuntimeError(
                f"Maximum input length ({max_length}) exceeds the engine or specified limit ({self.max_input_len})"
            )
        if max_length + max_new_tokens > self.max_seq_len:
            raise RuntimeError(
                f"Maximum input length ({max_length}) + maximum new tokens ({max_new_tokens}) exceeds the engine "
                f"or specified limit ({self.max_seq_len})"
            )
        if sampling_config.beam_width > self.max_beam_width:
            raise RuntimeError(
                f"Num beams ({sampling_config.beam_width}) exceeds the engine or specified limit "
                f"({self.max_beam_width})"
            )

    # L296-339 (the properties the stand-in can answer)
    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.model_config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.model_config.num_heads

    @property
    def max_sequence_length(self) -> int:
        return self.max_seq_len

    @property
    def remove_input_padding(self) -> bool:
        return self.model_config.use_packed_input

    @property
    def max_prompt_embedding_table_size(self) -> int:
        return self.model_config.max_prompt_embedding_table_size

    @property
    def gather_context_logits(self) -> bool:
        return self.model_config.compute_context_logits

    @property
    def gather_generation_logits(self) -> bool:
        return self.model_config.compute_generation_logits

    def generate(self,
                 batch_input_ids: list[torch.Tensor],
                 *,
                 encoder_input_ids: list[torch.Tensor] = None,  # type: ignore[assignment]
                 sampling_config: Any | None = None,
                 lora_uids: list | None = None,
                 streaming: bool = False,
                 stopping_criteria: Any | None = None,
                 logits_processor: Any | None = None,
                 max_new_tokens: int = 1,
                 end_id: int | None = None,
                 pad_id: int | None = None,
                 bad_words_list: list[list[int]] | None = None,
                 stop_words_list: list[list[int]] | None = None,
                 return_dict: bool = False,
                 output_sequence_lengths: bool = False,
                 output_log_probs: bool = False,
                 output_cum_log_probs: bool = False,
                 prompt_table: str | torch.Tensor | None = None,
                 prompt_tasks: str | None = None,
                 return_all_generated_tokens: bool = False,
                 **kwargs: Any) -> Any:
        # L341-362: the signature. **kwargs takes anything; only the sampling names below are used.
        call = {name: value for name, value in locals().items() if name not in ("self", "kwargs")}
        _record("generate", {**call, **kwargs})

        # L401-408
        if lora_uids is not None:
            raise RuntimeError("LoRA is not supported in C++ session.")
        if stopping_criteria is not None:
            raise RuntimeError(
                "Stopping criteria is not supported in C++ session.")
        if logits_processor is not None:
            raise RuntimeError(
                "Logits processor is not supported in C++ session.")

        # L410-412
        if not self.session.can_enqueue_requests():
            return []

        if encoder_input_ids or prompt_table is not None or output_log_probs or output_cum_log_probs \
                or self.gather_context_logits or self.gather_generation_logits:
            raise NotImplementedError("stand-in: encoder inputs, prompt tables, log probs and logits are not modelled")

        # L414-417
        batch_input_ids_list = [a.tolist() for a in batch_input_ids]

        if sampling_config is None:
            # L419-440: unknown keywords are dropped SILENTLY (e.g. `seed`, which only 0.13 knows as the C++ name).
            accepted_parameters = [
                "num_beams", "top_k", "top_p", "top_p_min", "top_p_reset_ids",
                "top_p_decay", "random_seed", "temperature", "min_length",
                "beam_search_diversity_rate", "repetition_penalty",
                "presence_penalty", "frequency_penalty", "length_penalty",
                "early_stopping", "no_repeat_ngram_size"
            ]
            rename_params = {"num_beams": "beam_width"}
            sampling_params = {
                k: v
                for k, v in kwargs.items() if k in accepted_parameters
            }
            for k, v in rename_params.items():
                if k in sampling_params:
                    sampling_params[v] = sampling_params.pop(k)
            if "top_p" in sampling_params and sampling_params["top_p"] == 0.0:
                sampling_params["top_p"] = None

            sampling_config = trtllm.SamplingConfig(**sampling_params)
        else:
            sampling_config = copy.deepcopy(sampling_config)  # L441-442

        # L444-446
        self._check_inputs(batch_input_ids_list, sampling_config, max_new_tokens)

        # L448-452
        output_config = trtllm.OutputConfig(
            return_context_logits=self.gather_context_logits,
            return_generation_logits=self.gather_generation_logits,
            return_log_probs=output_log_probs,
        )

        # L457-460 with _prepare_words_list (L498-502): a given list is used as is, one entry per batch item.
        stop_words = stop_words_list if stop_words_list is not None else [None] * len(batch_input_ids_list)
        bad_words = bad_words_list if bad_words_list is not None else [None] * len(batch_input_ids_list)

        # L462-481: zip() stops at the shortest list, as in the real one.
        requests = [
            trtllm.Request(
                input_token_ids=input_ids,
                encoder_input_token_ids=None,
                max_new_tokens=max_new_tokens,
                pad_id=pad_id,
                end_id=end_id,
                stop_words=stop,
                bad_words=bad,
                sampling_config=sampling_config,
                streaming=streaming,
                output_config=output_config,
                prompt_tuning_config=None,
                return_all_generated_tokens=return_all_generated_tokens)
            for input_ids, stop, bad in zip(batch_input_ids_list, stop_words, bad_words, strict=False)
        ]

        # L483-496
        request_ids = self.session.enqueue_requests(requests)
        if not streaming:
            return self._initialize_and_fill_output(request_ids, end_id,
                                                    return_dict,
                                                    output_sequence_lengths,
                                                    output_log_probs,
                                                    output_cum_log_probs,
                                                    batch_input_ids, streaming)
        else:
            return self._stream(request_ids, end_id, return_dict,
                                output_sequence_lengths, output_log_probs,
                                output_cum_log_probs, batch_input_ids,
                                batch_input_ids_list, streaming,
                                return_all_generated_tokens)

    def _initialize_and_fill_output(self, request_ids, end_id, return_dict,  # type: ignore[no-untyped-def]
                                    output_sequence_lengths, output_log_probs,
                                    output_cum_log_probs, batch_input_ids,
                                    streaming):
        # L527-543: await_responses(ids) -- the ids overload, no timeout.
        output_ids = [[] for _ in range(len(request_ids))]
        for reqid_pos in range(len(request_ids)):
            output_ids[reqid_pos] = [[] for _ in range(self.max_beam_width)]

        multi_responses = self.session.await_responses(request_ids)
        responses = [
            response for responses in multi_responses for response in responses
        ]

        return self._fill_output(responses, output_ids, end_id, return_dict,
                                 output_sequence_lengths, output_log_probs,
                                 output_cum_log_probs, batch_input_ids, [],
                                 streaming, request_ids, False)

    def _stream(self, request_ids, end_id, return_dict, output_sequence_lengths,  # type: ignore[no-untyped-def]
                output_log_probs, output_cum_log_probs, batch_input_ids,
                batch_input_ids_list, streaming, return_all_generated_tokens):
        # L545-567. The first parameter is `request_ids`: a caller can read it from the generator's frame.
        output_ids = [[] for _ in range(len(request_ids))]
        for reqid_pos in range(len(request_ids)):
            output_ids[reqid_pos] = [
                copy.deepcopy(batch_input_ids_list[reqid_pos])
                for _ in range(self.max_beam_width)
            ]

        finished_reqs = 0
        while finished_reqs < len(request_ids):
            # L557: ONE shared queue -- no ids, no timeout. It returns responses of ANY request of this executor,
            # and blocks until one comes.
            responses = self.session.await_responses()

            # L559-561: `response.result` of an error response throws (executor.h@20a7cec: getResult "Will throw an
            # exception if hasResult is true" [sic]) before _fill_output could raise its error_msg.
            for response in responses:
                if response.result.is_final:
                    finished_reqs += 1

            yield self._fill_output(responses, output_ids, end_id, return_dict,
                                    output_sequence_lengths, output_log_probs,
                                    output_cum_log_probs, batch_input_ids,
                                    batch_input_ids_list, streaming,
                                    request_ids, return_all_generated_tokens)

    def _fill_output(self, responses, output_ids, end_id, return_dict,  # type: ignore[no-untyped-def]
                     output_sequence_lengths, output_log_probs,
                     output_cum_log_probs, batch_input_ids,
                     batch_input_ids_list, streaming, request_ids,
                     return_all_generated_tokens):
        # L569 onwards. Differs: device is the CPU (L574 uses "cuda").
        device = torch.device("cpu")

        for response in responses:
            # L576-578
            if response.has_error():
                raise RuntimeError(response.error_msg)

            # L580: a response of a request not in this call's request_ids raises ValueError ("x is not in list").
            reqid_pos = request_ids.index(response.request_id)
            for beam, output_tokens in enumerate(
                    response.result.output_token_ids):
                if return_all_generated_tokens:
                    output_ids[reqid_pos][
                        beam] = batch_input_ids_list[reqid_pos] + output_tokens
                else:
                    output_ids[reqid_pos][beam] += output_tokens

        # L589-591: lengths before padding, prompt included.
        sequence_lengths = []
        for output in output_ids:
            sequence_lengths.append([len(a) for a in output])

        if streaming:
            output_ids = copy.deepcopy(output_ids)

        # L596-599: every beam padded with end_id to the RUNTIME max_seq_len (max_input_len + max_output_len).
        for beam in output_ids:
            for output_tokens in beam:
                output_tokens += (self.max_seq_len -
                                  len(output_tokens)) * [end_id]

        # L601-603: int32, shape (batch, max_beam_width, max_seq_len).
        output_ids = torch.tensor(output_ids,
                                  dtype=torch.int32,
                                  device=device)

        if return_dict:
            outputs = {'output_ids': output_ids}
            if output_sequence_lengths:
                outputs['sequence_lengths'] = torch.tensor(sequence_lengths,
                                                           dtype=torch.int32,
                                                           device=device)
            # The real one then adds logits/log probs and calls ModelRunnerMixin._prepare_outputs
            # (tensorrt_llm/runtime/model_runner.py, not read: ASSUMPTION it passes these two keys through).
        else:
            outputs = output_ids
        return outputs


# The stand-in's signatures are the real ones: tests compare against them.
FROM_DIR_SIGNATURE = inspect.signature(ModelRunnerCpp.from_dir)
GENERATE_SIGNATURE = inspect.signature(ModelRunnerCpp.generate)
