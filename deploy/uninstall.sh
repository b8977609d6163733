#!/usr/bin/env bash
# Remove the edge-llama service and its optional clients (voice, Wyoming, the HTTP relay). Keeps /etc/edge-llama and
# the sessions in /var/lib/edge-llama unless --purge.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo "$0" "$@"
PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1
UNITS=(edge-llama-voice.service edge-llama-wyoming.service edge-llama-http-proxy.socket
       edge-llama-http-proxy.service edge-llama.socket edge-llama.service)
for unit in "${UNITS[@]}"; do  # one by one: one that is not installed must not stop the others
  systemctl disable --now "$unit" 2>/dev/null || true
  rm -f "/etc/systemd/system/$unit"
done
rm -rf /etc/systemd/system/edge-llama-http-proxy.socket.d
rm -f /usr/lib/sysusers.d/edge-llama.conf /usr/lib/tmpfiles.d/edge-llama.conf
systemctl daemon-reload
rm -rf /opt/edge-llama
if [ "$PURGE" = 1 ]; then
  rm -rf /etc/edge-llama /var/lib/edge-llama /var/cache/edge-llama
  userdel edge-llama 2>/dev/null || true
  groupdel edge-llama-clients 2>/dev/null || true
fi
echo "edge-llama removed$([ "$PURGE" = 1 ] && echo ", with its configuration, sessions and users")."
