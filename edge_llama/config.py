"""The one typed configuration tree, loaded and validated once at start.

A YAML file (optional: the defaults serve the embedded model) is read into these dataclasses. Unknown keys and
bad values are rejected with the key's dotted path; CLI flags override afterwards with `with_overrides`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import stat
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
    # Misbehaviour a real backend can show, when the prompt contains the text: the stream stops after the first
    # token and never returns (ignoring cancel: a wedged GPU), or it ends without a finish reason (a backend bug).
    stall_on: str | None = None
    truncate_on: str | None = None


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["llamacpp", "fake", "trtllm"] = "llamacpp"
    model: str | None = None  # GGUF path for llamacpp; None = the embedded SmolLM2-135M-Instruct Q4_1
    kv_tokens: int = 2048  # the KV budget: prompt + reply never exceed it
    # f16: K and V in f16, llama.cpp's fastest CPU attention kernels (tiled for prompts, split over the cache for one
    # token), which also means a token's logits depend slightly on how it was batched. bf16 (CPU only): V in bf16
    # (K stays f16): one kernel for every batch size, so replies do not depend on batching (needed by speculative
    # "ngram"), at a cost (prompts 15-60% slower, decode over long contexts ~15-25%). q8_0: half the memory, also
    # batch-independent on the CPU.
    kv_cache_type: Literal["f16", "bf16", "q8_0"] = "f16"
    threads: int | None = None  # None = all cores
    # llamacpp: layers offloaded to the GPU (llama.cpp's n_gpu_layers). None = all of them when llama-cpp-python
    # was built with CUDA (a Jetson), none otherwise; 0 = the CPU only.
    gpu_layers: int | None = None
    batch_tokens: int = 512  # prompt tokens per decode call; llamacpp stops one between graph nodes on cancel
    # llamacpp: prompt-lookup speculative decoding (drafts copied from the prompt, verified in one batch); the
    # same tokens (greedy) or the same distribution (sampling) as "off". Needs the CPU and a batch-independent
    # kv_cache_type (bf16 or q8_0).
    speculative: Literal["off", "ngram"] = "off"
    # llamacpp: host RAM for the KV state of earlier conversations (engine/prompt_cache.py): one that comes back
    # after another evicted it is restored, not evaluated again. 0 = off.
    prompt_cache_mib: int = 64
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
    # A client that reads nothing of what we send for this long is dropped and its requests cancelled (its engine
    # turn ends, the queue behind it is served).
    write_timeout_s: float = 30.0
    max_connections: int = 64  # connections served at once; more get one refusal (busy / 503) and are closed
    # HTTP: the Host names served besides localhost, 127.0.0.1 and [::1] (e.g. the Jetson's name when a TCP relay
    # publishes the socket); other Hosts get 421, so a web page cannot reach the daemon by DNS rebinding.
    http_hosts: list[str] = field(default_factory=list)
    # HTTP: browser origins allowed to call the API (e.g. "http://jetson.local:8080"); a request from any other
    # Origin gets 403, so a web page the operator opens cannot use the daemon (CSRF).
    http_origins: list[str] = field(default_factory=list)
    # HTTP: a file holding a bearer token; when set, every HTTP request needs `Authorization: Bearer <token>`
    # (checked in constant time). For the TCP relay, where the peer's uid says nothing about who is calling.
    http_token_file: str | None = None
    # Peers in these groups relay the network (the TCP relay unit): they may speak only HTTP, where the checks above
    # apply; a protocol v1 line from them is refused (it would bypass the token). None = the group edge-llama-relay,
    # where it exists (deploy/install.sh creates it and runs the relay in it).
    http_only_groups: list[int | str] | None = None


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
    # input: what users send; output: what the model writes; tool: tools' results, on their way into the prompt.
    # A category may have several rules; for each side the first rule naming it applies.
    on: list[Literal["input", "output", "tool"]] = field(default_factory=lambda: ["input", "output"])


def _default_rules() -> list[SafetyRule]:
    return [SafetyRule("offensive", block=0.9, flag=0.6),
            # Flag-only on what users send: the injection model also fires on ordinary instructions (see its
            # model card), and users instruct on purpose. A tool's result (a web page, a sensor's label) is data:
            # one that reads like an instruction is the classic prompt injection, so it blocks.
            SafetyRule("injection", flag=0.9, on=["input"]),
            SafetyRule("injection", block=0.9, on=["tool"])]


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
class VoiceConfig:
    """`edge-llama voice` (a client of the daemon; the daemon never reads this section)."""

    input_device: int | str | None = None  # PortAudio index or (part of a) name; None = the system default
    output_device: int | str | None = None
    input_rate: int | None = None  # Hz to open the microphone at; None = 16000 if it takes it, else its default
    # ASR: a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json); None = the embedded tiny.en
    asr_model: str | None = None
    asr_device: Literal["cpu", "cuda", "auto"] = "cpu"  # cuda needs a CTranslate2 built with CUDA (Jetson)
    asr_compute_type: Literal["int8", "int8_float16", "float16", "float32", "default"] = "int8"
    asr_threads: int | None = None  # CPU threads for ASR; None = all cores (at most 4)
    asr_beam_size: int = 1  # 1 = greedy (fastest); Whisper's own default is 5
    # Seconds of (padded) audio Whisper's encoder hears for a short utterance; its cost is linear in this (10 s:
    # a third of the 30 s Whisper pads to). Utterances longer than this minus 1 s get the full 30 s. 30 = off.
    asr_window_s: float = 10.0
    language: str = "en"  # the embedded tiny.en knows only English
    # Endpointing with Silero VAD on 32 ms frames.
    vad_threshold: float = 0.5  # speech probability from which a frame counts as speech
    hangover_ms: int = 300  # silence that ends an utterance (the largest part of the reply latency)
    min_speech_ms: int = 250  # shorter bursts (a cough, a click) are ignored
    max_utterance_s: float = 28.0  # an utterance is cut here (Whisper hears at most 30 s)
    # Barge-in: the user's speech while the assistant speaks stops it and cancels the answer.
    barge_in: bool = True
    barge_in_ms: int = 64  # speech that long (after the echo gate) interrupts; + ~40 ms to silence the output
    # Echo gate: while speaking, a frame counts as the user's speech only when the microphone's level (dBFS) is above
    # the loudest block played in the last 300 ms plus this margin. -6: the assistant's own voice must come back
    # at least 6 dB weaker than it was played (raise it for a loud speaker next to the microphone)
    barge_in_margin_db: float = -6.0
    wake_phrase: str | None = None  # e.g. "hey jetson": only utterances starting with it are answered
    partial_transcripts: bool = True  # show the transcript while the user speaks (status line on a terminal)
    # TTS: a Piper voice (.onnx with its .onnx.json beside it); None = espeak-ng
    tts_voice: str | None = None
    espeak_voice: str = "en-us"
    speech_rate_wpm: int = 175  # espeak-ng words per minute
    # The daemon: answers are asked in one session; the system prompt is sent with every message.
    system_prompt: str = ("You are a voice assistant. Answer in one to three short spoken sentences, in plain "
                          "words: no lists, no markdown, no emoji.")
    max_tokens: int = 160  # reply budget of one spoken answer
    daemon_wait_s: float = 30.0  # how long to wait (and retry) for a daemon that is not running yet


@dataclass(frozen=True)
class WyomingConfig:
    """`edge-llama wyoming`, Home Assistant's speech and conversation protocol (a client of the daemon; the daemon
    never reads this section). ASR, TTS, the system prompt and the answer length come from voice:."""

    # tcp://HOST:PORT (0.0.0.0 or the LAN address for Home Assistant on another host) or unix://PATH
    uri: str = "tcp://127.0.0.1:10700"
    zeroconf: str | None = None  # announce the server on mDNS (_wyoming._tcp) under this name; tcp:// only
    max_connections: int = 8  # clients served at once; one more gets an `error` event and is closed
    max_utterance_s: float = 30.0  # audio of one transcription beyond this is cut off, with an `error` event
    max_payload_bytes: int = 1 << 20  # one event's data or audio; a larger one closes the connection
    max_text_chars: int = 8000  # one synthesize (all its chunks when streamed) or one transcript to answer


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    summarize: SummarizeConfig = field(default_factory=SummarizeConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    voice: VoiceConfig = field(default_factory=VoiceConfig)
    wyoming: WyomingConfig = field(default_factory=WyomingConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


# --- loading ---------------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate a YAML config file; no file means all defaults."""
    if path is None:
        return _checked(Config())
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from exc
    return loads(text, source=str(path))


