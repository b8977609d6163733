"""What the platform is: Jetson model, L4T/JetPack release, memory, power mode, thermal zones, GPU device nodes.

Plain file reads (and `nvpmodel -q` when asked), no heavy imports: `edge-llama doctor` uses all of it, the daemon's
`health` op calls `power_and_thermal()`. Every path is read under `root` ("/" on a device; a fixture tree in the
tests), so `root / "etc/nv_tegra_release"` and so on. Absolute symlinks inside a non-"/" root are not rebased.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from fnmatch import fnmatch
from importlib.resources import files
from pathlib import Path
from typing import Any

GIB = 1 << 30

# L4T (Jetson Linux) release -> JetPack. Exact releases first, then the release line, then the major.
# Source: the NVIDIA_JETPACK table of jetson-stats (rbonghi/jetson_stats, jtop/core/jetson_variables.py, itself
# "https://developer.nvidia.com/embedded/jetpack-archive"); entries marked "archive" are from NVIDIA's JetPack
# archive page and release notes only (not in that table when it was read).
JETPACK_TABLE: dict[str, tuple[str, str]] = {
    "35.1.0": ("5.0.2", "jetson-stats"), "35.2.1": ("5.1", "jetson-stats"), "35.3.1": ("5.1.1", "jetson-stats"),
    "35.4.1": ("5.1.2", "jetson-stats"), "35.5.0": ("5.1.3", "jetson-stats"), "35.6.0": ("5.1.4", "jetson-stats"),
    "35.6.1": ("5.1.5", "archive"), "36.2.0": ("6.0 DP", "jetson-stats"), "36.3.0": ("6.0", "jetson-stats"),
    "36.4.0": ("6.1", "jetson-stats"), "36.4.2": ("6.1 (rev1)", "jetson-stats"), "36.4.3": ("6.2", "jetson-stats"),
    "36.4.4": ("6.2.1", "archive"), "38.2.0": ("7.0", "archive"), "38.2.1": ("7.0", "archive"),
    "38.4.0": ("7.1", "archive"),
}
JETPACK_LINES = {"35": "5.x", "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1/6.2", "36": "6.x", "38": "7.x"}
SOURCES = {"jetson-stats": "jetson-stats' L4T table, from NVIDIA's JetPack archive",
           "archive": "NVIDIA's JetPack archive and release notes"}

# GPU device nodes. CUDA on Orin (nvgpu driver, L4T r35/r36) opens /dev/nvmap, the nvgpu control/address-space/
# channel nodes (legacy /dev/nvhost-*-gpu, or /dev/nvgpu/igpu0/* from r36) and /dev/host1x-fence; Thor (r38,
# OpenRM) uses /dev/nvidia0, /dev/nvidiactl and /dev/nvidia-uvm. Debugger/profiler/power nodes are optional.
GPU_NODE_GLOBS = ("dev/nvmap", "dev/nvhost-ctrl", "dev/nvhost-*gpu", "dev/nvgpu/igpu*/*", "dev/host1x-fence",
                  "dev/nvidia[0-9]*", "dev/nvidiactl", "dev/nvidia-uvm*", "dev/dri/renderD*")
# One present node of each group must be allowed (legacy /dev/nvhost-*-gpu and r36's /dev/nvgpu/igpu0/* name the
# same functions); other GPU nodes outside DeviceAllow= (debugger, profiler, power, render) are only reported.
NEEDED_GROUPS = {
    "nvmap": ("/dev/nvmap",), "GPU control": ("/dev/nvgpu/igpu0/ctrl", "/dev/nvhost-ctrl-gpu"),
    "address space": ("/dev/nvgpu/igpu0/as", "/dev/nvhost-as-gpu"),
    "channel": ("/dev/nvgpu/igpu0/channel", "/dev/nvhost-gpu"), "TSG": ("/dev/nvgpu/igpu0/tsg", "/dev/nvhost-tsg-gpu"),
    "host1x fence": ("/dev/host1x-fence",), "nvidiactl": ("/dev/nvidiactl",), "nvidia0": ("/dev/nvidia0",),
    "nvidia-uvm": ("/dev/nvidia-uvm",),
}
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/local/lib/systemd/system", "usr/lib/systemd/system",
             "lib/systemd/system")
PACKAGE_UNITS = Path(__file__).resolve().parent.parent / "systemd"  # a checkout's systemd/ folder


def path_under(root: str | os.PathLike[str], path: str) -> Path:
    return Path(root) / path.lstrip("/")


def read_text(root: str | os.PathLike[str], path: str) -> str | None:
    """A small file's text (device-tree strings lose their NUL terminators), or None if it cannot be read."""
    try:
        return path_under(root, path).read_bytes().decode("utf-8", "replace").replace("\0", "\n").strip() or None
    except OSError:
        return None


