"""Shared by the safety model tools: the numbers-only TF-IDF + linear-model ONNX graph, and its feature spec.

Graph (opset 13; every op is supported by TensorRT): tf [N, V] -> Mul(idf) -> row L2 norm -> MatMul(W [V, K])
-> Add(b [K]) -> calibrated sigmoid expit(-(A*f + B)) -> ReduceMean over the K models -> p [N, 1].
A linear model with a plain sigmoid is K=1, A=-1, B=0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def tfidf_linear_graph(idf: np.ndarray, weights: np.ndarray, bias: np.ndarray, cal_a: np.ndarray,
                       cal_b: np.ndarray, name: str):  # type: ignore[no-untyped-def]
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    v, k = weights.shape

    def const(array: np.ndarray, cname: str):  # type: ignore[no-untyped-def]
        return numpy_helper.from_array(np.asarray(array, dtype=np.float32), cname)

    nodes = [
        helper.make_node("Mul", ["tf", "idf"], ["tfidf"]),
        helper.make_node("Mul", ["tfidf", "tfidf"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "axes1"], ["sumsq"], keepdims=1),
        helper.make_node("Sqrt", ["sumsq"], ["norm"]),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["tfidf", "safe_norm"], ["unit"]),
        helper.make_node("MatMul", ["unit", "W"], ["raw"]),
        helper.make_node("Add", ["raw", "b"], ["f"]),
        helper.make_node("Mul", ["f", "A"], ["af"]),
        helper.make_node("Add", ["af", "B"], ["afb"]),
        helper.make_node("Neg", ["afb"], ["neg"]),
        helper.make_node("Sigmoid", ["neg"], ["p_each"]),
        helper.make_node("ReduceMean", ["p_each"], ["p"], axes=[1], keepdims=1),
    ]
    initializers = [const(idf, "idf"), const(weights, "W"), const(bias, "b"), const(cal_a, "A"), const(cal_b, "B"),
                    const(np.array([1e-12]), "eps"), numpy_helper.from_array(np.array([1], dtype=np.int64), "axes1")]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("tf", TensorProto.FLOAT, ["N", v])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-llama")
    model.ir_version = 8  # readable by onnxruntime and TensorRT 8.6/10
    onnx.checker.check_model(model)
    assert k == len(bias)
    return model


def write_features(path: Path, vocabulary: list[str], token_pattern: str, stop_words: list[str], ngram_max: int,
                   sublinear_tf: bool, source: str) -> None:
    path.write_text(json.dumps({"source": source, "token_pattern": token_pattern, "lowercase": True,
                                "ngram_max": ngram_max, "sublinear_tf": sublinear_tf,
                                "stop_words": sorted(stop_words), "vocabulary": vocabulary}, ensure_ascii=False))
