"""Self-describing artifacts: every pipeline output folder carries manifest.json.

It records what the folder is (`kind`), where it came from (source hashes), how it was made (quantization,
calibration, build flags, planned memory), with which tool versions, and the sha256 and size of every file.
`verify_manifest` is what the daemon runs before it loads an engine: a wrong schema, a missing or changed file,
or an artifact meant for another backend stops it with one clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from edge_llama.errors import EdgeLlamaError

SCHEMA = 1
MANIFEST = "manifest.json"
KINDS = {"trtllm-checkpoint": "trtllm", "trtllm-engine": "trtllm"}


class ManifestError(EdgeLlamaError):
    code = "manifest"
    exit_code = 2


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_files(folder: Path, names: list[str]) -> str:
    """One digest over several files (name and content), e.g. a source checkpoint."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + sha256_file(folder / name).encode())
    return digest.hexdigest()


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, kind: str, fields: dict[str, Any]) -> Path:
    manifest = {"schema": SCHEMA, "kind": kind, "backend": KINDS[kind],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {MANIFEST}: not an edge-llama artifact (make it with "
                            "`edge-llama quantize` / `edge-llama build`)") from None
    except ValueError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ManifestError(f"{path}: manifest schema {data.get('schema') if isinstance(data, dict) else '?'} "
                            f"is not supported (this edge-llama reads schema {SCHEMA})")
    return data


def verify_manifest(folder: Path, kind: str, backend: str, check_hashes: bool = True) -> dict[str, Any]:
    """Check an artifact before use; returns its manifest. Raises ManifestError naming the first problem."""
    data = read_manifest(folder)
    if data.get("backend") != backend:
        raise ManifestError(f"{folder} was made for the {data.get('backend')!r} backend, "
                            f"but engine.backend is {backend!r}")
    if data.get("kind") != kind:
        raise ManifestError(f"{folder} is a {data.get('kind')!r}, expected a {kind!r}")
    for name, entry in (data.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{folder}: {name} is listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise ManifestError(f"{folder}: {name} has {path.stat().st_size} bytes, the manifest says "
                                f"{entry['bytes']}: the file changed or is truncated")
        if check_hashes and sha256_file(path) != entry["sha256"]:
            raise ManifestError(f"{folder}: {name} does not match its sha256 in the manifest: the file changed")
    return data