# --- L4T / JetPack ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class L4tRelease:
    version: str | None  # "36.4.0", from /etc/nv_tegra_release
    line: str | None  # that file's first line
    dpkg_version: str | None  # nvidia-l4t-core's version, e.g. "36.4.0-20240912212859"
    jetpack: str | None
    jetpack_source: str

    @property
    def best(self) -> str | None:
        return self.version or (self.dpkg_version.split("-")[0] if self.dpkg_version else None)


_RELEASE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")


def jetpack_for(l4t: str) -> tuple[str | None, str]:
    """JetPack for an L4T version, and where that answer came from."""
    parts = l4t.split(".")
    full = ".".join((parts + ["0", "0"])[:3])
    if full in JETPACK_TABLE:
        jetpack, source = JETPACK_TABLE[full]
        return jetpack, SOURCES[source]
    for key in (".".join(parts[:2]), parts[0]):
        if key in JETPACK_LINES:
            return JETPACK_LINES[key], f"release line r{key} (L4T {full} is not in the table)"
    return None, f"L4T {full} is not in the table"


def dpkg_version(root: str | os.PathLike[str], package: str) -> str | None:
    """An installed package's version from dpkg's status database."""
    text = read_text(root, "var/lib/dpkg/status")
    if not text:
        return None
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if fields.get("Package") == package and "installed" in fields.get("Status", "").split():
            return fields.get("Version")
    return None


def l4t_release(root: str | os.PathLike[str] = "/") -> L4tRelease | None:
    text = read_text(root, "etc/nv_tegra_release")
    line = text.splitlines()[0].lstrip("# ").strip() if text else None
    match = _RELEASE.search(line or "")
    version = None
    if match:
        revision = (match.group(2).split(".") + ["0"])[:2]
        version = ".".join([match.group(1), *revision])
    dpkg = dpkg_version(root, "nvidia-l4t-core")
    if line is None and dpkg is None:
        return None
    best = version or (dpkg.split("-")[0] if dpkg else None)
    jetpack, source = jetpack_for(best) if best else (None, "no L4T version could be read")
    return L4tRelease(version, line, dpkg, jetpack, source)


# --- model, profile, memory ------------------------------------------------------------------------------------
def device_model(root: str | os.PathLike[str] = "/") -> str | None:
    text = read_text(root, "proc/device-tree/model")
    return text.splitlines()[0].strip() if text else None


def is_jetson(root: str | os.PathLike[str] = "/") -> bool:
    model = device_model(root) or ""
    compatible = read_text(root, "proc/device-tree/compatible") or ""
    return (path_under(root, "etc/nv_tegra_release").exists() or "jetson" in model.lower()
            or "nvidia,tegra" in compatible)


def device_profiles() -> dict[str, dict[str, Any]]:
    data = json.loads(files("edge_llama.data").joinpath("devices.json").read_text())
    return dict(data["devices"])


# (words in /proc/device-tree/model, candidate profiles)
FAMILIES = (("orin nano", ("orin-nano-8gb", "orin-nano-super")), ("orin nx", ("orin-nx-16gb",)),
            ("agx orin", ("agx-orin-32gb", "agx-orin-64gb")), ("thor", ("thor",)))


@dataclass(frozen=True)
class ProfileMatch:
    name: str | None
    note: str


def match_profile(model: str | None, mem_total: int | None, power_mode: str | None = None) -> ProfileMatch:
    """The devices.json profile of this board: the model names the family, the memory size the variant."""
    if not model:
        return ProfileMatch(None, "no /proc/device-tree/model")
    profiles = device_profiles()
    lowered = model.lower()
    for words, names in FAMILIES:
        if words not in lowered:
            continue
        if mem_total is None:
            return ProfileMatch(None, f"{model}: memory size unknown, cannot tell {' / '.join(names)} apart")
        gib = mem_total / GIB
        name = min(names, key=lambda n: abs(profiles[n]["memory_gib"] - gib))
        if abs(profiles[name]["memory_gib"] - gib) > 0.15 * profiles[name]["memory_gib"]:
            return ProfileMatch(None, f"no profile for a {model} with {gib:.1f} GiB (closest: {name}, "
                                f"{profiles[name]['memory_gib']} GiB); plan with --memory-budget")
        if name == "orin-nano-8gb":
            if power_mode and "SUPER" in power_mode.upper():
                return ProfileMatch("orin-nano-super", f"power mode {power_mode}")
            return ProfileMatch(name, "orin-nano-super in MAXN_SUPER mode, JetPack 6.2")
        return ProfileMatch(name, f"{gib:.1f} GiB of memory")
    return ProfileMatch(None, f"{model!r} matches no edge-llama device profile")


