"""Known peak FLOP/s per device and precision, for "% of hardware peak" in the benchmark. No torch.

GPU numbers are the vendors' *dense* datasheet peaks (no 2:4 sparsity), in FLOP/s. They are upper
bounds nobody reaches: on an H100 SXM a large bf16 matmul (8192^3) measures about 790 TFLOP/s,
80% of the 989 TFLOP/s spec. We divide by the spec (the `source` says so) so numbers are comparable
across machines; the report says so. "fp32" on a GPU means the non-tensor-core FP32 peak (PyTorch
does not use TF32 for matmuls unless asked to).

The CPU peak is computed from the benchmark's CPU record (`device.cpu_info()`: /proc/cpuinfo's cores,
MHz and flags), assuming two FMA units per core (true for the Intel server cores and AMD Zen 5 parts
with AVX-512 we meet; Zen 4 runs 512-bit FMAs at half rate, so this is an upper bound there):

    fp32 peak = cores x GHz x 2 FMA units x lanes (16 with AVX-512, 8 with AVX2) x 2 flop/FMA
    bf16 peak = AMX: 1024 flop/cycle/core; AVX512_BF16 (VDPBF16PS): 2 x fp32; else None
    int8 peak = AMX: 2048 op/cycle/core; AVX512_VNNI: 4 x fp32; else None
    fp16 peak = AVX512_FP16: 2 x fp32; else None

Unknown device or precision -> None (the report shows "n/a", never a guess). Pure: no I/O.
"""

from __future__ import annotations

from typing import Optional

T = 1e12

# H100 and H200 are the same GH100 compute die (H200 has more and faster memory): the same dense peaks
# per form factor, SXM and NVL.
_GH100_SXM = {"fp32": 67 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T, "fp8": 1978.9 * T,
              "int8": 1978.9 * T}
_GH100_NVL = {"fp32": 60 * T, "tf32": 417.5 * T, "bf16": 835 * T, "fp16": 835 * T, "fp8": 1670.5 * T,
              "int8": 1670.5 * T}

# (name substrings, any of which identifies the part; lower-case) -> precision -> dense FLOP/s.
# Order matters: more specific names first ("h100 pcie" before "h100").
GPU_PEAKS: list[tuple[tuple[str, ...], str, dict[str, float]]] = [
    (("h200 nvl",), "NVIDIA H200 NVL", _GH100_NVL),
    (("h200",), "NVIDIA H200 (SXM)", _GH100_SXM),
    (("h100 pcie",), "NVIDIA H100 PCIe",
     {"fp32": 51.2 * T, "tf32": 378 * T, "bf16": 756 * T, "fp16": 756 * T, "fp8": 1513 * T, "int8": 1513 * T}),
    (("h100 nvl",), "NVIDIA H100 NVL", _GH100_NVL),
    (("h100",), "NVIDIA H100 SXM", _GH100_SXM),
    (("a100",), "NVIDIA A100",
     {"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T, "int8": 624 * T}),
    (("l4",), "NVIDIA L4",
     {"fp32": 30.3 * T, "tf32": 60 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T, "int8": 242.5 * T}),
]

# Achievable rather than spec, measured on the lender's H100/H200 (8192^3 bf16 matmul). Reported
# next to the spec number so readers can judge; % of peak is always against the spec.
MEASURED_BF16 = {"NVIDIA H100 SXM": 790 * T, "NVIDIA H200 (SXM)": 790 * T}


def gpu_peak(name: str, precision: str) -> Optional[dict]:
    """{"peak_flops", "part", "source", "measured_flops"} for a CUDA device name, or None if unknown."""
    low = name.lower()
    for keys, part, peaks in GPU_PEAKS:
        if any(k in low for k in keys):
            if precision not in peaks:
                return None
            measured = MEASURED_BF16.get(part) if precision == "bf16" else None
            source = "dense datasheet peak"
            if measured:
                source += f"; ~{measured / T:.0f} TFLOP/s measured on an 8192^3 matmul"
            return {"peak_flops": peaks[precision], "part": part, "source": source, "measured_flops": measured}
    return None


# --------------------------------------------------------------------------- CPU


def cpu_peak(info: dict, precision: str, threads: Optional[int] = None) -> Optional[dict]:
    """Peak FLOP/s of the cores the benchmark used (min(threads, physical cores)), or None."""
    flags = set(info.get("flags") or [])
    cores, mhz = info.get("cores"), info.get("mhz")
    if not cores or not mhz or "fma" not in flags:
        return None
    used = min(threads, cores) if threads else cores
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else None
    if lanes is None:
        return None
    per_cycle_fp32 = 2 * lanes * 2  # 2 FMA units x lanes x 2 flop
    per_cycle = {
        "fp32": per_cycle_fp32,
        "bf16": 1024 if "amx_bf16" in flags else 2 * per_cycle_fp32 if "avx512_bf16" in flags else None,
        "fp16": 2 * per_cycle_fp32 if "avx512_fp16" in flags else None,
        "int8": 2048 if "amx_int8" in flags else 4 * per_cycle_fp32 if "avx512_vnni" in flags else None,
    }.get(precision)
    if per_cycle is None:
        return None
    isa = ("AMX" if per_cycle >= 1024 else {"bf16": "AVX512_BF16", "fp16": "AVX512_FP16",
                                            "int8": "AVX512_VNNI"}.get(precision)
           or ("AVX-512" if lanes == 16 else "AVX2"))
    return {"peak_flops": used * mhz * 1e6 * per_cycle, "part": info.get("name") or "cpu",
            "source": f"{used} cores x {mhz / 1000:.2f} GHz x {per_cycle} flop/cycle/core, {isa}",
            "measured_flops": None}


def peak(device: dict, precision: str, threads: Optional[int] = None) -> Optional[dict]:
    """Peak for a device description ({"kind": "cpu", flags...} or {"kind": "cuda", "name"}) and a
    compute precision ("fp32", "bf16", "fp16", "fp8", "int8")."""
    if device.get("kind") == "cuda":
        return gpu_peak(device.get("name") or "", precision)
    if device.get("kind") == "cpu":
        return cpu_peak(device, precision, threads)
    return None

