"""A session store that cannot be written: a full disk (a 256 KiB tmpfs as the state directory, when we are root
and may mount), else a state directory made unwritable for a non-root uid (this user when not root; uid 65534
through setpriv when root cannot mount)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reliability_common import Lab, chat_request, fake, own_sessions, tracebacks

import edge_llama
from edge_llama.client import Client
from edge_llama.errors import EdgeLlamaError

TMPFS = "size=256k"
NOBODY = 65534
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")


def full_disk(lab: Lab, force_unwritable: bool = False) -> dict[str, Any]:
    state = lab.root / "disk" / "state"
    state.mkdir(parents=True)
    if not force_unwritable and os.geteuid() == 0 and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", TMPFS, "tmpfs", str(state)], capture_output=True).returncode == 0:
        try:
            return exercise(lab, state, "tmpfs " + TMPFS, errno.ENOSPC, fill=lambda: fill(state / "filler"),
                            unfill=lambda: (state / "filler").unlink())
        finally:
            subprocess.run(["umount", str(state)], check=True)
    launch: dict[str, Any] = {}
    method = "state directory made unwritable (mode 0500) for this uid"
    if os.geteuid() == 0:
        launch = as_nobody(lab, state)
        if "skipped" in launch:
            return {"method": launch["skipped"], "skipped": True, "unexpected": 0}
        method = f"state directory made unwritable (mode 0500) for uid {NOBODY} (setpriv)"
    sessions = own_sessions(state)
    return exercise(lab, state, method, errno.EACCES, fill=lambda: sessions.chmod(0o500),
                    unfill=lambda: sessions.chmod(0o700), **launch)


def fill(path: Path) -> None:
    """Write until the file system is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:  # unbuffered: closing it has nothing left to write
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def as_nobody(lab: Lab, state: Path) -> dict[str, Any]:
    """How the daemon runs as uid 65534: the package copied where everyone can read it (the checkout may sit in a
    directory only root can enter), this interpreter (if that uid may run it), the state dir given to that uid."""
    site = lab.root / "disk" / "site"
    shutil.copytree(Path(edge_llama.__file__).parent, site / "edge_llama",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in [lab.root, lab.root / "disk", *site.rglob("*"), site]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    (lab.root / "disk").chmod(0o777)  # the daemon creates its socket there
    os.chown(state, NOBODY, NOBODY)
    env = {"PYTHONPATH": str(site)}
    probe = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import edge_llama.cli, yaml"], cwd=site,
                           capture_output=True, text=True, env={**os.environ, **env})
    if probe.returncode != 0:
        return {"skipped": f"skipped: uid {NOBODY} cannot run {sys.executable} with edge_llama "
                           f"({probe.stderr.strip()[-200:]})"}
    return {"command": AS_NOBODY, "env": env, "cwd": site, "name": "disk/d"}


def attempt(c: Client, session: str | None, text: str) -> dict[str, Any]:
    started = time.monotonic()
    request = {**chat_request(text), "stream": False, **({"session": session} if session else {})}
    try:
        outcome, message = c.call(request)["finish_reason"], None
    except EdgeLlamaError as exc:
        outcome, message = exc.code, exc.message
    return {"outcome": outcome, "message": message, "ms": round((time.monotonic() - started) * 1000, 1)}


def exercise(lab: Lab, state: Path, method: str, code: int, fill: Callable[[], None], unfill: Callable[[], None],
             name: str = "disk", **launch: Any) -> dict[str, Any]:
    """Session chats fail with an error naming the session and the reason, within seconds; the existing session's
    file is untouched; chats without a session are served; once the disk has room again, sessions work."""
    d = lab.start(fake(reply="f" * 200, kv_tokens=8192), name=name, state_dir=state, **launch)
    sessions = own_sessions(state)
    with Client(d.socket, timeout=60) as c:
        c.call({**chat_request("keep this"), "session": "kept", "stream": False})
        kept = (sessions / "kept.json").read_bytes()
        fill()
        tries = {"new_session": attempt(c, "fresh", "x " * 2000), "existing_session": attempt(c, "kept", "more"),
                 "no_session": attempt(c, None, "no session needed")}
        kept_intact = (sessions / "kept.json").read_bytes() == kept
        unfill()
        tries["existing_session_after"] = attempt(c, "kept", "room again")
    reason = os.strerror(code)
    # Clear: the session's error says what failed and why (the OS's reason), and nothing was logged as a crash.
    clear = all(t["outcome"] not in ("stop", "length") and reason in (t["message"] or "") and t["ms"] < 10_000
                for key, t in tries.items() if key in ("new_session", "existing_session"))
    log_tracebacks = tracebacks(lab.log(d))
    served = all(tries[key]["outcome"] in ("stop", "length") for key in ("no_session", "existing_session_after"))
    temp_left = [p.name for p in sessions.glob(".*.tmp")]
    return {"method": method, **tries, "clear_errors": clear, "kept_session_intact": kept_intact,
            "served_without_sessions": served, "temp_files_left": len(temp_left),
            "tracebacks_in_log": log_tracebacks,
            "unexpected": (not clear) + (not kept_intact) + (not served) + bool(temp_left) + bool(log_tracebacks)}
