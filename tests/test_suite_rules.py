"""The suite's own rules hold: a skip that does not need hardware fails the run, at collection time too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


def run_pytest(folder: Path, source: str) -> subprocess.CompletedProcess[str]:
    (folder / "test_sample.py").write_text(source)
    (folder / "test_other.py").write_text("def test_fine():\n    pass\n")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "skip_rules", "-p", "no:cacheprovider",
                           str(folder)], capture_output=True, text=True, timeout=120,
                          cwd=folder, env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"})


@pytest.mark.parametrize("source", [
    "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n",
    "import pytest\npytestmark = pytest.mark.skip(reason='not today')\n\ndef test_x():\n    pass\n",
    "import pytest\n\ndef test_x():\n    pytest.skip('flaky')\n",
])
def test_an_unexpected_skip_fails_the_run(tmp_path: Path, source: str) -> None:
    out = run_pytest(tmp_path, source)
    assert out.returncode == 1 and "unexpected skip" in out.stdout, out.stdout + out.stderr


def test_a_skip_that_needs_hardware_passes(tmp_path: Path) -> None:
    out = run_pytest(tmp_path, "import pytest\npytest.importorskip('tensorrt_no_such', reason='needs a GPU')\n\n"
                               "def test_x():\n    pass\n")
    assert out.returncode == 0 and "1 skipped" in out.stdout, out.stdout + out.stderr


def test_jetson_only_skips_pass_only_on_a_jetson(tmp_path: Path) -> None:
    import skip_rules

    reason = "on a Jetson: needs a machine without a sound card"
    assert skip_rules.allowed(reason, on_jetson=True) and not skip_rules.allowed(reason, on_jetson=False)
    assert skip_rules.allowed("needs a GPU: CUDA", on_jetson=False)
    if not skip_rules.ON_JETSON:  # here (CI): such a skip fails the run
        out = run_pytest(tmp_path, f"import pytest\n\ndef test_x():\n    pytest.skip({reason!r})\n")
        assert out.returncode == 1 and "unexpected skip" in out.stdout, out.stdout + out.stderr
