"""`edge-llama doctor` against fixture trees (/etc, /proc, /sys, /dev, /var/lib, /usr/local/cuda under --root) and
real daemons: an Orin Nano 8GB on JetPack 6.1, an AGX Orin 64GB on JetPack 6.2, and a machine that is not a Jetson.
The command runs as a real subprocess; stand-ins are files (device nodes, dist-info of the Jetson-only wheels) and a
`nvpmodel` script on PATH, never the check functions themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import Daemons, fake_config

from edge_llama import jetson
from edge_llama.client import Client
from edge_llama.errors import Forbidden, Unavailable
from edge_llama.manifest import file_entries, write_manifest
from edge_llama.pipeline.plan import PlanOptions, plan

REPO = Path(__file__).resolve().parents[1]
R36_NODES = ["nvmap", "nvhost-ctrl-gpu", "nvhost-gpu", "nvhost-as-gpu", "nvhost-tsg-gpu", "nvhost-dbg-gpu",
             "nvhost-prof-gpu", "nvgpu/igpu0/ctrl", "nvgpu/igpu0/as", "nvgpu/igpu0/channel", "nvgpu/igpu0/tsg",
             "nvgpu/igpu0/dbg", "nvgpu/igpu0/prof", "nvgpu/igpu0/power", "host1x-fence", "dri/renderD128"]
ON_PY310 = sys.version_info[:2] == (3, 10)


def write(root: Path, rel: str, content: str | bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def meminfo(total_kb: int, avail_kb: int, swap_kb: int) -> str:
    return (f"MemTotal:       {total_kb} kB\nMemFree:        {avail_kb // 2} kB\nMemAvailable:   {avail_kb} kB\n"
            f"Buffers:           23224 kB\nSwapTotal:      {swap_kb} kB\nSwapFree:       {swap_kb} kB\n")


def jetson_tree(root: Path, *, model: str, release: str, l4t_core: str, mem_kb: tuple[int, int, int],
                modes: dict[int, str], pmode: int, zones: dict[str, int], install_units: bool = True) -> Path:
    """A Jetson's files as JetPack lays them out (strings as read on devices; device nodes as plain files)."""
    write(root, "etc/nv_tegra_release", f"# {release}, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep "
          "13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\nTARGET_USERSPACE_LIB_DIR=nvidia\n")
    write(root, "var/lib/dpkg/status", "Package: libc6\nStatus: install ok installed\nVersion: 2.35-0ubuntu3.8\n\n"
          f"Package: nvidia-l4t-core\nStatus: install ok installed\nPriority: standard\nArchitecture: arm64\n"
          f"Version: {l4t_core}\nDescription: NVIDIA Core Package\n multi-line description\n")
    write(root, "proc/device-tree/model", model + "\0")
    write(root, "proc/device-tree/compatible", "nvidia,p3768-0000+p3767-0005\0nvidia,tegra234\0")
    write(root, "proc/meminfo", meminfo(*mem_kb))
    write(root, "etc/nvpmodel.conf", "".join(f"< POWER_MODEL ID={i} NAME={n} >\nCPU_ONLINE CORE_0 1\n\n"
                                             for i, n in modes.items()) + "< PM_CONFIG DEFAULT=0 >\n")
    write(root, "var/lib/nvpmodel/status", f"pmode:{pmode:04d} fmode:quiet\n")
    for i, (name, milli) in enumerate(zones.items()):
        write(root, f"sys/class/thermal/thermal_zone{i}/type", name + "\n")
        write(root, f"sys/class/thermal/thermal_zone{i}/temp", f"{milli}\n")
    for node in R36_NODES:
        write(root, f"dev/{node}", "")
    write(root, "usr/local/cuda/version.json", json.dumps({"cuda": {"name": "CUDA SDK", "version": "12.6.68"}}))
    if install_units:  # what deploy/install.sh puts there
        for unit in ("edge-llama.service", "edge-llama.socket"):
            write(root, f"etc/systemd/system/{unit}", (REPO / "systemd" / unit).read_text())
    return root


def orin_nano(root: Path, avail_kb: int = 6_200_000) -> Path:
    return jetson_tree(root, model="NVIDIA Jetson Orin Nano Developer Kit", release="R36 (release), REVISION: 4.0",
                       l4t_core="36.4.0-20240912212859", mem_kb=(7_620_244, avail_kb, 3_810_120),
                       modes={0: "15W", 1: "7W"}, pmode=0,
                       zones={"cpu-thermal": 48500, "gpu-thermal": 47000, "cv0-thermal": -256000,
                              "soc0-thermal": 47500, "tj-thermal": 48900})


