"""The device a build runs on: which one (`resolve_device`), what it is (`device_fingerprint`, probed
from /proc and `nvidia-smi`) and the one parser of each source (`parse_cpuinfo`, `parse_nvidia_driver`).
No torch import anywhere here, so `plan` and a no-op `build` stay fast.

Device rule for `--device auto` (documented in the CLI help too): cuda when an NVIDIA driver is
present (`/proc/driver/nvidia/gpus/*` or `/dev/nvidia0`), CUDA_VISIBLE_DEVICES does not hide every
GPU, and the installed torch is a CUDA build (read from torch/version.py's text, not by importing
torch); otherwise cpu. `run.py` confirms with `torch.cuda.is_available()` once a stage actually runs.

Two descriptions of a CPU come out of the one /proc/cpuinfo parse, for two readers:
  - `probe_cpu()` -> the device fingerprint (stage keys): name, `isa` (every AVX2/AVX-512/AMX/FMA flag,
    sorted) and `cores` (logical CPUs). Its shape is frozen: changing it changes every hardware-bound key.
  - `cpu_info()` -> the benchmark's `device` record: name, physical cores, MHz and `flags` (only the
    flags `hardware.cpu_peak` reads, in `PEAK_FLAGS` order).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from optforge.fingerprint import read_json, write_json_atomic

CPUINFO = "/proc/cpuinfo"
NVIDIA_VERSION = "/proc/driver/nvidia/version"

# --------------------------------------------------------------------------- which device


def _torch_cuda_build() -> bool:
    """Whether the installed torch was built with CUDA, read from torch/version.py without importing it."""
    from importlib.util import find_spec

    try:
        spec = find_spec("torch")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    except OSError:
        return False
    m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*(.+)$", text, re.M)
    return bool(m) and m.group(1).strip() not in ("None", "''", '""')


def nvidia_gpu_present() -> bool:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def resolve_device(requested: str) -> str:
    """"auto" -> "cuda" | "cpu" by the cheap rule in this module's docstring."""
    from optforge.errors import OptforgeError

    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not nvidia_gpu_present():
            raise OptforgeError("--device cuda: no NVIDIA GPU found (no /proc/driver/nvidia/gpus, "
                                "or CUDA_VISIBLE_DEVICES hides them); use --device cpu")
        return "cuda"
    if requested != "auto":
        raise OptforgeError(f"unknown device {requested!r}; use auto, cpu or cuda")
    return "cuda" if nvidia_gpu_present() and _torch_cuda_build() else "cpu"


# --------------------------------------------------------------------------- CPU


