"""Running as a systemd service, tested without systemd as PID 1: notify, watchdog, socket activation, reload,
access control, logging, and the unit files themselves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import Daemons, OtherUser, chat, fake_config, skip_without_offline_security
from sd_emulator import NotifyListener, ServiceManager

from edge_llama.client import Client

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "systemd"


@pytest.fixture
def notify(workdir: Path):  # type: ignore[no-untyped-def]
    listener = NotifyListener(workdir / "notify.sock")
    yield listener
    listener.close()


def test_notify_sequence_reload_and_stop(daemons: Daemons, notify: NotifyListener) -> None:
    d = daemons.start({**fake_config(reply="abc" * 20, token_delay_ms=10), "server": {"max_queue": 0}},
                      env={**notify.env, "WATCHDOG_USEC": "200000"})
    notify.wait_for("READY")
    notify.wait_for("WATCHDOG", count=2)
    statuses = notify.statuses()
    assert statuses[0].startswith("loading model")
    ready_status = statuses[statuses.index("warming up") + 1]
    assert ready_status.startswith("ready: fake (fake), KV budget 512 tokens, serving 0 requests")
    keys = notify.keys()
    assert keys.index("READY") > keys.index("EXTEND_TIMEOUT_USEC")  # READY only after the load

    # SIGHUP with a good config: the new limit is live, RELOADING=1 (with MONOTONIC_USEC) then READY=1.
    config_path: Path = d.config_path  # type: ignore[attr-defined]
    config = yaml.safe_load(config_path.read_text())
    config["server"].update(max_queue=2, max_session_messages=2)
    config_path.write_text(yaml.safe_dump(config))
    d.proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY", count=2)
    reloading = [f for _, f in notify.messages if f.get("RELOADING") == "1"]
    assert len(reloading) == 1 and int(reloading[0]["MONOTONIC_USEC"]) > 0
    with Client(d.socket) as c:
        assert c.call({"op": "health"})["queue"]["limit"] == 3
        for word in ("one", "two"):
            c.call({"op": "chat", "messages": [{"role": "user", "content": word}], "session": "s"})
    stored = json.loads((daemons.workdir / "state" / "sessions" / str(os.getuid()) / "s.json").read_text())
    assert [m["content"] for m in stored["messages"]] == ["two", "abc" * 20]  # the new history limit

    # SIGHUP with a bad config: refused, the daemon keeps running with the old one.
    config_path.write_text("server:\n  max_queue: lots\n")
    d.proc.send_signal(signal.SIGHUP)
    notify.wait_for("READY", count=3)
    assert "reload failed" in notify.statuses()[-1]
    with Client(d.socket) as c:
        assert c.call({"op": "health"})["queue"]["limit"] == 3

    # SIGTERM during a stream: the stream completes, STOPPING=1, exit 0.
    with Client(d.socket) as c:
        rid = c.send({"op": "chat", "messages": [{"role": "user", "content": "go"}]})
        next(c.events(rid))
        d.proc.terminate()
        events = list(c.events(rid))
    assert events[-1]["finish_reason"] == "stop"
    assert d.proc.wait(10) == 0
    assert notify.keys()[-1] == "STOPPING"
    assert "reload refused" in daemons.log(d) and "server.max_queue" in daemons.log(d)


def test_socket_activation_serves_first_connection_and_never_unlinks(daemons: Daemons, workdir: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate not installed (Debian package systemd)")
    sock = workdir / "act.sock"
    config = {**fake_config(), "server": {"state_dir": str(workdir / "state")}}
    (workdir / "act.yaml").write_text(yaml.safe_dump(config))
    activator = subprocess.Popen(
        [activate, "-l", str(sock), "--fdname=api", sys.executable, "-m", "edge_llama", "serve", "--config",
         str(workdir / "act.yaml")], stdout=subprocess.DEVNULL, stderr=open(workdir / "act.log", "wb"))
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        with Client(sock, timeout=30) as c:  # this connection starts the daemon; it is served once loaded
            assert chat(c, "activated")[0] == "You said: activated"
            health = c.call({"op": "health"})
        assert health["state"] == "ready"
        activator.terminate()
        assert activator.wait(10) == 0
    finally:
        if activator.poll() is None:
            activator.kill()
    assert sock.exists()  # an activated socket belongs to systemd: never unlinked
    assert "socket-activated" in (workdir / "act.log").read_text()


def test_watchdog_pings_stop_when_event_loop_is_wedged(daemons: Daemons, notify: NotifyListener) -> None:
    d = daemons.start(fake_config(), env={**notify.env, "WATCHDOG_USEC": "300000"})
    manager = ServiceManager(notify, d.proc.pid, start_timeout_s=30, watchdog_s=0.3)
    assert manager.supervise(1.0) is None  # a healthy daemon keeps the watchdog happy
    os.kill(d.proc.pid, signal.SIGSTOP)  # nothing in the process runs any more: the loop is wedged
    started = time.monotonic()
    assert manager.supervise(5.0) == "watchdog"
    assert time.monotonic() - started < 1.0
    assert d.proc.wait(10) == -signal.SIGABRT


def test_watchdog_pings_stop_when_engine_is_stuck(daemons: Daemons, notify: NotifyListener) -> None:
    config = {**fake_config(token_delay_ms=60000), "server": {"engine_stall_s": 0.3, "warmup": False}}
    d = daemons.start(config, env={**notify.env, "WATCHDOG_USEC": "400000"})
    manager = ServiceManager(notify, d.proc.pid, start_timeout_s=30, watchdog_s=0.4)
    assert manager.supervise(0.8) is None
    with Client(d.socket) as c:
        c.send({"op": "chat", "messages": [{"role": "user", "content": "hang"}]})  # the engine never answers
        assert c.call({"op": "health"})["state"] == "ready"  # the event loop itself is fine...
        assert manager.supervise(5.0) == "watchdog"  # ...but the watchdog sees the stuck engine
    assert "withholding watchdog pings" in daemons.log(d)


def test_start_timeout_is_extended_during_a_long_load(daemons: Daemons, notify: NotifyListener) -> None:
    config = fake_config(load_delay_ms=7000)  # longer than the 6 s start budget below
    d = daemons.start(config, wait=False, env=notify.env)
    manager = ServiceManager(notify, d.proc.pid, start_timeout_s=6, watchdog_s=60)
    assert manager.supervise(9.0) is None  # EXTEND_TIMEOUT_USEC kept it alive until READY=1
    assert "READY" in notify.keys()


def peer_client(user: OtherUser, sock: Path, pad: int = 0) -> dict:
    """Connect as another user and return the first reply line to a health request (`pad` bytes longer)."""
    code = ("import json, socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
            "s.sendall(json.dumps({'id': 'h', 'op': 'health', **({'pad': 'x' * int(sys.argv[2])} "
            "if int(sys.argv[2]) else {})}).encode() + b'\\n'); print(s.makefile().readline())")
    out = user.run(user.python, "-c", code, str(sock), str(pad))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_peer_outside_allowlist_is_forbidden(daemons: Daemons, nobody: OtherUser) -> None:
    d = daemons.start({**fake_config(), "server": {"socket_mode": 0o666}})
    for pad in (0, 0, 0, 200_000):  # the reply used to race the close: the peer saw EPIPE/ECONNRESET, not the reason
        reply = peer_client(nobody, d.socket, pad)
        assert reply == {"id": "h", "event": "error", "code": "forbidden",
                         "message": "uid 65534 is not allowed to use this daemon (ask for the client group)"}
    for argv in (("status",), ("chat", "-m", "hi")):  # what the user sees: the reason, no traceback
        out = nobody.edge_llama(*argv, "--socket", str(d.socket))
        assert out.returncode != 0
        assert out.stderr == "edge-llama: uid 65534 is not allowed to use this daemon (ask for the client group)\n"
    assert "PEER_UID=65534" in daemons.log(d)
    d.stop()
    d = daemons.start({**fake_config(), "server": {"socket_mode": 0o666, "allow_users": [65534]}})
    assert peer_client(nobody, d.socket)["state"] == "ready"


def test_abstract_socket_is_refused(workdir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "edge_llama", "serve", "--backend", "fake", "--socket", "@edge"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "abstract-namespace sockets are refused" in out.stderr


def test_journald_gets_structured_fields() -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python not installed")
    import logging

    from edge_llama.service.systemd import setup_logging

    sent: list[tuple[str, dict]] = []
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        def sender(MESSAGE: str, **fields: object) -> None:  # noqa: N803 - systemd.journal.send's signature
            sent.append((MESSAGE, fields))

        setup_logging("info", sender=sender)
        logging.getLogger("edge_llama.server").info("chat r1 done", extra={"REQUEST_ID": "r1", "OP": "chat",
                                                                          "PEER_UID": 1000, "TTFT_MS": 61.5})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    message, fields = sent[-1]
    assert message == "chat r1 done"
    assert fields["REQUEST_ID"] == "r1" and fields["PEER_UID"] == 1000 and fields["TTFT_MS"] == 61.5
    assert fields["SYSLOG_IDENTIFIER"] == "edge-llama" and fields["PRIORITY"] == "6"


@pytest.fixture
def units(workdir: Path) -> Path:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    # verify checks that ExecStart exists: point it at this checkout's venv.
    venv = Path(sys.executable).parent.parent
    text = (UNITS / "edge-llama.service").read_text().replace("/opt/edge-llama/venv", str(venv))
    (workdir / "edge-llama.service").write_text(text)
    shutil.copy(UNITS / "edge-llama.socket", workdir)
    return workdir


def test_units_verify_cleanly(units: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", "edge-llama.service", "edge-llama.socket"], cwd=units,
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")  # verify exits 0 on bad keys: any output fails


def security(units: Path, unit: str = "edge-llama.service") -> tuple[float, str]:
    """The unit's exposure level. (--threshold takes only whole numbers, so the score is compared here.)"""
    skip_without_offline_security()
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", unit], cwd=units,
                         capture_output=True, text=True, timeout=60)
    line = out.stdout.strip().splitlines()[-1]  # "-> Overall exposure level for edge-llama.service: 0.7 SAFE"
    assert out.returncode == 0, out.stderr
    return float(line.split(":")[-1].split()[0]), line