def agx_orin(root: Path) -> Path:
    return jetson_tree(root, model="NVIDIA Jetson AGX Orin Developer Kit", release="R36 (release), REVISION: 4.3",
                       l4t_core="36.4.3-20250107174145", mem_kb=(64_335_800, 60_000_000, 0),
                       modes={0: "MAXN", 1: "15W", 2: "30W", 3: "50W"}, pmode=3,
                       zones={"cpu-thermal": 78000, "gpu-thermal": 88500, "tj-thermal": 91000})


def not_jetson(root: Path) -> Path:
    write(root, "proc/meminfo", meminfo(24_683_656, 23_255_016, 0))
    return root


def installed_site(root: Path, versions: dict[str, str]) -> Path:
    """Stand-ins for wheels that exist only on a Jetson: a package folder and its dist-info (what
    importlib.metadata and find_spec read)."""
    for dist, version in versions.items():
        write(root, f"{dist}/__init__.py", "")
        write(root, f"{dist}-{version}.dist-info/METADATA",
              f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return root


def engine_folder(folder: Path, device: str = "orin-nano-8gb") -> Path:
    """An engine folder as `edge-llama build` leaves it (its manifest written by the real writer)."""
    p = plan(PlanOptions(device=device))
    write(folder, "rank0.engine", os.urandom(4096))
    write(folder, "config.json", json.dumps({"build_config": {"max_seq_len": 4096}}))
    write(folder, "tokenizer.json", "{}")
    write_manifest(folder, "trtllm-engine", {
        "model": {"name": "Llama-3.2-1B-Instruct"},
        "build": {"max_seq_len": 4096, "max_input_len": 4095, "max_num_tokens": 512, "max_kv_tokens": p["kv_tokens"]},
        "plan": {k: p[k] for k in ("device", "kv_tokens", "kv_dtype", "resident_bytes", "decode_ceiling_tok_s")},
        "tools": {"edge-llama": "0.1.0", "tensorrt_llm": "0.12.0", "tensorrt": "10.3.0"},
        "files": file_entries(folder),
    })
    return folder


def doctor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_llama", "doctor", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


def doctor_json(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    out = doctor(*args, "--json", env=env)
    assert out.stdout, out.stderr
    data = json.loads(out.stdout)
    assert data["exit_status"] == out.returncode
    return out.returncode, {c["name"]: c for c in data["checks"]}


def row(table: str, name: str) -> str:
    """A check's line in the table and its fix line, if any."""
    lines = table.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
    return "\n".join([lines[i], *(line for line in lines[i + 1:i + 2] if line.lstrip().startswith("fix:"))])


@pytest.fixture
def nano_setup(workdir: Path) -> dict[str, Any]:
    root = orin_nano(workdir / "nano")
    engine = engine_folder(workdir / "engine")
    write(root, "etc/edge-llama/config.yaml", yaml.safe_dump(
        {"engine": {"backend": "trtllm", "model": str(engine), "kv_tokens": 4096}}))
    site = installed_site(workdir / "site", {"tensorrt_llm": "0.12.0", "tensorrt": "10.3.0"})
    # An nvpmodel that answers nothing (as without root on some releases): the status file is read instead, and a
    # real nvpmodel on a Jetson running these tests stays out of the way.
    stub = write(workdir, "bin/nvpmodel", "#!/bin/sh\nexit 1\n")
    stub.chmod(0o755)
    return {"root": root, "engine": engine, "site": site, "socket": workdir / "none.sock",
            "env": {"PYTHONPATH": str(site), "PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}}


# --- Orin Nano 8GB, JetPack 6.1, TensorRT-LLM engine, daemon not running --------------------------------------
def test_orin_nano_jetpack_6_1_table_and_daemon_not_running(nano_setup: dict[str, Any]) -> None:
    s = nano_setup
    out = doctor("--root", str(s["root"]), "--socket", str(s["socket"]), env=s["env"])
    table = out.stdout
    assert out.returncode == 1, table + out.stderr
    assert "Traceback" not in out.stderr
    assert "config.yaml: backend trtllm" in row(table, "config")  # found through the installed unit's ExecStart
    assert "NVIDIA Jetson Orin Nano Developer Kit: device profile orin-nano-8gb" in row(table, "platform")
    assert "L4T r36.4.0 = JetPack 6.1" in row(table, "l4t") and "jetson-stats" in row(table, "l4t")
    assert "nvidia-l4t-core 36.4.0-20240912212859" in row(table, "l4t")
    assert ("ok" if ON_PY310 else "FAIL") in row(table, "python").split()[1]
    assert "Llama-3.2-1B-Instruct planned for orin-nano-8gb, 3 files match their sha256" in row(table, "engine")
    runtime = row(table, "runtime")
    assert runtime.split()[1] == "ok" and "tensorrt_llm 0.12.0, tensorrt 10.3.0, cuda 12.6.68" in runtime
    gpu = row(table, "gpu-devices")  # the package's DeviceAllow= list covers CUDA's nodes on r36
    assert gpu.split()[1] == "WARN" and "/dev/nvhost-dbg-gpu" in gpu and "/dev/nvmap" not in gpu.split("allowed:")[1]
    assert "/dev/nvhost-ctrl" in gpu.split("allowed but absent here (fine): ")[1]
    resident = plan(PlanOptions(device="orin-nano-8gb"))["resident_bytes"]
    assert f"the engine needs ~{resident / (1 << 30):.2f} GiB resident" in row(table, "memory")
    assert row(table, "memory").split()[1] == "ok"
    assert "15W (id 0, from /var/lib/nvpmodel/status)" in row(table, "power")
    assert "hottest tj-thermal 48.9 C" in row(table, "thermal") and "cv0-thermal" not in row(table, "thermal")
    socket_row = row(table, "socket")
    assert socket_row.split()[1] == "FAIL" and "listens on /run/edge-llama/edge-llama.sock" in socket_row
    daemon = row(table, "daemon")
    assert daemon.split()[1] == "FAIL" and "fix: start it: sudo systemctl enable --now edge-llama.socket" in daemon
    assert table.rstrip().endswith("not ready to serve")


def test_orin_nano_json_is_the_same_checks(nano_setup: dict[str, Any]) -> None:
    s = nano_setup
    status, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]), env=s["env"])
    assert status == 1
    assert list(checks) == ["config", "platform", "l4t", "python", "engine", "runtime", "gpu-devices", "memory",
                            "power", "thermal", "socket", "access", "daemon"]
    assert checks["l4t"]["data"]["jetpack"] == "6.1" and checks["platform"]["data"]["profile"] == "orin-nano-8gb"
    assert checks["runtime"]["data"]["engine_built_with"] == {"tensorrt_llm": "0.12.0", "tensorrt": "10.3.0"}
    assert checks["daemon"]["status"] == "fail"
    assert "systemctl enable --now edge-llama.socket" in checks["daemon"]["fix"]
    assert all(c["fix"] for c in checks.values() if c["status"] == "fail")


def test_tensorrt_upgraded_since_the_build_means_rebuild(nano_setup: dict[str, Any], workdir: Path) -> None:
    s = nano_setup
    site = installed_site(workdir / "site2", {"tensorrt_llm": "0.12.0", "tensorrt": "10.4.0"})
    _, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]),
                            env={**s["env"], "PYTHONPATH": str(site)})
    runtime = checks["runtime"]
    assert runtime["status"] == "fail"
    assert "the engine was built with tensorrt 10.3.0 (installed 10.4.0)" in runtime["detail"]
    assert f"edge-llama build --checkpoint CHECKPOINT --plan plan.json --out {s['engine']} --force" in runtime["fix"]


