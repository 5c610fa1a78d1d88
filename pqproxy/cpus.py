"""How many CPUs this process may use: what ``workers: auto`` resolves to.

The smaller of two limits, as a container sees them:

- the CPUs the scheduler lets the process run on (``os.sched_getaffinity``: cpusets, taskset,
  Kubernetes' static CPU manager);
- the CPU bandwidth quota of its cgroup (Kubernetes' ``resources.limits.cpu``): cgroup v2
  ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") of the process's cgroup and each ancestor,
  cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1: no quota).

A fractional quota rounds down (1.5 CPUs: one worker), never below one: two busy workers in
1.5 CPUs of quota would be throttled in turn, each a tail latency spike (Go's automaxprocs
rounds the same way). The cgroup root and the process's cgroup file are parameters, so tests
point them at a fake tree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Final

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP: Final = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under one of these names.
_V1_CPU_DIRS: Final = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _quota(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None  # "max" (v2) or -1 (v1): no limit
    return q / p


def _ancestors(root: Path, relative: str) -> list[Path]:
    """``root/relative`` and each directory above it, up to ``root`` itself."""
    parts = [p for p in relative.strip("/").split("/") if p and p not in (".", "..")]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def cgroup_cpu_limit(
    cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (the tightest along its path), or
    None when none is set or none can be read."""
    text = _read(proc_self_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            # cgroup v2. A container with its own cgroup namespace sees itself at "/".
            for directory in _ancestors(cgroup_root, relative):
                cpu_max = _read(directory / "cpu.max")
                if cpu_max is None:
                    continue
                fields = cpu_max.split()
                if len(fields) == 2 and fields[0] != "max":
                    value = _quota(fields[0], fields[1])
                    if value is not None:
                        limits.append(value)
        elif "cpu" in controllers.split(","):
            for name in _V1_CPU_DIRS:
                mount = cgroup_root / name
                # The host path is not visible inside a container, whose mount root is
                # its own cgroup: the path and its ancestors end at the mount root.
                for directory in _ancestors(mount, relative):
                    quota = _read(directory / "cpu.cfs_quota_us")
                    period = _read(directory / "cpu.cfs_period_us")
                    if quota is not None and period is not None:
                        value = _quota(quota, period)
                        if value is not None:
                            limits.append(value)
    return min(limits) if limits else None


def schedulable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus(
    cgroup_root: Path = CGROUP_ROOT,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    affinity: int | None = None,
) -> int:
    """CPUs this process may use: its affinity set, capped by its cgroup quota (rounded
    down, at least 1). ``affinity`` replaces the affinity count (tests)."""
    cpus = affinity if affinity is not None else schedulable_cpus()
    limit = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)