def parse_cpuinfo(text: str) -> dict:
    """/proc/cpuinfo text -> {"name", "cores" (physical), "logical_cpus", "mhz" (the highest), "flags"
    (all of the first CPU's, in file order)}; a field the text lacks is None ("flags": [])."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    name, mhz, flags = None, 0.0, []
    cores: set[tuple[str, str]] = set()
    for b in blocks:
        fields = {}
        for line in b.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip()] = v.strip()
        name = name or fields.get("model name")
        try:
            mhz = max(mhz, float(fields.get("cpu MHz", 0) or 0))
        except ValueError:
            pass
        if "flags" in fields and not flags:
            flags = fields["flags"].split()
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    logical = sum(1 for b in blocks if "processor" in b)
    return {"name": name, "cores": len(cores) or logical or None, "logical_cpus": logical or None,
            "mhz": mhz or None, "flags": flags}


def _read_cpuinfo() -> Optional[dict]:
    try:
        return parse_cpuinfo(Path(CPUINFO).read_text())
    except OSError:
        return None


# The flags that decide a CPU's peak FLOP/s (hardware.cpu_peak), in the order the benchmark records them.
PEAK_FLAGS = ("fma", "avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_int8",
              "amx_tile")


def cpu_info() -> dict:
    """This CPU as the benchmark records it: {"name", "cores", "logical_cpus", "mhz", "flags", "kind"}."""
    info = _read_cpuinfo()
    if info is None:
        return {"name": None, "cores": os.cpu_count(), "logical_cpus": os.cpu_count(), "mhz": None,
                "flags": [], "kind": "cpu"}
    present = set(info["flags"])
    info["flags"] = [f for f in PEAK_FLAGS if f in present]
    info["kind"] = "cpu"
    return info


# The ISA flags that enter the device fingerprint (any of them changes what a compiled kernel may use).
_ISA_FLAG = re.compile(r"^(avx512.*|amx.*|avx2|fma)$")


def probe_cpu() -> dict:
    """This CPU as the device fingerprint records it: {"kind", "name", "isa", "cores"}."""
    info = _read_cpuinfo()
    if info is None:
        import platform

        name, isa = platform.processor() or platform.machine(), []
    else:
        name = info["name"] or "unknown cpu"
        isa = sorted(f for f in info["flags"] if _ISA_FLAG.match(f))
    return {"kind": "cpu", "name": name, "isa": isa, "cores": os.cpu_count() or 1}


# --------------------------------------------------------------------------- training precision

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def default_train_precision(device: str, isa: Optional[list[str]] = None) -> str:
    """What a training stage (teacher fine-tune, distill, prune recovery) autocasts to when the recipe
    leaves `precision` unset: "bf16" on a CUDA GPU and on a CPU with native bf16 math (AVX512_BF16 or
    AMX: measured 1.5-1.9x faster training steps on a 2-core AMX Xeon, same dev accuracy; README "Training
    precision"), else "fp32" (bf16 emulated on AVX2 is slower than fp32). `isa`: the CPU's flags
    (default: this machine's, `probe_cpu`). The result enters the training stages' keys."""
    if device == "cuda":
        return "bf16"
    flags = probe_cpu()["isa"] if isa is None else isa
    return "bf16" if any(f in flags for f in BF16_CPU_FLAGS) else "fp32"


# --------------------------------------------------------------------------- NVIDIA GPU


def parse_nvidia_driver(text: str) -> Optional[str]:
    """The driver version in /proc/driver/nvidia/version's text ("NVRM version: NVIDIA UNIX [Open] Kernel
    Module [for x86_64]  550.54.15  ..."): its first dotted all-digit word."""
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None


def nvidia_driver() -> Optional[str]:
    """The loaded NVIDIA kernel driver's version, or None without one."""
    try:
        return parse_nvidia_driver(Path(NVIDIA_VERSION).read_text())
    except OSError:
        return None


def probe_cuda() -> dict:
    name, driver = "unknown NVIDIA GPU", None
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout
            first = out.strip().splitlines()[0] if out.strip() else ""
            if "," in first:
                name, driver = (s.strip() for s in first.split(",", 1))
        except (OSError, subprocess.SubprocessError):
            pass
    if driver is None:
        driver = nvidia_driver()
    # end-to-end timings tokenize on the host CPU, so it belongs to the fingerprint too
    return {"kind": "cuda", "name": name, "driver": driver, "host_cpu": probe_cpu()["name"]}


# --------------------------------------------------------------------------- the fingerprint


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "no-boot-id"


def device_fingerprint(device: str, cache_dir: Path | None) -> dict:
    """The device a hardware-bound stage ran on. Probed once per boot (nvidia-smi takes ~0.1-1 s) and
    kept in `<cache>/device.json` keyed by the kernel's boot id and CUDA_VISIBLE_DEVICES."""
    tag = f"{_boot_id()}|{device}|{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    memo_path = cache_dir / "device.json" if cache_dir else None
    memo = (read_json(memo_path, {}) if memo_path else {}) or {}
    if tag in memo:
        return memo[tag]
    fp = probe_cuda() if device == "cuda" else probe_cpu()
    if memo_path is not None:
        # only this boot's probes are worth keeping
        memo = {k: v for k, v in memo.items() if k.split("|")[0] == _boot_id()}
        memo[tag] = fp
        try:
            write_json_atomic(memo_path, memo)
        except OSError:
            pass
    return fp


def fingerprint_summary(fp: dict | None) -> str:
    """One line for a device fingerprint, as `plan` names a device change: "cpu: Xeon, 2 cores"."""
    if not fp:
        return "none"
    extra = f", {fp['cores']} cores" if fp.get("cores") else ""
    extra += f", driver {fp['driver']}" if fp.get("driver") else ""
    return f"{fp.get('kind', '?')}: {fp.get('name', '?')}{extra}"
