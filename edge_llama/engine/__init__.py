"""Engine layer: one interface (base.Engine), backends chosen by name in config."""

from __future__ import annotations

from edge_llama.config import EngineConfig
from edge_llama.engine.base import Capacity, Chunk, Engine, GenParams, TemplateInfo, TokenConstraint, Vocabulary
from edge_llama.errors import ConfigError

__all__ = ["Capacity", "Chunk", "Engine", "GenParams", "TemplateInfo", "TokenConstraint", "Vocabulary", "create_engine"]


def create_engine(config: EngineConfig) -> Engine:
    """Build (not load) the backend named by `config.backend`; heavy imports happen in its module only."""
    if config.backend == "llamacpp":
        from edge_llama.engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine(config)
    if config.backend == "fake":
        from edge_llama.engine.fake import FakeEngine

        return FakeEngine(config)
    if config.backend == "trtllm":
        from edge_llama.engine.trtllm import TrtLlmEngine

        return TrtLlmEngine(config)
    raise ConfigError(f"engine.backend '{config.backend}' is not available in this build")
