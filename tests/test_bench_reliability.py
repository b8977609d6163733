"""tools/bench/reliability.py --quick: every section runs, its last line is one JSON object, and nothing broke the
contract. The full run with figures: .venv/bin/python tools/bench/reliability.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "tools" / "bench" / "reliability.py"
SECTIONS = {"parser_fuzz", "socket_fuzz", "concurrency", "disconnect", "sigkill", "sigterm", "full_disk", "memory",
            "loop_stall_fake"}


def test_the_quick_reliability_bench_finds_nothing_unexpected() -> None:
    out = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, timeout=240)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert SECTIONS <= set(figures), out.stderr[-3000:]
    failed = {name: figures[name] for name in SECTIONS if figures[name].get("unexpected") or "failed" in figures[name]}
    assert not failed, out.stderr[-3000:]
    assert figures["unexpected"] == 0 and figures["corrupt"] == 0
    assert figures["sigkill"]["sessions_checked"] > 0 and figures["socket_fuzz"]["answered"] > 0
    assert out.returncode == 0
