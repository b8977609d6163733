"""The built-in classifier graphs evaluated with numpy: no onnxruntime in the daemon.

The built-in graphs are one fixed chain (tools/safety_onnx.py): tf [N, V] -> (tf @ idfW) / max(sqrt(tf^2 @ idf2),
eps) + b -> sigmoid(-(A*f + B)) -> mean over the K models -> p [N]. This module reads the .onnx file itself,
checks that its nodes are exactly that chain, takes the initializers, and computes it. onnxruntime costs the
daemon ~39 MiB of resident memory (19 MiB anonymous) for two graphs of 0.5 MB; numpy is loaded anyway. Any
other graph is refused with a clear error (use `safety.runtime: onnxruntime` for it). Parity with onnxruntime is
tested on both built-in models.

The file is read with a minimal protobuf decoder: ModelProto.graph (field 7) -> GraphProto.node (1, op_type 4)
and GraphProto.initializer (5) -> TensorProto dims (1), data_type (2), float_data (4), name (8), raw_data (9).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_llama.errors import ModelError

# The op chain of tools/safety_onnx.py:tfidf_linear_graph, in order.
CHAIN = ("MatMul", "Mul", "MatMul", "Sqrt", "Max", "Div", "Add", "Mul", "Add", "Neg", "Sigmoid", "ReduceMean")
FLOAT = 1  # TensorProto.DataType.FLOAT


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, wire, value
        elif wire == 2:
            length, i = _varint(buf, i)
            yield field, wire, buf[i:i + length]
            i += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield field, wire, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    name, dims, dtype = "", [], 0
    raw, floats = b"", bytearray()
    for field, wire, value in _fields(buf):
        if field == 1:  # dims: packed (wire 2) or one varint each
            if wire == 2:
                j = 0
                while j < len(value):
                    dim, j = _varint(value, j)
                    dims.append(dim)
            else:
                dims.append(value)
        elif field == 2:
            dtype = value
        elif field == 4:  # float_data: packed, or one fixed32 each
            floats += value
        elif field == 8:
            name = bytes(value).decode()
        elif field == 9:
            raw = bytes(value)
    if dtype != FLOAT:
        raise ValueError(f"initializer {name!r} is not float32")
    return name, np.frombuffer(raw or bytes(floats), dtype="<f4").reshape(dims).astype(np.float32)


def read_graph(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The op types of an ONNX file's nodes, in order, and its float initializers by name."""
    model = path.read_bytes()
    graph = next((value for field, wire, value in _fields(model) if field == 7 and wire == 2), None)
    if graph is None:
        raise ValueError("no graph")
    ops: list[str] = []
    tensors: dict[str, np.ndarray] = {}
    for field, wire, value in _fields(graph):
        if field == 1 and wire == 2:
            ops += [bytes(v).decode() for f, _, v in _fields(value) if f == 4]
        elif field == 5 and wire == 2:
            name, array = _tensor(value)
            tensors[name] = array
    return ops, tensors


class NumpyRunner:
    """Runs a built-in TF-IDF + linear classifier graph with numpy (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        try:
            ops, t = read_graph(path)
            if tuple(ops) != CHAIN:
                raise ValueError(f"its nodes are {' '.join(ops)}, not the built-in chain")
            self._idf_w = t["idfW"]  # [V, K]: idf folded into the linear models' weights
            self._idf2 = t["idf2"][:, 0]  # [V]: idf squared, for the row norm
            self._b, self._a, self._c, self._eps = t["b"], t["A"], t["B"], float(t["eps"].reshape(-1)[0])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise ModelError(f"{path.name} cannot run on the numpy runtime ({exc}); "
                             "set safety.runtime: onnxruntime") from exc

    def run(self, features: np.ndarray) -> np.ndarray:
        """[N, V] float32 term frequencies -> [N] probabilities. Only the columns some row uses are read: a
        short text has tens of terms out of ~15,000."""
        used = np.flatnonzero(features.any(axis=0))
        tf = features[:, used]
        raw = tf @ self._idf_w[used]  # [N, K]
        norm = np.maximum(np.sqrt((tf * tf) @ self._idf2[used]), self._eps)[:, None]
        f = raw / norm + self._b
        with np.errstate(over="ignore"):  # exp overflow -> inf -> probability 0, as the sigmoid saturates
            return (1.0 / (1.0 + np.exp(self._a * f + self._c))).mean(axis=1).astype(np.float32)