def test_tensorrt_llm_missing(nano_setup: dict[str, Any]) -> None:
    if importlib.util.find_spec("tensorrt_llm") is not None:  # the doctor looks over sys.path: it finds it
        pytest.skip("on a Jetson: needs tensorrt_llm to be absent (a real one is installed here); CI checks it")
    s = nano_setup
    _, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]),
                            env={"PATH": s["env"]["PATH"]})  # no stand-in wheels
    assert checks["runtime"]["status"] == "fail" and "tensorrt_llm is not installed" in checks["runtime"]["detail"]
    assert "--trtllm-wheel" in checks["runtime"]["fix"]


def test_changed_engine_file_and_too_large_kv_budget(nano_setup: dict[str, Any], workdir: Path) -> None:
    s = nano_setup
    config = write(workdir, "big.yaml", yaml.safe_dump(
        {"engine": {"backend": "trtllm", "model": str(s["engine"]), "kv_tokens": 8192}}))
    _, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]), "--config", str(config),
                            env=s["env"])
    assert checks["engine"]["status"] == "fail"
    assert "engine.kv_tokens=8192 is more than the engine was built for (4096)" in checks["engine"]["detail"]
    assert checks["engine"]["fix"].startswith("set engine.kv_tokens: 4096")

    data = bytearray((s["engine"] / "rank0.engine").read_bytes())
    data[100] ^= 0xFF
    (s["engine"] / "rank0.engine").write_bytes(bytes(data))
    _, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]), env=s["env"])
    assert checks["engine"]["status"] == "fail"
    assert "rank0.engine does not match its sha256 in the manifest" in checks["engine"]["detail"]
    assert "edge-llama build" in checks["engine"]["fix"] and "--force" in checks["engine"]["fix"]


