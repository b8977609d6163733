"""Rebuild alt-profanity-check's model (MIT) as a numbers-only ONNX graph + feature spec, and check parity.

alt-profanity-check = TfidfVectorizer(lowercase, English stop words, token regex) + CalibratedClassifierCV(
LinearSVC, sigmoid, 5 folds). Its string ops do not run on TensorRT, so the vectorizer's tokenization stays in
Python (edge_llama/safety/features.py) and the arithmetic goes into the graph.

    .venv/bin/python tools/build_offensive_onnx.py   # needs alt-profanity-check (--no-deps), scikit-learn, onnx
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "edge_llama" / "data" / "safety"
sys.path.insert(0, str(Path(__file__).parent))

from safety_onnx import tfidf_linear_graph, write_features  # noqa: E402


def load_original():  # type: ignore[no-untyped-def]
    import joblib

    spec = importlib.util.find_spec("profanity_check")
    if spec is None or spec.origin is None:
        raise SystemExit("install alt-profanity-check==1.9.1 --no-deps first")
    data = Path(spec.origin).parent / "data"
    return joblib.load(data / "vectorizer.joblib"), joblib.load(data / "model.joblib")


def main() -> None:
    import onnx

    vectorizer, model = load_original()
    vocabulary = [None] * len(vectorizer.vocabulary_)
    for term, column in vectorizer.vocabulary_.items():
        vocabulary[column] = term
    folds = model.calibrated_classifiers_
    weights = np.stack([f.estimator.coef_[0] for f in folds], axis=1)  # [V, 5]
    bias = np.array([f.estimator.intercept_[0] for f in folds])
    cal_a = np.array([f.calibrators[0].a_ for f in folds])
    cal_b = np.array([f.calibrators[0].b_ for f in folds])
    graph = tfidf_linear_graph(vectorizer.idf_, weights, bias, cal_a, cal_b, "offensive")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, OUT / "offensive.onnx")
    write_features(OUT / "offensive.features.json", vocabulary, vectorizer.token_pattern,
                   list(vectorizer.get_stop_words()), 1, False, "alt-profanity-check 1.9.1 (MIT)")
    print(OUT / "offensive.onnx", (OUT / "offensive.onnx").stat().st_size)


if __name__ == "__main__":
    main()
