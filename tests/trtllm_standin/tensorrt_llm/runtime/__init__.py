"""Stand-in `tensorrt_llm.runtime`: only ModelRunnerCpp (see tensorrt_llm/__init__.py)."""

from .model_runner_cpp import ModelRunnerCpp

PYTHON_BINDINGS = True  # examples/run.py@20a7cec L32-35 imports ModelRunnerCpp only when this is true

__all__ = ["ModelRunnerCpp", "PYTHON_BINDINGS"]
