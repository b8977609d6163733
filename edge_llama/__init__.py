"""edge-llama: an on-device LLM assistant for NVIDIA Jetson (and any Linux CPU via llama.cpp)."""

__version__ = "0.1.0"
