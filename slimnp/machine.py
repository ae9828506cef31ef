"""What machine and which code made a measurement.

One description of the machine, written here once and used by the results
lines of ``slimnp experiment run`` (:func:`describe`) and by the benchmarks
(``bench/common.py`` adds its thread and library settings to the same
pieces).  Only the standard library: importing this costs nothing.
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def cpu_name() -> str:
    """The CPU model Linux reports (``"AMD EPYC"``), else what Python knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def l3_cache() -> str:
    """The L3 cache size Linux reports for CPU 0 (``"32768K"``), or ``"unknown"``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(e for e in os.listdir(base) if e.startswith("index")):
            with open(f"{base}/{entry}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{base}/{entry}/size") as f:
                return f.read().strip()
    except OSError:
        pass
    return "unknown"


def usable_cores() -> int | None:
    """Cores this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count()


def describe() -> dict:
    """``{"platform", "python", "cores", "cpu", "l3"}`` of this machine (the
    ``machine`` of a results line)."""
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cores": os.cpu_count(), "cpu": cpu_name(), "l3": l3_cache()}


def git_commit(root=None) -> str | None:
    """The commit of the checkout at ``root`` (default: the one holding this
    package), with ``-dirty`` if tracked files changed; None outside a git tree."""
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