SECURITY_CLAIM = 1.5  # the README's claim: exposure at most this (systemd-analyze's 0-10 scale, lower is safer)


def test_service_security_score_is_what_the_readme_claims(units: Path) -> None:
    score, line = security(units)
    print(line)
    assert score <= SECURITY_CLAIM, line
    # The check can fail: the same unit without its sandboxing is refused at this threshold.
    unit = units / "edge-llama.service"
    unit.write_text("\n".join(ln for ln in unit.read_text().splitlines()
                              if not ln.startswith(("Private", "Protect", "Restrict", "SystemCall", "Capability"))))
    score, line = security(units)
    assert score > SECURITY_CLAIM, line


WYOMING_CLAIM = 1.5  # the Wyoming server listens on TCP; its exposure stays at most this


def test_wyoming_unit_has_network_for_its_port_only(units: Path) -> None:
    unit = units / "edge-llama-wyoming.service"
    text = (UNITS / unit.name).read_text().replace("/opt/edge-llama/venv", str(Path(sys.executable).parent.parent))
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", unit.name], cwd=units, capture_output=True, text=True,
                         timeout=60)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")
    lines = text.splitlines()
    # AF_NETLINK: zeroconf lists the interfaces with getifaddrs(3); nothing else beyond its sockets.
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK" in lines and "IPAddressDeny=any" in lines
    allowed = next(ln for ln in lines if ln.startswith("IPAddressAllow=")).split("=", 1)[1].split()
    assert "any" not in allowed and "0.0.0.0/0" not in allowed and "::/0" not in allowed
    score, line = security(units, unit.name)
    print(line)
    assert score <= WYOMING_CLAIM, line
    # The check can fail: the same unit without its network and sandbox restrictions is refused.
    unit.write_text("\n".join(ln for ln in lines if not ln.startswith(
        ("RestrictAddressFamilies", "IPAddress", "Private", "Protect", "SystemCall"))))
    assert security(units, unit.name)[0] > WYOMING_CLAIM


def test_deploy_scripts_parse_and_shipped_configs_are_valid() -> None:
    from edge_llama.config import loads

    for script in ("install.sh", "uninstall.sh"):
        out = subprocess.run(["bash", "-n", str(REPO / "deploy" / script)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    common = (REPO / "deploy" / "config.yaml").read_text()
    for backend in ("llamacpp", "trtllm"):  # install.sh writes engine-<backend>.yaml + config.yaml
        text = (REPO / "deploy" / f"engine-{backend}.yaml").read_text() + common
        config = loads(text, source=backend)
        assert config.engine.backend == backend and config.engine.kv_tokens == 4096
        assert config.server.allow_users is None
    sysusers = (UNITS / "edge-llama.sysusers").read_text()
    assert "g edge-llama-clients" in sysusers
    assert "SocketGroup=edge-llama-clients" in (UNITS / "edge-llama.socket").read_text()
