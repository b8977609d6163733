"""Config: defaults need no file; bad files fail with the key's path; CLI overrides win."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_llama.config import Config, load_config, with_overrides
from edge_llama.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    config = load_config(None)
    assert config == Config()
    assert config.engine.backend == "llamacpp" and config.engine.model is None


def test_file_values_are_typed(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "engine:\n  kv_tokens: 4096\n  kv_cache_type: q8_0\n"
                                         "generation:\n  temperature: 0\n"))
    assert config.engine.kv_tokens == 4096
    assert config.engine.kv_cache_type == "q8_0"
    assert config.generation.temperature == 0.0 and isinstance(config.generation.temperature, float)


@pytest.mark.parametrize(("text", "message"), [
    ("engine:\n  kv_tokenz: 10\n", "unknown key 'engine.kv_tokenz'"),
    ("server:\n  max_queue: many\n", "'server.max_queue' must be a whole number"),
    ("engine:\n  kv_cache_type: q4\n", "'engine.kv_cache_type' must be one of f16, bf16, q8_0"),
    # Drafts verified in a batch would not be exact on the f16 cache: refused, with the way out.
    ("engine:\n  speculative: ngram\n", "'engine.speculative' ngram needs engine.kv_cache_type bf16 or q8_0"),
    ("engine: 3\n", "engine must be a mapping"),
    ("server:\n  warmup: 1\n", "'server.warmup' must be true or false"),
    ("engine:\n  kv_tokens: 32\n", "'engine.kv_tokens' must be at least 64"),
    ("generation:\n  max_tokens: 2000\n", "'generation.max_tokens' must be between 1 and generation"),
    ("engine: [\n", "not valid YAML"),
])
def test_bad_values_name_their_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(write(tmp_path, text))


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_win_and_are_validated(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "engine:\n  kv_tokens: 1024\n"))
    config = with_overrides(config, {"engine.kv_tokens": 3000, "server.socket": "/tmp/x.sock", "engine.model": None})
    assert config.engine.kv_tokens == 3000 and config.server.socket == "/tmp/x.sock"
    with pytest.raises(ConfigError, match="engine.kv_tokens"):
        with_overrides(config, {"engine.kv_tokens": 8})
