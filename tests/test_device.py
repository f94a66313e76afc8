"""The device module's parsers on plain text, and the two CPU records it derives from one parse: the
fingerprint's (frozen: it enters every hardware-bound key) and the benchmark's."""

from __future__ import annotations

import pytest

from optforge import device

FLAGS = "fpu sse avx512f fma avx2 avx512_vnni amx_tile avx512_bf16 avx512bw amx_bf16"


def _processor(n: int, mhz: str, core: int) -> str:
    return (f"processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\ncpu MHz\t\t: {mhz}\n"
            f"physical id\t: 0\ncore id\t\t: {core}\nflags\t\t: {FLAGS}\n")


# three logical CPUs on two physical cores (1 and 2 are hyperthreads of core 1)
CPUINFO = "\n".join([_processor(0, "2000.000", 0), _processor(1, "2500.000", 1), _processor(2, "2500.000", 1)])

# an ARM /proc/cpuinfo: no "model name", no "flags" (it says "Features")
CPUINFO_ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32

processor\t: 1
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32
"""

DRIVER = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
          "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
OPEN_DRIVER = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  "
               "(dvs-builder@U16-I3-B03-4-3)  Thu Jan 23 22:50:35 UTC 2025\n"
               "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")


def test_parse_cpuinfo():
    info = device.parse_cpuinfo(CPUINFO)
    assert info["name"] == "Test CPU" and info["mhz"] == 2500.0
    assert info["cores"] == 2 and info["logical_cpus"] == 3  # physical (id, core) pairs vs processors
    assert info["flags"][:3] == ["fpu", "sse", "avx512f"]  # all of them, in file order
    assert device.parse_cpuinfo(CPUINFO_ARM) == {"name": None, "cores": 2, "logical_cpus": 2, "mhz": None,
                                                 "flags": []}


@pytest.fixture
def cpuinfo_file(tmp_path, monkeypatch):
    def use(text: str):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(device, "CPUINFO", str(path))
    return use


def test_benchmark_record_keeps_the_peak_flags_in_their_order(cpuinfo_file, monkeypatch):
    cpuinfo_file(CPUINFO)
    assert device.cpu_info() == {"name": "Test CPU", "cores": 2, "logical_cpus": 3, "mhz": 2500.0,
                                 "flags": ["fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                           "amx_tile"],
                                 "kind": "cpu"}
    assert list(device.cpu_info()) == ["name", "cores", "logical_cpus", "mhz", "flags", "kind"]
    monkeypatch.setattr(device, "CPUINFO", "/nonexistent/cpuinfo")
    assert device.cpu_info()["flags"] == [] and device.cpu_info()["name"] is None


def test_fingerprint_record_is_frozen(cpuinfo_file, monkeypatch):
    """The exact shape and values the key material has always had: changing them re-keys every
    hardware-bound stage of every user."""
    monkeypatch.setattr(device.os, "cpu_count", lambda: 3)
    cpuinfo_file(CPUINFO)
    assert device.probe_cpu() == {"kind": "cpu", "name": "Test CPU", "cores": 3,
                                  "isa": ["amx_bf16", "amx_tile", "avx2", "avx512_bf16", "avx512_vnni",
                                          "avx512bw", "avx512f", "fma"]}
    assert list(device.probe_cpu()) == ["kind", "name", "isa", "cores"]
    cpuinfo_file(CPUINFO_ARM)
    assert device.probe_cpu() == {"kind": "cpu", "name": "unknown cpu", "isa": [], "cores": 3}


def test_parse_nvidia_driver():
    assert device.parse_nvidia_driver(DRIVER) == "550.54.15"
    assert device.parse_nvidia_driver(OPEN_DRIVER) == "570.86.15"
    assert device.parse_nvidia_driver("NVRM version: unknown") is None


def test_cuda_fingerprint_without_nvidia_smi_reads_the_driver_file(tmp_path, monkeypatch, cpuinfo_file):
    cpuinfo_file(CPUINFO)
    (tmp_path / "version").write_text(DRIVER)
    monkeypatch.setattr(device, "NVIDIA_VERSION", str(tmp_path / "version"))
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    assert device.probe_cuda() == {"kind": "cuda", "name": "unknown NVIDIA GPU", "driver": "550.54.15",
                                   "host_cpu": "Test CPU"}
    assert list(device.probe_cuda()) == ["kind", "name", "driver", "host_cpu"]


def test_device_fingerprint_is_probed_once_per_boot(tmp_path, monkeypatch):
    probes = []
    monkeypatch.setattr(device, "probe_cpu", lambda: probes.append(1) or {"kind": "cpu", "name": "X"})
    assert device.device_fingerprint("cpu", tmp_path) == {"kind": "cpu", "name": "X"}
    assert device.device_fingerprint("cpu", tmp_path) == {"kind": "cpu", "name": "X"}
    assert len(probes) == 1 and (tmp_path / "device.json").is_file()


def test_fingerprint_summary():
    assert device.fingerprint_summary(None) == "none"
    assert device.fingerprint_summary({"kind": "cpu", "name": "Xeon", "isa": [], "cores": 2}) == "cpu: Xeon, 2 cores"
    assert (device.fingerprint_summary({"kind": "cuda", "name": "NVIDIA H200", "driver": "570.86.15"})
            == "cuda: NVIDIA H200, driver 570.86.15")


def test_resolve_device(monkeypatch):
    from optforge.errors import OptforgeError

    monkeypatch.setattr(device, "nvidia_gpu_present", lambda: False)
    assert device.resolve_device("cpu") == "cpu" and device.resolve_device("auto") == "cpu"
    with pytest.raises(OptforgeError, match="no NVIDIA GPU found"):
        device.resolve_device("cuda")
    with pytest.raises(OptforgeError, match="unknown device 'tpu'"):
        device.resolve_device("tpu")
    monkeypatch.setattr(device, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(device, "_torch_cuda_build", lambda: True)
    assert device.resolve_device("auto") == "cuda" and device.resolve_device("cuda") == "cuda"
