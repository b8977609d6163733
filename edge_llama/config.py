"""The one typed configuration tree, loaded and validated once at start.

A YAML file (optional: the defaults serve the embedded model) is read into these dataclasses. Unknown keys and
bad values are rejected with the key's dotted path; CLI flags override afterwards with `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_llama.errors import ConfigError

SYSTEMD_SOCKET = Path("/run/edge-llama/edge-llama.sock")


@dataclass(frozen=True)
class FakeEngineConfig:
    """Scripted engine for tests: byte-level tokens, a fixed or echoed reply, injected delays and errors."""

    reply: str | None = None  # None: echo "You said: <last user message>"
    token_delay_ms: float = 0.0  # sleep per generated token
    prompt_delay_ms: float = 0.0  # sleep per prompt token evaluated (to test cancel during prefill)
    fail_on: str | None = None  # raise an engine error when the prompt contains this text
    load_delay_ms: float = 0.0
    unsafe_on: str | None = None  # next_token_probs: "unsafe" is likely when the prompt contains this


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["llamacpp", "fake", "trtllm"] = "llamacpp"
    model: str | None = None  # GGUF path for llamacpp; None = the embedded SmolLM2-135M-Instruct Q4_1
    kv_tokens: int = 2048  # the KV budget: prompt + reply never exceed it
    kv_cache_type: Literal["f16", "q8_0"] = "f16"
    threads: int | None = None  # None = all cores
    batch_tokens: int = 64  # prompt tokens per decode call; cancellation is checked between calls
    chat_template: str | None = None  # None = the model's own; else a built-in name or a .jinja file path
    fake: FakeEngineConfig = field(default_factory=FakeEngineConfig)


@dataclass(frozen=True)
class ServerConfig:
    socket: str | None = None  # None = EDGE_LLAMA_SOCKET, else systemd's or a per-user path
    socket_mode: int = 0o660
    state_dir: str | None = None  # sessions live here; None = $STATE_DIRECTORY or ~/.local/state/edge-llama
    max_line_bytes: int = 1 << 20  # one request line, newline included
    max_messages: int = 64  # messages in one chat request
    max_queue: int = 4  # requests admitted but waiting for the engine; more get `busy`
    max_session_messages: int = 200  # stored history per session (oldest pairs dropped beyond)
    session_ttl_hours: float = 720.0  # a session not written for this long is deleted (30 days); 0 = never
    stream_interval_ms: float = 20.0  # streamed text is sent at most this often (first token at once); 0 = per token
    shutdown_grace_s: float = 10.0  # SIGTERM: running requests may finish within this, then are cancelled
    warmup: bool = True  # one tiny generation before accepting requests
    # Who may use the socket (checked per connection with SO_PEERCRED and the peer's supplementary groups).
    # None = root, the daemon's own user and the socket file's group. Names or numeric ids.
    allow_users: list[int | str] | None = None
    allow_groups: list[int | str] | None = None
    engine_stall_s: float = 60.0  # an engine call without progress this long stops the systemd watchdog pings


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256  # default reply budget, reserved in the KV budget (at most a quarter of it is used)
    max_tokens_ceiling: int = 1024
    temperature: float = 0.7
    top_p: float = 0.9
    system_prompt: str | None = None  # prepended when a conversation has no system message


@dataclass(frozen=True)
class SummarizeConfig:
    summary_tokens: int = 160  # reply budget of each map/reduce step (at most a quarter of the KV budget)
    instruction: str = "Summarize the following text in a few sentences. Keep names, numbers and conclusions."
    combine_instruction: str = "Combine these partial summaries into one coherent summary, without repeating."


@dataclass(frozen=True)
class SafetyRule:
    """From which score a category is flagged (logged, reported in `done.safety`) or blocked, and where."""

    category: str
    block: float | None = None
    flag: float | None = None
    on: list[Literal["input", "output"]] = field(default_factory=lambda: ["input", "output"])


def _default_rules() -> list[SafetyRule]:
    return [SafetyRule("offensive", block=0.9, flag=0.6),
            # Flag-only: the injection model also fires on ordinary instructions (see its model card).
            SafetyRule("injection", flag=0.9, on=["input"])]


@dataclass(frozen=True)
class SafetyConfig:
    enabled: bool = True
    hooks: list[str] = field(default_factory=lambda: ["offensive", "injection"])  # built-in names or module:attr
    # How the built-in classifiers' ONNX graphs run: numpy (no extra dependency, the least memory), onnxruntime,
    # or tensorrt (the same ONNX on a Jetson GPU, with JetPack's tensorrt and pycuda).
    runtime: Literal["numpy", "onnxruntime", "tensorrt"] = "numpy"
    rules: list[SafetyRule] = field(default_factory=_default_rules)
    window_tokens: int = 16  # streamed output is held back until the window containing it passed the hooks
    context_chars: int = 120  # already-released text checked together with the held window
    fail_mode: Literal["closed", "open"] = "closed"  # a hook that raises blocks (closed) or allows (open)
    refusal: str = "Sorry, I can't help with that."
    log_texts: bool = False  # put the checked texts in the log lines of flags and blocks
    # The llama_guard hook's own engine (operator-supplied Llama Guard 3 1B weights, e.g. a GGUF).
    llama_guard: EngineConfig | None = None


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    summarize: SummarizeConfig = field(default_factory=SummarizeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


# --- loading ---------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a YAML config file; no file means all defaults."""
    if path is None:
        return _checked(Config())
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    return from_dict(data, source=str(path))


def from_dict(data: Any, source: str = "config") -> Config:
    return _checked(_build(Config, data, "", source))


