"""The CPU an engine's native code is built for, and whether this CPU can run it.

Compiled CPU code (AOTInductor's .so; later TVM's llvm libraries) uses the instruction-set
extensions its `-march` allows; run on a CPU without one of them it dies with SIGILL. So an
engine records the extensions its code may use, by their /proc/cpuinfo names, and loading
refuses it, before any native code is loaded, on a CPU that lacks one.

`--cpu` picks the build: `native` (this CPU's extensions: fastest, least portable), or one
of the x86-64 micro-architecture levels, which any CPU of that level or newer runs:
`x86-64-v3` (AVX2, FMA, BMI2: Haswell / Zen 1 and later), `x86-64-v4` (adds AVX-512 F, BW,
CD, DQ, VL: Skylake-X / Zen 4 and later).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from functools import cache

from arc.errors import ArcError

CPU_CHOICES = ("native", "x86-64-v3", "x86-64-v4")

# x86-64 psABI micro-architecture levels, in /proc/cpuinfo names (pni is SSE3, abm is LZCNT).
_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_V3 = _V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
LEVELS: dict[str, frozenset[str]] = {"x86-64-v3": frozenset(_V3), "x86-64-v4": frozenset(_V4)}

# Extensions a compiler may emit code for under -march=native (SIMD, FMA, bit manipulation,
# crypto); a native build records the ones this CPU has. Names as in /proc/cpuinfo.
ISA_FLAGS = frozenset(
    _V4
    | {
        "sse4a", "fma4", "xop", "adx", "aes", "pclmulqdq", "sha_ni", "gfni", "vaes",
        "vpclmulqdq", "rdrand", "rdseed", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
        "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16",
        "avx512_vp2intersect", "avx_vnni", "avx_vnni_int8", "avx_ifma", "avx_ne_convert",
        "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "amx_complex",
    }
)  # fmt: skip

# gcc -m options whose cpuinfo name is not the option with '-' -> '_'
_GCC_TO_CPUINFO = {
    "avx512bf16": "avx512_bf16",
    "avx512vnni": "avx512_vnni",
    "avx512fp16": "avx512_fp16",
    "avx512vbmi2": "avx512_vbmi2",
    "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vp2intersect": "avx512_vp2intersect",
    "avxvnni": "avx_vnni",
    "sha": "sha_ni",
    "lzcnt": "abm",
    "sse3": "pni",
    "sse4.1": "sse4_1",
    "sse4.2": "sse4_2",
}


def max_threads() -> int:
    """The most CPU threads arc runs with: 4x the CPUs this process may use. More only slow a
    decode (each step waits for every thread), and far more crash the thread pools (TVM's
    aborted at 20,000 here, torch's OpenMP segfaulted at 100,000), so a flag above it is
    refused."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    return 4 * max(usable, 1)


def check_threads(n: int | None, flag: str = "--threads") -> None:
    """ArcError (one line) unless `n` (None: the default) is 1..max_threads()."""
    if n is None:
        return
    if n < 1:
        raise ArcError(f"{flag} must be at least 1")
    cap = max_threads()
    if n > cap:
        raise ArcError(
            f"{flag} {n} is more than arc runs here (1..{cap}: 4x the {cap // 4} CPUs this "
            "process may use)"
        )


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@cache
def host_flags() -> frozenset[str]:
    """This CPU's extensions, from the `flags` line of /proc/cpuinfo (empty where there is
    none: not Linux, or not x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@cache
def host_name() -> str:
    """This CPU's model name (for messages), or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def build_target(cpu: str) -> tuple[str, frozenset[str]]:
    """(`-march` value, extensions code built with it may use) for `--cpu cpu`."""
    if cpu == "native":
        return "native", host_flags() & ISA_FLAGS
    if cpu in LEVELS:
        if not is_x86():
            raise ArcError(f"--cpu {cpu} is an x86-64 level; this machine is {platform.machine()}")
        return cpu, LEVELS[cpu]
    raise ArcError(f"--cpu {cpu!r}; choose from {', '.join(CPU_CHOICES)}")


def gcc_flags_to_cpuinfo(options: str) -> frozenset[str]:
    """Extensions that gcc options such as `-mavx512f -mavx512bf16 -mamx-tile` enable, by their
    cpuinfo names (avx512f, avx512_bf16, amx_tile); other options are ignored."""
    out = set()
    for opt in options.split():
        if opt.startswith("-m") and not opt.startswith(("-march", "-mtune", "-mno-")):
            name = opt[2:]
            out.add(_GCC_TO_CPUINFO.get(name, name.replace("-", "_")))
    return frozenset(out)


def missing_flags(needed: Iterable[str], have: frozenset[str] | None = None) -> list[str]:
    """The extensions in `needed` that this CPU (or `have`) lacks, sorted."""
    have = host_flags() if have is None else have
    return sorted(set(needed) - have)
