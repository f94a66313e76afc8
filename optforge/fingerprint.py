"""What goes into a stage key besides its parameters: canonical JSON, file hashes, library versions,
the device. No torch import anywhere here: versions come from package metadata and the device from
/proc and `nvidia-smi`, so `plan` and a no-op `build` stay fast.

Device rule for `--device auto` (documented in the CLI help too): cuda when an NVIDIA driver is
present (`/proc/driver/nvidia/gpus/*` or `/dev/nvidia0`), CUDA_VISIBLE_DEVICES does not hide every
GPU, and the installed torch is a CUDA build (read from torch/version.py's text, not by importing
torch); otherwise cpu. `run.py` confirms with `torch.cuda.is_available()` once a stage actually runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

LIBRARIES = ("torch", "transformers", "torchao")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj, indent: int | None = None) -> None:
    """Temp file + rename: a reader (or a SIGKILL) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True, indent=indent)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class FileHashes:
    """sha256 of files, memoised by (absolute path, size, mtime_ns) in `<cache>/fingerprints.json`.

    Used for data files (every plan) and for re-checking artifact files whose mtime moved. The memo is
    only a speed-up: losing it (or a concurrent writer winning the rename) costs a re-hash, nothing else.
    """

    def __init__(self, memo_path: Path | None):
        self.memo_path = memo_path
        self.memo: dict = (read_json(memo_path, {}) if memo_path else {}) or {}
        self.dirty = False

    def sha256(self, path: Path | str) -> str:
        p = Path(path).absolute()
        st = p.stat()
        hit = self.memo.get(str(p))
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = file_sha256(p)
        self.memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.dirty and self.memo_path is not None:
            # drop entries of files that are gone, so the memo does not grow forever
            self.memo = {k: v for k, v in self.memo.items() if os.path.exists(k)}
            write_json_atomic(self.memo_path, self.memo)
            self.dirty = False


_VERSIONS: dict[str, str | None] | None = None


def library_versions() -> dict[str, str | None]:
    """Installed versions from package metadata (importing torch would cost seconds)."""
    global _VERSIONS
    if _VERSIONS is None:
        from importlib import metadata

        _VERSIONS = {}
        for lib in LIBRARIES:
            try:
                _VERSIONS[lib] = metadata.version(lib)
            except metadata.PackageNotFoundError:
                _VERSIONS[lib] = None
    return dict(_VERSIONS)


# --------------------------------------------------------------------------- device


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


_ISA_FLAG = re.compile(r"^(avx512.*|amx.*|avx2|fma)$")


def probe_cpu() -> dict:
    name, flags = "unknown cpu", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and name == "unknown cpu":
                    name = value.strip()
                elif key == "flags":
                    flags = sorted(fl for fl in value.split() if _ISA_FLAG.match(fl))
                    break
    except OSError:
        import platform

        name = platform.processor() or platform.machine()
    return {"kind": "cpu", "name": name, "isa": flags, "cores": os.cpu_count() or 1}


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
        try:
            m = re.search(r"Kernel Module\s+([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
            driver = m.group(1) if m else None
        except OSError:
            pass
    # end-to-end timings tokenize on the host CPU, so it belongs to the fingerprint too
    return {"kind": "cuda", "name": name, "driver": driver, "host_cpu": probe_cpu()["name"]}


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


def describe_device(fp: dict | None) -> str:
    if not fp:
        return "none"
    extra = f", {fp['cores']} cores" if fp.get("cores") else ""
    extra += f", driver {fp['driver']}" if fp.get("driver") else ""
    return f"{fp.get('kind', '?')}: {fp.get('name', '?')}{extra}"