def test_not_enough_free_memory_for_the_plan(workdir: Path, nano_setup: dict[str, Any]) -> None:
    s = nano_setup
    orin_nano(s["root"], avail_kb=1_500_000)  # 1.4 GiB free: a desktop session and a browser
    _, checks = doctor_json("--root", str(s["root"]), "--socket", str(s["socket"]), env=s["env"])
    memory = checks["memory"]
    assert memory["status"] == "fail" and "not enough free memory to load it" in memory["detail"]
    assert "stop other services" in memory["fix"]
    assert memory["data"]["resident_bytes"] == plan(PlanOptions(device="orin-nano-8gb"))["resident_bytes"]


def test_missing_config_of_the_installed_service_fails(workdir: Path) -> None:
    root = orin_nano(workdir / "nano")
    _, checks = doctor_json("--root", str(root), "--socket", str(workdir / "none.sock"))
    assert checks["config"]["status"] == "fail"
    assert "reads /etc/edge-llama/config.yaml, which does not exist" in checks["config"]["detail"]


# --- AGX Orin 64GB, JetPack 6.2, a real daemon ----------------------------------------------------------------
def test_agx_orin_device_allow_override_hot_zone_and_live_daemon(daemons: Daemons, workdir: Path) -> None:
    root = agx_orin(workdir / "agx")
    # An operator's override that lost /dev/nvmap and /dev/host1x-fence:
    write(root, "etc/systemd/system/edge-llama.service.d/override.conf", "[Service]\nDeviceAllow=\n" + "".join(
        f"DeviceAllow=/dev/nvgpu/igpu0/{n} rw\n" for n in ("ctrl", "as", "channel", "tsg")))
    stub = write(workdir, "bin/nvpmodel", "#!/bin/sh\necho 'NVPM WARN: fan mode is not set!'\n"
                 "echo 'NV Power Mode: 50W'\necho 3\n")
    stub.chmod(0o755)
    d = daemons.start(fake_config(reply="Hello there."))
    env = {"PATH": f"{stub.parent}{os.pathsep}{os.environ['PATH']}"}
    out = doctor("--root", str(root), "--socket", str(d.socket), "--config", str(d.config_path), env=env)
    table = out.stdout
    assert out.returncode == 1, table
    assert "device profile agx-orin-64gb" in row(table, "platform")
    assert "L4T r36.4.3 = JetPack 6.2" in row(table, "l4t")
    gpu = row(table, "gpu-devices")
    assert gpu.split()[1] == "FAIL" and "/dev/host1x-fence, /dev/nvmap present but not in DeviceAllow=" in gpu
    assert ("fix: sudo systemctl edit edge-llama, add 'DeviceAllow=/dev/host1x-fence rw' 'DeviceAllow=/dev/nvmap rw'"
            in gpu)
    power = row(table, "power")
    assert "50W (id 3, from nvpmodel -q)" in power and "MAXN is `sudo nvpmodel -m 0`" in power
    thermal = row(table, "thermal")
    assert thermal.split()[1] == "WARN" and "hottest tj-thermal 91.0 C" in thermal and "fix: improve cooling" in thermal
    assert row(table, "engine").split()[1] == "skip"  # the fake backend
    assert row(table, "socket").split()[1] == "ok" and row(table, "access").split()[1] == "ok"
    assert "ready: " in row(table, "daemon") and row(table, "daemon").split()[1] == "ok"


def test_agx_orin_llamacpp_without_cuda_offload(workdir: Path) -> None:
    pytest.importorskip("llama_cpp")
    root = agx_orin(workdir / "agx")
    config = write(workdir, "cpu.yaml", yaml.safe_dump({"engine": {"backend": "llamacpp"}}))
    _, checks = doctor_json("--root", str(root), "--socket", str(workdir / "none.sock"), "--config", str(config))
    assert checks["engine"]["status"] == "ok" and "SmolLM2-135M-Instruct" in checks["engine"]["detail"]
    runtime = checks["runtime"]
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():  # pragma: no cover - a CUDA build of llama-cpp-python
        assert runtime["status"] == "ok"
    else:
        assert runtime["status"] == "warn" and "generation runs on the ARM cores" in runtime["detail"]
        assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=87" in runtime["fix"]
    assert checks["python"]["status"] == "ok" and "l4t" in checks  # any Python >= 3.10 serves llama.cpp


