"""The instruction-set flags of this machine's CPU, read once from ``/proc/cpuinfo``.

Kernels choose their path by them (oneDNN's uint8 x int8 products want VNNI) and measurements quote them
beside their numbers.

Example:
    >>> "avx512_vnni" in (cpu_flags() or ())
"""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The flags of the first CPU (``flags`` on x86, ``Features`` on ARM); None where unreadable (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None