def meminfo(root: str | os.PathLike[str] = "/") -> dict[str, int]:
    """/proc/meminfo in bytes: MemTotal, MemAvailable, SwapTotal, SwapFree, ..."""
    out = {}
    for line in (read_text(root, "proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def cuda_version(root: str | os.PathLike[str] = "/") -> tuple[str, str] | None:
    """(version, file it came from): /usr/local/cuda/version.json (CUDA >= 11), else version.txt."""
    text = read_text(root, "usr/local/cuda/version.json")
    if text:
        try:
            return str(json.loads(text)["cuda"]["version"]), "/usr/local/cuda/version.json"
        except (ValueError, KeyError, TypeError):
            pass
    match = re.search(r"CUDA Version\s+(\S+)", read_text(root, "usr/local/cuda/version.txt") or "")
    return (match.group(1), "/usr/local/cuda/version.txt") if match else None


# --- power mode and thermal zones ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerMode:
    name: str | None
    id: int | None
    source: str
    modes: dict[int, str]  # every mode of /etc/nvpmodel.conf, id -> name
    default: int | None


def nvpmodel_modes(root: str | os.PathLike[str] = "/") -> tuple[dict[int, str], int | None]:
    """`< POWER_MODEL ID=0 NAME=MAXN >` lines and `< PM_CONFIG DEFAULT=2 >` of /etc/nvpmodel.conf."""
    text = read_text(root, "etc/nvpmodel.conf") or ""
    modes = {int(i): name for i, name in re.findall(r"<\s*POWER_MODEL\s+ID=(\d+)\s+NAME=(\S+?)\s*>", text)}
    default = re.search(r"<\s*PM_CONFIG\s+DEFAULT=(\d+)\s*>", text)
    return modes, int(default.group(1)) if default else None


def power_mode(root: str | os.PathLike[str] = "/", run: bool = True, timeout: float = 5.0) -> PowerMode | None:
    """The nvpmodel power mode: `nvpmodel -q` (when `run` and it is on PATH), else /var/lib/nvpmodel/status
    (`pmode:0002 ...`, what nvpmodel itself writes) named through /etc/nvpmodel.conf."""
    modes, default = nvpmodel_modes(root)
    exe = shutil.which("nvpmodel") if run else None
    if exe:
        try:
            out = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=timeout).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        name = re.search(r"NV Power Mode:\s*(\S+)", out)
        if name:
            ident = re.search(r"^\s*(\d+)\s*$", out[name.end():], re.MULTILINE)
            return PowerMode(name.group(1), int(ident.group(1)) if ident else None, "nvpmodel -q", modes, default)
    status = re.search(r"pmode:\s*(\d+)", read_text(root, "var/lib/nvpmodel/status") or "")
    if status:
        ident = int(status.group(1))
        return PowerMode(modes.get(ident), ident, "/var/lib/nvpmodel/status", modes, default)
    return None


@dataclass(frozen=True)
class Zone:
    name: str
    celsius: float


def thermal_zones(root: str | os.PathLike[str] = "/") -> list[Zone]:
    """Readable zones with a plausible temperature (Orin's idle cv zones report -256 C: left out)."""
    zones = []
    base = path_under(root, "sys/class/thermal")
    for folder in sorted(base.glob("thermal_zone*"), key=lambda p: int(re.sub(r"\D", "", p.name) or 0)):
        name = read_text(root, f"sys/class/thermal/{folder.name}/type") or folder.name
        raw = read_text(root, f"sys/class/thermal/{folder.name}/temp")
        try:
            celsius = int(raw or "") / 1000.0
        except ValueError:
            continue
        if -40.0 < celsius < 150.0:
            zones.append(Zone(name, celsius))
    return zones


def power_and_thermal(root: str | os.PathLike[str] = "/") -> dict[str, Any]:
    """For the daemon's `health` op on a Jetson: the power mode (from nvpmodel's status file, no subprocess) and
    the hottest thermal zone. A few small file reads; never raises."""
    result: dict[str, Any] = {"power_mode": None, "hottest_zone": None}
    try:
        mode = power_mode(root, run=False)
        if mode is not None:
            result["power_mode"] = mode.name or (f"mode {mode.id}" if mode.id is not None else None)
        zones = thermal_zones(root)
        if zones:
            hot = max(zones, key=lambda z: z.celsius)
            result["hottest_zone"] = {"name": hot.name, "celsius": round(hot.celsius, 1)}
    except Exception:  # noqa: BLE001 - health must answer whatever the platform files look like
        pass
    return result


# --- GPU device nodes ------------------------------------------------------------------------------------------
def gpu_device_nodes(root: str | os.PathLike[str] = "/") -> list[str]:
    """The GPU device nodes present, as paths on the device ("/dev/nvmap"). Under a fixture root a plain file
    counts; under "/" only character devices do."""
    found = set()
    for pattern in GPU_NODE_GLOBS:
        for hit in glob.glob(str(path_under(root, pattern))):
            try:
                mode = os.stat(hit).st_mode
            except OSError:
                continue
            if stat.S_ISCHR(mode) or (str(root) != "/" and stat.S_ISREG(mode)):
                found.add("/" + os.path.relpath(hit, root))
    return sorted(found)


def device_number(root: str | os.PathLike[str], node: str) -> int | None:
    """st_rdev of a character device node (None for a fixture's plain file or a missing node)."""
    try:
        st = os.stat(path_under(root, node))
    except OSError:
        return None
    return st.st_rdev if stat.S_ISCHR(st.st_mode) else None


def char_majors(root: str | os.PathLike[str] = "/") -> dict[str, set[int]]:
    """/proc/devices' character section: driver name -> majors (for systemd's `DeviceAllow=char-NAME`)."""
    majors: dict[str, set[int]] = {}
    text = read_text(root, "proc/devices") or ""
    section = text.split("Block devices:")[0]
    for line in section.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit():
            majors.setdefault(fields[1], set()).add(int(fields[0]))
    return majors


@dataclass
class Unit:
    """A systemd unit file with its drop-ins: every Key=value in order (an empty value resets a list)."""

    path: Path
    installed: bool
    values: dict[str, list[str]]

    def last(self, key: str, default: str | None = None) -> str | None:
        return self.values[key][-1] if self.values.get(key) else default


def read_unit(root: str | os.PathLike[str], name: str) -> Unit | None:
    """The installed unit (the first of systemd's unit directories under root, with its drop-ins), else the
    checkout's systemd/ copy (installed=False), else None."""
    main = next((p for p in (path_under(root, d) / name for d in UNIT_DIRS) if p.is_file()), None)
    installed = main is not None
    if main is None:
        main = PACKAGE_UNITS / name
        if not main.is_file():
            return None
    dropins: dict[str, Path] = {}
    if installed:
        for d in reversed(UNIT_DIRS):  # /etc wins over /usr/lib for the same file name
            for conf in (path_under(root, d) / (name + ".d")).glob("*.conf"):
                dropins[conf.name] = conf
    values: dict[str, list[str]] = {}
    for path in [main, *(dropins[n] for n in sorted(dropins))]:
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip()
            if not line or line[0] in "#;[" or "=" not in line:
                continue
            key, _, value = (part.strip() for part in line.partition("="))
            if value:
                values.setdefault(key, []).append(value)
            else:
                values[key] = []
    return Unit(main, installed, values)


@dataclass
class GpuAccess:
    present: list[str]
    restricted: bool  # DevicePolicy closed/strict, or DeviceAllow= entries
    private_devices: bool
    device_policy: str
    not_allowed: list[str] = field(default_factory=list)  # present, outside DeviceAllow=
    missing: list[str] = field(default_factory=list)  # of those, the ones CUDA needs (no allowed alternative)
    absent: list[str] = field(default_factory=list)  # allowed, not present


def gpu_access(root: str | os.PathLike[str], unit: Unit) -> GpuAccess:
    """The GPU nodes present against the unit's DeviceAllow= list. A node is allowed by its path, by the device
    number of an allowed path (under "/"), or by a `char-NAME` class through /proc/devices; "w" is needed."""
    present = gpu_device_nodes(root)
    policy = unit.last("DevicePolicy", "auto") or "auto"
    entries = [e.split() for e in unit.values.get("DeviceAllow", [])]
    private = (unit.last("PrivateDevices") or "no").lower() in ("yes", "true", "1", "on")
    access = GpuAccess(present, policy != "auto" or bool(entries), private, policy)
    paths = {e[0]: (e[1] if len(e) > 1 else "rwm") for e in entries}
    rdevs = {device_number(root, p) for p, a in paths.items() if "w" in a} - {None}
    majors = char_majors(root)
    allowed_majors = {m for p, a in paths.items() if p.startswith("char-") and "w" in a
                      for name, ms in majors.items() if fnmatch(name, p[5:]) for m in ms}

    def allowed(node: str) -> bool:
        rdev = device_number(root, node)
        return "w" in paths.get(node, "") or (rdev is not None and (rdev in rdevs or os.major(rdev) in allowed_majors))

    if access.restricted:
        access.not_allowed = [n for n in present if not allowed(n)]
        access.missing = sorted({n for nodes in NEEDED_GROUPS.values() for n in nodes if n in present
                                 and not any(allowed(m) for m in nodes if m in present)})
        access.absent = sorted(p for p in paths if p.startswith("/dev/") and not path_under(root, p).exists())
    return access