# --- not a Jetson -----------------------------------------------------------------------------------------------
def test_not_a_jetson_with_daemon_and_smoke(daemons: Daemons, workdir: Path) -> None:
    root = not_jetson(workdir / "pc")
    the_plan = plan(PlanOptions(device="orin-nano-8gb"))
    plan_file = write(workdir, "plan.json", json.dumps(the_plan))
    d = daemons.start(fake_config(reply="A KV cache keeps attention keys."))
    out = doctor("--root", str(root), "--socket", str(d.socket), "--config", str(d.config_path), "--smoke",
                 "--plan", str(plan_file))
    table = out.stdout
    assert out.returncode == 0, table
    assert "not a Jetson" in row(table, "platform") and row(table, "platform").split()[1] == "skip"
    names = [line.split()[0] for line in table.splitlines()[1:] if line and not line.startswith(" ")]
    assert not {"l4t", "gpu-devices", "power"} & set(names)
    assert "backend fake" in row(table, "daemon") and "KV budget 512 tokens" in row(table, "daemon")
    smoke = row(table, "smoke")
    assert smoke.split()[1] == "ok" and "'A KV cache keeps attention keys.'" in smoke
    assert f"of the plan's ceiling {the_plan['decode_ceiling_tok_s']} tok/s" in smoke
    assert "the plan is for a Jetson's GPU; this machine is not one" in smoke
    assert table.rstrip().endswith(": ready to serve")


def test_slow_generation_on_a_jetson_warns_but_does_not_fail(daemons: Daemons, workdir: Path) -> None:
    root = orin_nano(workdir / "nano")
    plan_file = write(workdir, "plan.json", json.dumps(plan(PlanOptions(device="orin-nano-8gb"))))
    d = daemons.start(fake_config(reply="Slow answer.", token_delay_ms=100))  # ~10 tok/s against a 66 ceiling
    status, checks = doctor_json("--root", str(root), "--socket", str(d.socket), "--config", str(d.config_path),
                                 "--smoke", "--plan", str(plan_file))
    assert status == 0
    smoke = checks["smoke"]
    assert smoke["status"] == "warn" and "below 25%" in smoke["detail"] and "nvpmodel" in smoke["fix"]
    assert smoke["data"]["completion_tokens"] == len("Slow answer.")
    assert [c["name"] for c in checks.values() if c["status"] == "fail"] == []


def test_allowlist_that_excludes_you(daemons: Daemons, workdir: Path) -> None:
    root = not_jetson(workdir / "pc")
    d = daemons.start({**fake_config(), "server": {"allow_users": [54321], "allow_groups": [54321]}}, wait=False)
    deadline = time.monotonic() + 60
    while True:  # ready once it answers, here with `forbidden`
        try:
            with Client(d.socket, timeout=5) as client:
                client.call({"op": "health"})
        except Forbidden:
            break
        except (Unavailable, OSError):
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
    status, checks = doctor_json("--root", str(root), "--socket", str(d.socket), "--config", str(d.config_path))
    assert status == 1
    assert checks["access"]["status"] == "fail" and "does not include you" in checks["access"]["detail"]
    assert "server.allow_users" in checks["access"]["fix"]
    assert checks["daemon"]["status"] == "fail" and "refused" in checks["daemon"]["detail"]


def test_daemon_not_running_without_an_installed_service(workdir: Path) -> None:
    root = not_jetson(workdir / "pc")
    sock = workdir / "gone.sock"
    out = doctor("--root", str(root), "--socket", str(sock))
    assert out.returncode == 1
    assert f"fix: start it: edge-llama serve --socket {sock}" in row(out.stdout, "daemon")


def test_user_mistakes_are_one_line_and_exit_2(workdir: Path) -> None:
    for args, message in ((["--config", str(workdir / "nope.yaml")], "cannot read config file"),
                          (["--plan", str(workdir / "nope.json")], "--plan"),
                          (["--root", str(workdir / "nodir")], "not a directory")):
        out = doctor(*args, "--socket", str(workdir / "x.sock"))
        assert out.returncode == 2, out.stdout
        assert out.stderr.startswith("edge-llama: ") and message in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    bad = write(workdir, "bad.yaml", "engine: {backend: tpu}\n")
    out = doctor("--config", str(bad))
    assert out.returncode == 2 and "'engine.backend' must be one of" in out.stderr


