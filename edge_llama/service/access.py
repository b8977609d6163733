"""Who may talk to the daemon: peer credentials of each connection checked against an allowlist.

The socket's file mode (0660, group = the client group) is the first gate; this is the second, and the one that
still holds if the mode is loosened by mistake. SO_PEERCRED gives the peer's pid, uid and primary gid;
SO_PEERGROUPS its supplementary groups (Linux >= 4.13), so a member of the client group is allowed whatever its
primary group is.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from edge_llama.config import ServerConfig
from edge_llama.errors import ConfigError

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
MAX_GROUPS = 256


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:  # kernels before 4.13: primary group only
        groups = frozenset()
    return Peer(pid, uid, gid, groups)


RELAY_GROUP = "edge-llama-relay"  # the group of the TCP relay (systemd/edge-llama-http-proxy.service)


@dataclass(frozen=True)
class AccessPolicy:
    uids: frozenset[int]
    gids: frozenset[int]
    http_only_gids: frozenset[int] = frozenset()  # peers that relay the network: HTTP (with its checks) only

    def allows(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids or bool(peer.groups & self.gids)

    def http_only(self, peer: Peer) -> bool:
        return peer.gid in self.http_only_gids or bool(peer.groups & self.http_only_gids)

    def describe(self) -> str:
        relay = f", HTTP only: gids {sorted(self.http_only_gids)}" if self.http_only_gids else ""
        return f"uids {sorted(self.uids)}, gids {sorted(self.gids)}{relay}"


def policy_for(config: ServerConfig, socket_file: Path) -> AccessPolicy:
    """The configured allowlist; by default root, the daemon's own user and the socket file's group."""
    if config.allow_users is None:
        uids = {0, os.getuid()}
    else:
        uids = {_resolve(u, "server.allow_users", lambda n: pwd.getpwnam(n).pw_uid) for u in config.allow_users}
    if config.allow_groups is None:
        try:
            gids = {socket_file.stat().st_gid}
        except OSError:
            gids = set()
    else:
        gids = {_resolve(g, "server.allow_groups", lambda n: grp.getgrnam(n).gr_gid) for g in config.allow_groups}
    if config.http_only_groups is None:  # the relay's group, where the service is installed
        try:
            http_only = {grp.getgrnam(RELAY_GROUP).gr_gid}
        except KeyError:
            http_only = set()
    else:
        http_only = {_resolve(g, "server.http_only_groups", lambda n: grp.getgrnam(n).gr_gid)
                     for g in config.http_only_groups}
    return AccessPolicy(frozenset(uids), frozenset(gids), frozenset(http_only))


def _resolve(value: int | str, key: str, lookup) -> int:  # type: ignore[no-untyped-def]
    if isinstance(value, int):
        return value
    try:
        return int(lookup(value))
    except KeyError:
        raise ConfigError(f"{key}: no such user or group {value!r}") from None


def load_token(path: str | None) -> bytes | None:
    """server.http_token_file's token (blocks on the disk: call it in a worker thread)."""
    if path is None:
        return None
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"server.http_token_file: cannot read {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(f"server.http_token_file: the token in {path} is shorter than 16 characters")
    return token
