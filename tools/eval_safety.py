"""Evaluation figures of the built-in safety classifiers (copied into their model cards).

- injection: precision, recall and false-positive rate on the held-out S-Labs test split (never used in
  training), at the flag threshold 0.9 and at 0.5, and how often it flags ordinary instructions;
- offensive: parity with the original alt-profanity-check model on the S-Labs texts (thousands of ordinary and
  adversarial prompts), and behaviour on the small hand-written sets in tests/data/safety_eval.json.

    .venv/bin/python tools/eval_safety.py    # last line: one JSON object
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from train_injection import split  # noqa: E402

from edge_llama.safety.classifiers import load_classifier  # noqa: E402


def scores(name: str, texts: list[str]) -> np.ndarray:
    model = load_classifier(name)
    return np.concatenate([model.score(texts[i:i + 256]) for i in range(0, len(texts), 256)])


def rates(p: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    predicted = p >= threshold
    tp = int((predicted & (labels == 1)).sum())
    fp = int((predicted & (labels == 0)).sum())
    fn = int((~predicted & (labels == 1)).sum())
    tn = int((~predicted & (labels == 0)).sum())
    return {"threshold": threshold, "precision": round(tp / max(1, tp + fp), 4),
            "recall": round(tp / max(1, tp + fn), 4), "fpr": round(fp / max(1, fp + tn), 4), "n": len(labels)}


def main() -> None:
    sets = json.loads((REPO / "tests" / "data" / "safety_eval.json").read_text())
    test_x, test_y = split("test")
    p_inj = scores("injection", test_x)
    ordinary = scores("injection", sets["ordinary_instructions"])
    report: dict = {"injection": {
        "heldout": "S-Labs prompt-injection test split",
        "at_0.9": rates(p_inj, test_y, 0.9), "at_0.5": rates(p_inj, test_y, 0.5),
        "ordinary_instructions_flagged_at_0.9": round(float((ordinary >= 0.9).mean()), 4),
        "ordinary_instructions_flagged_at_0.5": round(float((ordinary >= 0.5).mean()), 4)}}
    from profanity_check import predict_prob

    valid_x, _ = split("validation")
    texts = test_x + valid_x
    ours = scores("offensive", texts)
    original = np.concatenate([predict_prob(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    hand = sets["offensive"] + sets["benign"]
    labels = np.array([1] * len(sets["offensive"]) + [0] * len(sets["benign"]))
    p_off = scores("offensive", hand)
    report["offensive"] = {"parity_texts": len(texts), "parity_max_abs_diff": float(np.abs(ours - original).max()),
                           "hand_set_at_0.9": rates(p_off, labels, 0.9), "hand_set_at_0.6": rates(p_off, labels, 0.6),
                           "benign_max_score": round(float(p_off[len(sets["offensive"]):].max()), 4)}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
