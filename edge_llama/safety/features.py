"""Text -> numbers for the built-in classifiers: the part of a TF-IDF pipeline that is not arithmetic.

The ONNX graphs take term frequencies [N, vocabulary] (float32) and do the rest (idf, L2 norm, the linear
model, calibration), so the same file runs under numpy, onnxruntime and TensorRT. What is done here must match how
the model was trained: lowercase, the token regex, English stop words, word n-grams, optional sublinear tf.
The description lives next to each graph as <name>.features.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Featurizer:
    index: dict[str, int]  # term -> column
    stop_words: frozenset[str]
    pattern: re.Pattern[str]
    ngram_max: int
    sublinear_tf: bool

    @classmethod
    def load(cls, path: Path) -> Featurizer:
        spec = json.loads(path.read_text())
        return cls(index={term: i for i, term in enumerate(spec["vocabulary"])},
                   stop_words=frozenset(spec.get("stop_words", [])), pattern=re.compile(spec["token_pattern"]),
                   ngram_max=spec.get("ngram_max", 1), sublinear_tf=spec.get("sublinear_tf", False))

    @property
    def size(self) -> int:
        return len(self.index)

    def transform(self, texts: list[str]) -> np.ndarray:
        """[len(texts), vocabulary] float32 term frequencies."""
        out = np.zeros((len(texts), len(self.index)), dtype=np.float32)
        for row, text in enumerate(texts):
            words = [w for w in self.pattern.findall(text.lower()) if w not in self.stop_words]
            for n in range(1, self.ngram_max + 1):
                for i in range(len(words) - n + 1):
                    column = self.index.get(words[i] if n == 1 else " ".join(words[i:i + n]))
                    if column is not None:
                        out[row, column] += 1.0
            if self.sublinear_tf:
                nz = out[row] > 0
                out[row, nz] = 1.0 + np.log(out[row, nz])
        return out