def test_help_has_examples() -> None:
    out = doctor("--help")
    assert out.returncode == 0 and "edge-llama doctor --smoke --plan plan.json" in out.stdout and "--root" in out.stdout


# --- the platform functions the daemon's health op uses ---------------------------------------------------------
def test_power_and_thermal_for_health(workdir: Path) -> None:
    nano = orin_nano(workdir / "nano")
    assert jetson.power_and_thermal(nano) == {"power_mode": "15W",
                                              "hottest_zone": {"name": "tj-thermal", "celsius": 48.9}}
    assert jetson.power_and_thermal(not_jetson(workdir / "pc")) == {"power_mode": None, "hottest_zone": None}
    broken = workdir / "broken"
    write(broken, "var/lib/nvpmodel/status/oops", "")  # a directory where a file belongs
    write(broken, "sys/class/thermal/thermal_zone0/temp", "garbage")
    assert jetson.power_and_thermal(broken) == {"power_mode": None, "hottest_zone": None}


@pytest.mark.parametrize(("l4t", "jetpack", "exact"), [
    ("36.4.0", "6.1", True), ("36.4.3", "6.2", True), ("36.3.0", "6.0", True), ("35.4.1", "5.1.2", True),
    ("38.2.0", "7.0", True), ("36.4.9", "6.1/6.2", False), ("35.9", "5.x", False)])
def test_jetpack_mapping_says_where_it_came_from(l4t: str, jetpack: str, exact: bool) -> None:
    found, source = jetson.jetpack_for(l4t)
    assert found == jetpack
    assert ("not in the table" not in source) == exact


def test_l4t_from_dpkg_alone_and_the_thor_profile(workdir: Path) -> None:
    root = workdir / "thor"
    write(root, "var/lib/dpkg/status", "Package: nvidia-l4t-core\nStatus: install ok installed\n"
          "Version: 38.2.0-20250821174705\n")
    rel = jetson.l4t_release(root)
    assert rel is not None and rel.version is None and rel.best == "38.2.0" and rel.jetpack == "7.0"
    assert jetson.match_profile("NVIDIA Jetson AGX Thor Developer Kit", 130_000_000 * 1024).name == "thor"
    small = jetson.match_profile("NVIDIA Jetson Orin Nano Developer Kit", 3_800_000 * 1024)  # the 4GB module
    assert small.name is None and "no profile" in small.note


def test_unit_missing_a_node_cuda_needs_on_thor(workdir: Path) -> None:
    """Thor (L4T r38) has the OpenRM nodes: the package's unit allows what CUDA opens there; an installed unit
    without /dev/nvidia-uvm is caught."""
    root = workdir / "thor"
    for node in ("nvidia0", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvmap"):
        write(root, f"dev/{node}", "")
    unit = jetson.read_unit(root, "edge-llama.service")  # not installed under root: the checkout's copy
    assert unit is not None and not unit.installed
    access = jetson.gpu_access(root, unit)
    assert access.restricted and access.missing == [] and access.not_allowed == ["/dev/nvidia-uvm-tools"]
    assert "/dev/nvgpu/igpu0/ctrl" in access.absent
    text = (REPO / "systemd" / "edge-llama.service").read_text().replace("DeviceAllow=/dev/nvidia-uvm rw\n", "")
    write(root, "etc/systemd/system/edge-llama.service", text)
    access = jetson.gpu_access(root, jetson.read_unit(root, "edge-llama.service"))
    assert access.missing == ["/dev/nvidia-uvm"]


def test_table_fits_a_terminal() -> None:
    from edge_llama.doctor import Check, render

    checks = [Check("gpu-devices", "fail", "x " * 120, "sudo systemctl edit edge-llama, add " + "y " * 80),
              Check("python", "ok", "Python 3.10.12 (/opt/edge-llama/venv/bin/python)")]
    lines = render(checks, 80).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[1].startswith("gpu-devices  FAIL    x x") and any(" fix: sudo systemctl" in line for line in lines)
    assert lines[-1] == "1 failed, 0 warnings, 1 ok, 0 skipped: not ready to serve"
    assert len(render(checks).splitlines()) == 6  # not a terminal: header, a line per detail and per fix, summary
