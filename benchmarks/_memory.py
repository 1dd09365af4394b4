"""Process memory as the benchmarks measure it (Linux; torch tensors are invisible to tracemalloc)."""
from __future__ import annotations

import ctypes
import resource
from pathlib import Path

MIB = 2**20


def status_mib(key: str) -> float:
    """A memory field of ``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` peak) in MiB; nan if absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


def rss_mib() -> float:
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    """The RSS high-water mark since the process started or since :func:`reset_peak`."""
    return status_mib("VmHWM")


def lifetime_peak_rss_mib() -> float:
    """``ru_maxrss``: the peak of the whole process, never reset."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Give heap memory freed earlier back to the OS, so RSS counts live memory only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