def loads(text: str, source: str = "config") -> Config:
    """A config from YAML text, read with YAML 1.2's rules for booleans and octals (see _yaml_loader)."""
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return from_dict({} if data is None else data, source=source)


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader with YAML 1.2's booleans and octals. YAML 1.1 reads `on:` as the key True (a safety
    rule's `on: [input]` would be lost) and `0o660` as a string; 1.2, what people expect, reads them as the key
    "on" and the number 0o660 (432)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag, int_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
    Loader.add_implicit_resolver(int_tag, re.compile(r"^0o[0-7]+$"), ["0"])  # int("0o660", 8) == 432
    return Loader


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


def _voice_rules(v: VoiceConfig) -> list[tuple[str, bool, str]]:
    return [
        ("voice.input_rate", v.input_rate is None or 8000 <= v.input_rate <= 192000, "must be 8000 to 192000 Hz"),
        ("voice.asr_threads", v.asr_threads is None or v.asr_threads >= 1, "must be at least 1"),
        ("voice.asr_beam_size", 1 <= v.asr_beam_size <= 10, "must be between 1 and 10"),
        ("voice.asr_window_s", 2 <= v.asr_window_s <= 30, "must be between 2 and 30"),
        ("voice.language", bool(v.language.strip()), "must name a language, e.g. en"),
        ("voice.vad_threshold", 0.05 <= v.vad_threshold <= 0.95, "must be between 0.05 and 0.95"),
        ("voice.hangover_ms", 100 <= v.hangover_ms <= 5000, "must be between 100 and 5000"),
        ("voice.min_speech_ms", 0 <= v.min_speech_ms <= 5000, "must be between 0 and 5000"),
        ("voice.max_utterance_s", 1 <= v.max_utterance_s <= 30, "must be between 1 and 30 (Whisper hears 30 s)"),
        ("voice.barge_in_ms", 32 <= v.barge_in_ms <= 2000, "must be between 32 and 2000"),
        ("voice.barge_in_margin_db", -40 <= v.barge_in_margin_db <= 40, "must be between -40 and 40"),
        ("voice.wake_phrase", v.wake_phrase is None or bool(v.wake_phrase.strip()), "must not be empty"),
        ("voice.speech_rate_wpm", 80 <= v.speech_rate_wpm <= 450, "must be between 80 and 450 (espeak-ng)"),
        ("voice.max_tokens", v.max_tokens >= 1, "must be at least 1"),
        ("voice.daemon_wait_s", v.daemon_wait_s >= 0, "must not be negative"),
    ]