def with_overrides(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-path overrides (from CLI flags), e.g. {"server.socket": "/tmp/x.sock"}; None values skip."""
    data = dataclasses.asdict(config)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return from_dict(data, source="command line")


def _build(cls: type, data: Any, path: str, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {path or 'top level'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{source}: unknown key '{where}' (known here: {', '.join(sorted(known))})")
    values = {}
    for name, raw in data.items():
        key_path = f"{path}.{name}" if path else name
        values[name] = _coerce(hints[name], raw, key_path, source)
    return cls(**values)


def _coerce(hint: Any, raw: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, raw, path, source)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if raw is None and type(None) in args:
            return None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(inner, raw, path, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is list:
        if not isinstance(raw, list):
            raise ConfigError(f"{source}: '{path}' must be a list; got {raw!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(item, value, f"{path}[{i}]", source) for i, value in enumerate(raw)]
    if origin is Literal:
        choices = typing.get_args(hint)
        if raw not in choices:
            raise ConfigError(f"{source}: '{path}' must be one of {', '.join(map(str, choices))}; got {raw!r}")
        return raw
    if hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{source}: '{path}' must be true or false; got {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{source}: '{path}' must be a whole number; got {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(f"{source}: '{path}' must be a number; got {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{source}: '{path}' must be a string; got {raw!r}")
        return raw
    raise ConfigError(f"{source}: '{path}' has an unsupported type {hint!r}")  # pragma: no cover


# What SIGHUP may change in a running daemon; everything else needs a restart.
RESTART_ONLY = ("engine", "server.socket", "server.socket_mode", "server.state_dir", "server.warmup")


def live_update(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload applies: `new`, except the parts only a restart can change (kept from `running`).
    Returns it with the dotted keys whose new values were not applied."""
    kept = dataclasses.replace(
        new, engine=running.engine,
        server=dataclasses.replace(new.server, socket=running.server.socket, socket_mode=running.server.socket_mode,
                                   state_dir=running.server.state_dir, warmup=running.server.warmup),
    )
    ignored = []
    for key in RESTART_ONLY:
        section, _, leaf = key.partition(".")
        old_value, new_value = getattr(running, section), getattr(new, section)
        if leaf:
            old_value, new_value = getattr(old_value, leaf), getattr(new_value, leaf)
        if old_value != new_value:
            ignored.append(key)
    return kept, ignored


def _checked(config: Config) -> Config:
    """Range checks that types cannot express, each naming its key."""
    e, s, g = config.engine, config.server, config.generation
    rules = [
        ("engine.kv_tokens", e.kv_tokens >= 64, "must be at least 64"),
        ("engine.threads", e.threads is None or e.threads >= 1, "must be at least 1"),
        ("engine.batch_tokens", 1 <= e.batch_tokens <= 4096, "must be between 1 and 4096"),
        ("server.socket_mode", 0 <= s.socket_mode <= 0o777, "must be a file mode such as 0o660"),
        ("server.max_line_bytes", s.max_line_bytes >= 1024, "must be at least 1024"),
        ("server.max_messages", s.max_messages >= 1, "must be at least 1"),
        ("server.max_queue", s.max_queue >= 0, "must not be negative"),
        ("server.max_session_messages", s.max_session_messages >= 2, "must be at least 2"),
        ("server.session_ttl_hours", s.session_ttl_hours >= 0, "must not be negative (0 = keep sessions forever)"),
        ("server.shutdown_grace_s", s.shutdown_grace_s >= 0, "must not be negative"),
        ("server.engine_stall_s", s.engine_stall_s > 0, "must be positive"),
        ("server.stream_interval_ms", 0 <= s.stream_interval_ms <= 1000, "must be between 0 and 1000"),
        ("generation.max_tokens", 1 <= g.max_tokens <= g.max_tokens_ceiling,
         "must be between 1 and generation.max_tokens_ceiling"),
        ("generation.temperature", 0.0 <= g.temperature <= 2.0, "must be between 0 and 2"),
        ("generation.top_p", 0.0 < g.top_p <= 1.0, "must be in (0, 1]"),
        ("summarize.summary_tokens", config.summarize.summary_tokens >= 16, "must be at least 16"),
        ("safety.window_tokens", 1 <= config.safety.window_tokens <= 256, "must be between 1 and 256"),
        ("safety.rules", all(0 <= (t if t is not None else 0) <= 1 for r in config.safety.rules
                             for t in (r.block, r.flag)), "thresholds must be between 0 and 1"),
    ]
    for key, ok, why in rules:
        if not ok:
            raise ConfigError(f"config: '{key}' {why}")
    return config


# --- paths -----------------------------------------------------------------------------------------------------
def default_socket_path() -> Path:
    """EDGE_LLAMA_SOCKET, else systemd's path when that socket exists or we run under systemd, else per user."""
    env = os.environ.get("EDGE_LLAMA_SOCKET")
    if env:
        return Path(env)
    if SYSTEMD_SOCKET.exists() or os.environ.get("INVOCATION_ID"):
        return SYSTEMD_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path("/tmp") / f"edge-llama-{os.getuid()}"
    return base / "edge-llama.sock" if runtime is None else base / "edge-llama" / "edge-llama.sock"


def socket_path(config: Config) -> Path:
    path = config.server.socket
    if path and path[0] in "@\0":
        # Abstract sockets have no file permissions: anyone in the network namespace could connect.
        raise ConfigError(f"server.socket: abstract-namespace sockets are refused ({path!r}); use a file path")
    return Path(path) if path else default_socket_path()


def state_dir(config: Config) -> Path:
    if config.server.state_dir:
        return Path(config.server.state_dir)
    systemd_state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if systemd_state:
        return Path(systemd_state.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "edge-llama"
