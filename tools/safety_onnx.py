"""Shared by the safety model tools: the numbers-only TF-IDF + linear-model ONNX graph, and its feature spec.

Graph (opset 13; every op is supported by TensorRT): tf [N, V] -> TF-IDF, row L2 norm and MatMul(W [V, K])
computed as (tf @ (idf*W)) / sqrt(tf^2 @ idf^2) -> Add(b [K]) -> calibrated sigmoid expit(-(A*f + B)) ->
ReduceMean over the K models -> p [N, 1].
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

    # tf is sparse and V is large: keep elementwise work on [N, V] to one Mul, move the rest into MatMuls.
    # (tf*idf)/||tf*idf|| @ W == (tf @ (idf*W)) / sqrt(tf^2 @ idf^2)
    nodes = [
        helper.make_node("MatMul", ["tf", "idfW"], ["raw_unnormed"]),
        helper.make_node("Mul", ["tf", "tf"], ["tf2"]),
        helper.make_node("MatMul", ["tf2", "idf2"], ["sumsq"]),
        helper.make_node("Sqrt", ["sumsq"], ["norm"]),
        helper.make_node("Max", ["norm", "eps"], ["safe_norm"]),
        helper.make_node("Div", ["raw_unnormed", "safe_norm"], ["raw"]),
        helper.make_node("Add", ["raw", "b"], ["f"]),
        helper.make_node("Mul", ["f", "A"], ["af"]),
        helper.make_node("Add", ["af", "B"], ["afb"]),
        helper.make_node("Neg", ["afb"], ["neg"]),
        helper.make_node("Sigmoid", ["neg"], ["p_each"]),
        helper.make_node("ReduceMean", ["p_each"], ["p"], axes=[1], keepdims=1),
    ]
    initializers = [const(idf[:, None] * weights, "idfW"), const((idf**2)[:, None], "idf2"), const(bias, "b"),
                    const(cal_a, "A"), const(cal_b, "B"), const(np.array([1e-12]), "eps")]
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