def _wyoming_rules(w: WyomingConfig) -> list[tuple[str, bool, str]]:
    scheme, _, rest = w.uri.partition("://")
    host, _, port = rest.rpartition(":")
    tcp_ok = scheme == "tcp" and bool(host.strip("[]")) and port.isdigit() and int(port) <= 65535
    return [
        ("wyoming.uri", tcp_ok or (scheme == "unix" and bool(rest)), "must be tcp://HOST:PORT or unix://PATH"),
        ("wyoming.zeroconf", w.zeroconf is None or (bool(w.zeroconf.strip()) and scheme == "tcp"),
         "must be a name, and needs a tcp:// uri"),
        ("wyoming.max_connections", 1 <= w.max_connections <= 256, "must be between 1 and 256"),
        ("wyoming.max_utterance_s", 1 <= w.max_utterance_s <= 30, "must be between 1 and 30 (Whisper hears 30 s)"),
        ("wyoming.max_payload_bytes", 4096 <= w.max_payload_bytes <= 1 << 26, "must be between 4096 and 64 MiB"),
        ("wyoming.max_text_chars", 1 <= w.max_text_chars <= 100_000, "must be between 1 and 100000"),
    ]


def _checked(config: Config) -> Config:
    """Range checks that types cannot express, each naming its key."""
    e, s, g = config.engine, config.server, config.generation
    rules = [
        ("engine.kv_tokens", e.kv_tokens >= 64, "must be at least 64"),
        ("engine.threads", e.threads is None or e.threads >= 1, "must be at least 1"),
        ("engine.gpu_layers", e.gpu_layers is None or e.gpu_layers >= 0, "must be 0 or more (null = all on a GPU)"),
        ("engine.batch_tokens", 1 <= e.batch_tokens <= 4096, "must be between 1 and 4096"),
        ("engine.prompt_cache_mib", 0 <= e.prompt_cache_mib <= 65536, "must be between 0 and 65536"),
        ("engine.speculative", e.speculative == "off" or e.backend != "llamacpp" or e.kv_cache_type != "f16",
         "ngram needs engine.kv_cache_type bf16 or q8_0: with an f16 V cache llama.cpp's attention kernels depend on "
         "how tokens are batched, so drafted replies could differ from plain ones"),
        ("server.socket_mode", 0 <= s.socket_mode <= 0o777, "must be a file mode such as 0o660"),
        ("server.max_line_bytes", s.max_line_bytes >= 1024, "must be at least 1024"),
        ("server.max_messages", s.max_messages >= 1, "must be at least 1"),
        ("server.max_queue", s.max_queue >= 0, "must not be negative"),
        ("server.max_session_messages", s.max_session_messages >= 2, "must be at least 2"),
        ("server.session_ttl_hours", s.session_ttl_hours >= 0, "must not be negative (0 = keep sessions forever)"),
        ("server.shutdown_grace_s", s.shutdown_grace_s >= 0, "must not be negative"),
        ("server.engine_stall_s", s.engine_stall_s > 0, "must be positive"),
        ("server.stream_interval_ms", 0 <= s.stream_interval_ms <= 1000, "must be between 0 and 1000"),
        ("server.write_timeout_s", 0 < s.write_timeout_s <= 30, "must be in (0, 30]"),
        ("server.max_connections", s.max_connections >= 1, "must be at least 1"),
        ("server.http_hosts", all(h and "/" not in h and " " not in h for h in s.http_hosts),
         "must be host names (no scheme, path or spaces), e.g. jetson.local"),
        ("server.http_origins", all(o.startswith(("http://", "https://")) and o.count("/") == 2
                                    for o in s.http_origins),
         "must be origins such as http://jetson.local:8080 (scheme, host, optional port; no path)"),
        ("generation.max_tokens", 1 <= g.max_tokens <= g.max_tokens_ceiling,
         "must be between 1 and generation.max_tokens_ceiling"),
        ("generation.temperature", 0.0 <= g.temperature <= 2.0, "must be between 0 and 2"),
        ("generation.top_p", 0.0 < g.top_p <= 1.0, "must be in (0, 1]"),
        ("summarize.summary_tokens", config.summarize.summary_tokens >= 16, "must be at least 16"),
        ("safety.window_tokens", 1 <= config.safety.window_tokens <= 256, "must be between 1 and 256"),
        ("safety.rules", all(0 <= (t if t is not None else 0) <= 1 for r in config.safety.rules
                             for t in (r.block, r.flag)), "thresholds must be between 0 and 1"),
        *_voice_rules(config.voice),
        *_wyoming_rules(config.wyoming),
    ]
    for key, ok, why in rules:
        if not ok:
            raise ConfigError(f"config: '{key}' {why}")
    return config


