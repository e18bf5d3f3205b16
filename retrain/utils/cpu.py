"""What the CPU can do, read from Linux's /proc/cpuinfo: whether it has int8 dot products.

`int8_dot_product` is a pure function of the cpuinfo text (testable with any text); `read_cpuinfo`
is the thin reader, "" where there is no such file (not Linux) or it cannot be read.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CPUINFO", "INT8_DOT_PRODUCT_FLAGS", "int8_dot_product", "read_cpuinfo"]

CPUINFO = Path("/proc/cpuinfo")
# x86 flags of instructions that multiply and add int8 values in one step (VPDPBUSD): where
# int8 TFLite kernels beat float ones by about 2x. AVX2 alone has no such instruction.
INT8_DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni")


def int8_dot_product(cpuinfo: str) -> str | None:
    """The first of INT8_DOT_PRODUCT_FLAGS that every processor listed in `cpuinfo` (the text
    of /proc/cpuinfo) has on its "flags" line, upper-cased ("AVX512_VNNI"); None when one of
    them lacks it, or when the text has no "flags" line (another architecture, or no text)."""
    processors = [
        set(line.partition(":")[2].split())
        for line in cpuinfo.splitlines()
        if line.partition(":")[0].strip() == "flags"
    ]
    if not processors:
        return None
    common = set.intersection(*processors)
    return next((flag.upper() for flag in INT8_DOT_PRODUCT_FLAGS if flag in common), None)


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """The text of `path` (/proc/cpuinfo); "" when it is missing or unreadable."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
