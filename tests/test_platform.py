"""The compiled kernels match the machine they run on (any architecture; ci/aarch64.sh runs this
file as aarch64 under emulation too).

dairllm.build_info() is the kernel library's own account (compile-time paths, CPU detection via
getauxval / __builtin_cpu_supports, the selected path). Each claim is checked here against
evidence gathered independently of that code: platform.machine(), the ELF header of the built
extension, the shared libraries mapped into this process, the kernel's auxiliary vector read from
/proc/self/auxv, and NumPy's own CPU dispatch table.
"""
from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import dairllm
from dairllm import _ops

ARCH_OF_MACHINE = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
ELF_MACHINE = {62: "x86_64", 183: "aarch64"}          # e_machine: EM_X86_64, EM_AARCH64
AT_HWCAP = 16
HWCAP_ASIMD, HWCAP_FPHP, HWCAP_ASIMDDP = 1 << 1, 1 << 9, 1 << 20   # linux/arch/arm64 uapi hwcap.h
KEYS = {"arch": str, "openmp": bool, "simd_compiled": list, "simd_supported": list,
        "simd_selected": str, "cpu_features": list, "max_threads": int, "num_threads": int}
MACHINE = ARCH_OF_MACHINE.get(platform.machine().lower(), "other")


def fresh_build_info() -> dict:
    """build_info() of a new interpreter: the path chosen at import, before any test forced one."""
    code = "import dairllm, json; print(json.dumps(dairllm.build_info()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def info() -> dict:
    return fresh_build_info()


