"""Regenerate the built-in calibration corpus and the held-out evaluation text from CPython's own docstrings.

Docstrings are plain English prose about many topics, and CPython's licence (PSF-2.0) allows redistribution, so
the corpus can ship inside the package. Calibration and evaluation use disjoint sets of modules.

    python tools/make_corpus.py     # writes edge_llama/data/calib_corpus.txt and tools/bench/heldout.txt
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = ["argparse", "asyncio", "collections", "contextlib", "csv", "datetime", "decimal", "email",
               "fractions", "functools", "heapq", "http.client", "itertools", "json", "logging", "pathlib",
               "random", "sqlite3", "statistics", "string", "tarfile", "textwrap", "threading", "unittest", "zipfile"]
HELD_OUT = ["difflib", "shutil", "subprocess", "tempfile", "urllib.parse", "calendar", "configparser", "pickle",
            "enum", "dataclasses"]
HEADER = ("# Text from docstrings of CPython standard-library modules ({}), Copyright Python Software Foundation,\n"
          "# licensed under the PSF License Agreement (PSF-2.0). Regenerate with tools/make_corpus.py.\n")


def docstrings(module_names: list[str], limit_chars: int) -> str:
    parts: list[str] = []
    seen: set[str] = set()
    for name in module_names:
        module = importlib.import_module(name)
        objects = [module] + [obj for _, obj in sorted(inspect.getmembers(module))
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", "").startswith(name)]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            # Prose paragraphs only: no doctest lines, tables or very short fragments.
            for para in re.split(r"\n\s*\n", doc):
                text = " ".join(line.strip() for line in para.splitlines())
                if len(text) < 120 or ">>>" in text or text in seen or text.count("|") > 2:
                    continue
                seen.add(text)
                parts.append(text)
    out = "\n\n".join(parts)
    return out[:limit_chars].rsplit("\n\n", 1)[0]


def main() -> None:
    calib = REPO / "edge_llama" / "data" / "calib_corpus.txt"
    calib.write_text(HEADER.format(", ".join(CALIBRATION)) + docstrings(CALIBRATION, 60_000) + "\n")
    heldout = REPO / "tools" / "bench" / "heldout.txt"
    heldout.write_text(HEADER.format(", ".join(HELD_OUT)) + docstrings(HELD_OUT, 24_000) + "\n")
    print(calib, calib.stat().st_size, heldout, heldout.stat().st_size)


if __name__ == "__main__":
    main()