# --- paths -----------------------------------------------------------------------------------------------------
def per_user_socket_path() -> Path:
    """The socket of a daemon a user runs for themselves: $XDG_RUNTIME_DIR/edge-llama/, else /tmp/edge-llama-$UID/."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "edge-llama" / "edge-llama.sock"
    return Path("/tmp") / f"edge-llama-{os.getuid()}" / "edge-llama.sock"


def default_socket_path() -> Path:
    """EDGE_LLAMA_SOCKET, else systemd's path when that socket exists or we run under systemd, else per user."""
    env = os.environ.get("EDGE_LLAMA_SOCKET")
    if env:
        return Path(env)
    if SYSTEMD_SOCKET.exists() or os.environ.get("INVOCATION_ID"):
        return SYSTEMD_SOCKET
    return per_user_socket_path()


def check_private_dir(folder: Path, create: bool) -> None:
    """The per-user socket directory must be a directory of ours with mode 0700. /tmp is shared: another user who
    created /tmp/edge-llama-$UID first could listen there and read every conversation, or serve forged answers.
    `create` makes it when missing (the daemon); clients only check."""
    try:
        info = folder.lstat()
    except FileNotFoundError:
        if not create:
            return  # no daemon there yet: connecting fails with its own clear message
        folder.mkdir(mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
        return
    problems = []
    if not stat.S_ISDIR(info.st_mode):
        problems.append("it is not a directory" + (" (a symlink)" if stat.S_ISLNK(info.st_mode) else ""))
    if info.st_uid != os.getuid():
        problems.append(f"it belongs to uid {info.st_uid}, not to you (uid {os.getuid()})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        problems.append(f"its mode is {stat.S_IMODE(info.st_mode):04o}, not 0700")
    if problems:
        raise ConfigError(f"refusing the socket directory {folder}: {'; '.join(problems)}. Someone else may have made "
                          "it to intercept your conversations: remove it, or choose a socket with --socket")


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
