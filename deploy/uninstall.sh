#!/usr/bin/env bash
# Remove the edge-llama service. Keeps /etc/edge-llama and the sessions in /var/lib/edge-llama unless --purge.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo "$0" "$@"
PURGE=0
[ "${1:-}" = "--purge" ] && PURGE=1
systemctl disable --now edge-llama.socket edge-llama.service 2>/dev/null || true
rm -f /etc/systemd/system/edge-llama.service /etc/systemd/system/edge-llama.socket
rm -f /usr/lib/sysusers.d/edge-llama.conf /usr/lib/tmpfiles.d/edge-llama.conf
systemctl daemon-reload
rm -rf /opt/edge-llama
if [ "$PURGE" = 1 ]; then
  rm -rf /etc/edge-llama /var/lib/edge-llama /var/cache/edge-llama
  userdel edge-llama 2>/dev/null || true
  groupdel edge-llama-clients 2>/dev/null || true
fi
echo "edge-llama removed$([ "$PURGE" = 1 ] && echo ", with its configuration, sessions and users")."