def auxv_hwcap() -> "int | None":
    """AT_HWCAP from /proc/self/auxv (pairs of native unsigned longs); None where unreadable."""
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    words = struct.unpack(f"{len(raw) // 8}Q", raw[:len(raw) // 8 * 8])
    return dict(zip(words[0::2], words[1::2])).get(AT_HWCAP)


def numpy_cpu_features() -> dict:
    """NumPy's own CPU detection (cpuid on x86, getauxval on Linux/arm64)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:                                   # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return dict(__cpu_features__)


def elf_machine(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert head[4] == 2, f"{path} is not a 64-bit ELF"
    (machine,) = struct.unpack("<H" if head[5] == 1 else ">H", head[18:20])
    return ELF_MACHINE.get(machine, f"e_machine {machine}")


# ------------------------------------------------------------------------------- any platform

def test_build_info_keys_and_types(info):
    for key, typ in KEYS.items():
        assert isinstance(info.get(key), typ), (key, info.get(key))
    assert info["simd_compiled"][0] == "scalar"
    assert set(info["simd_supported"]) <= set(info["simd_compiled"])
    assert "scalar" in info["simd_supported"]
    assert info["simd_selected"] in info["simd_supported"]
    assert info["max_threads"] >= 1 and info["num_threads"] >= 1


def test_in_process_build_info_agrees_with_fresh_interpreter(info):
    here = dairllm.build_info()
    for key in ("arch", "openmp", "simd_compiled", "simd_supported", "cpu_features"):
        assert here[key] == info[key], key


def test_arch_matches_platform_and_extension_elf(info):
    assert info["arch"] == MACHINE, (info["arch"], platform.machine())
    if MACHINE != "other":
        for mod in (_ops, __import__("dairllm._net", fromlist=["_net"])):
            assert elf_machine(mod.__file__) == MACHINE, mod.__file__


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_openmp_runtime_loaded_iff_built_with_openmp(info):
    """An OpenMP build links the runtime, so importing _ops maps libgomp (or libomp) here."""
    maps = Path("/proc/self/maps").read_text()
    loaded = any(name in maps for name in ("libgomp", "libomp", "libiomp"))
    if info["openmp"]:
        assert loaded, "build_info says openmp but no OpenMP runtime is mapped"
    # (without OpenMP, NumPy's BLAS may still map its own runtime: nothing to assert)


def test_selected_is_the_best_supported_path(info):
    """dl_init picks the highest-numbered supported path: avx512vnni > avx2 > scalar,
    neon-dotprod > neon."""
    order = ["scalar", "avx2", "neon", "neon-dotprod", "avx512vnni"]
    best = max(info["simd_supported"], key=order.index)
    assert info["simd_selected"] == best


def test_version_reports_selected_path(info):
    out = subprocess.run([sys.executable, "-m", "dairllm", "--version"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    flat = " ".join(out.split())
    assert f"arch={info['arch']}" in flat and f"simd_selected={info['simd_selected']}" in flat, out


def test_forcing_each_path():
    before = _ops.get_simd_path()
    try:
        for name in _ops.build_info()["simd_supported"]:
            _ops.set_simd_path(name)
            assert _ops.get_simd_path() == name
            assert dairllm.build_info()["simd_selected"] == name
        compiled = set(_ops.build_info()["simd_compiled"])
        for name in ("scalar", "avx2", "neon", "neon-dotprod", "avx512vnni"):
            if name not in _ops.build_info()["simd_supported"]:
                with pytest.raises(ValueError, match="not available" if name in compiled else "."):
                    _ops.set_simd_path(name)
                assert _ops.get_simd_path() != name
    finally:
        _ops.set_simd_path(before)


# ------------------------------------------------------------------------------- x86_64

@pytest.mark.skipif(MACHINE != "x86_64", reason="x86_64 only")
def test_x86_avx2_selected_when_the_cpu_has_it(info):
    """avx2 wherever the CPU has AVX2 and FMA; avx512vnni (selected over it) wherever it also has
    AVX512F, VL, BW and VNNI."""
    assert {"avx2", "avx512vnni"} <= set(info["simd_compiled"]) and "neon" not in info["simd_compiled"]
    npf = numpy_cpu_features()
    has = bool(npf.get("AVX2")) and bool(npf.get("FMA3"))
    vnni = has and all(npf.get(f) for f in ("AVX512F", "AVX512VL", "AVX512BW", "AVX512VNNI"))
    assert ("avx2" in info["simd_supported"]) == has, (npf, info)
    assert ("avx512vnni" in info["simd_supported"]) == vnni, (npf, info)
    assert info["simd_selected"] == ("avx512vnni" if vnni else "avx2" if has else "scalar")
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and not os.environ.get("QEMU_CPU"):   # qemu-user shows the host's file
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if flags:
        assert ("avx2" in flags and "fma" in flags) == has, "NumPy and /proc/cpuinfo disagree"
        assert ({"avx512f", "avx512vl", "avx512bw", "avx512_vnni"} <= flags and has) == vnni, \
            "NumPy and /proc/cpuinfo disagree on AVX512 VNNI"


# ------------------------------------------------------------------------------- aarch64

@pytest.mark.skipif(MACHINE != "aarch64", reason="aarch64 only")
def test_aarch64_neon_compiled_and_selected_per_hwcap(info):
    assert {"scalar", "neon", "neon-dotprod"} <= set(info["simd_compiled"])
    assert "avx2" not in info["simd_compiled"]
    hwcap = auxv_hwcap()
    assert hwcap is not None, "/proc/self/auxv unreadable"
    assert hwcap & HWCAP_ASIMD, "AdvSIMD is part of every aarch64 Linux system"
    dotprod = bool(hwcap & HWCAP_ASIMDDP)
    npf = numpy_cpu_features()
    if "ASIMDDP" in npf:
        assert bool(npf["ASIMDDP"]) == dotprod, "NumPy and the auxiliary vector disagree"
    # the fallback: a CPU without SDOT (Pi 4's Cortex-A72) runs the plain NEON path
    assert ("neon-dotprod" in info["simd_supported"]) == dotprod
    assert info["simd_selected"] == ("neon-dotprod" if dotprod else "neon")
    assert ("asimddp" in info["cpu_features"]) == dotprod
    assert ("fphp" in info["cpu_features"]) == bool(hwcap & HWCAP_FPHP)
