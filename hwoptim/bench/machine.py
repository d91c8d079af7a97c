"""The machine a report was measured on: CPU, memory, library versions, threads."""
from __future__ import annotations

import os
import platform
import re

import numpy as np

import hwoptim


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set:
    """The CPU's feature flags (Linux), else an empty set."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpus_usable() -> int:
    """CPUs this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def mem_available() -> int | None:
    """Bytes of memory available to a new allocation (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mem_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def package_version(dist: str):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def _serial_below() -> str:
    """Where the Numba backend switches from its one-thread kernel to the parallel one."""
    try:
        from hwoptim.backends import numba as nb
        if getattr(nb, "SERIAL_BELOW", None):
            return f"{nb.SERIAL_BELOW} elements (HWOPTIM_SERIAL_BELOW)"
        work = nb.serial_work() if hasattr(nb, "serial_work") else getattr(nb, "SERIAL_WORK",
                                                                             None)
        return (f"SERIAL_WORK/work(rule) elements, SERIAL_WORK="
                + (f"{work:g}" if isinstance(work, (int, float)) else "?"))
    except Exception as e:
        return f"? ({e})"


def machine_info(torch=None) -> dict:
    flags = cpu_flags()
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": cpus_usable(),
        "simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags],
        "memory_bytes": mem_total(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"hwoptim": hwoptim.__version__, "numpy": np.__version__,
                     "numba": package_version("numba"),
                     "llvmlite": package_version("llvmlite"),
                     "torch": getattr(torch, "__version__", None),
                     "cupy": package_version("cupy-cuda12x") or package_version("cupy"),
                     "matplotlib": package_version("matplotlib")},
    }
    try:
        info["numba_threading"] = hwoptim.threading_layer()
    except Exception as e:
        info["numba_threading"] = {"error": str(e)}
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    info["serial_below"] = _serial_below()
    return info


def machine_slug(info: dict) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", info["cpu_model"].lower()).strip("-")
    s = re.sub(r"-(processor|cpu|with-radeon.*|\d+-core)$", "", s)
    return f"{s[:40] or 'cpu'}-{info['cpus_usable']}c"
