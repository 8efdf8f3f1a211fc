"""Memory figures of this process and of its container.

psutil's host figures (``virtual_memory``) describe the machine, not the container: a 512 MB
instance on a 24 GB host would look nearly empty. The container's figures come from its memory
cgroup, v1 (``memory.usage_in_bytes`` / ``memory.limit_in_bytes``) or v2 (``memory.current`` /
``memory.max``). "Working set" subtracts reclaimable page cache (inactive file pages), as
``docker stats`` and the kubelet do: that cache is dropped before the OOM killer acts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024
# cgroup v1 writes a huge number (PAGE_COUNTER_MAX pages) for "no limit"; v2 writes "max".
V1_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class CgroupMemory:
    version: int
    usage: int
    limit: int | None  # None: no limit set
    working_set: int
    peak: int | None
    oom_kills: int | None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _read_stat(path: Path) -> dict[str, int]:
    stats: dict[str, int] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                stats[key] = int(value)
    except OSError:
        pass
    return stats


def _own_cgroup_dirs(root: Path, proc_self_cgroup: Path) -> tuple[Path | None, Path | None]:
    """This process's v2 and v1-memory cgroup folders under root, from /proc/self/cgroup."""
    v2 = v1 = None
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if controllers == "" and (root / rel / "memory.current").exists():
            v2 = root / rel
        elif "memory" in controllers.split(","):
            for base in (root / "memory", root):
                if (base / rel / "memory.usage_in_bytes").exists():
                    v1 = base / rel
                    break
    # Inside a container the namespace root is the container's own cgroup.
    if v2 is None and (root / "memory.current").exists():
        v2 = root
    if v1 is None:
        for base in (root / "memory", root):
            if (base / "memory.usage_in_bytes").exists():
                v1 = base
                break
    return v2, v1


def read_cgroup(root: str | Path = "/sys/fs/cgroup", proc_self_cgroup: str | Path = "/proc/self/cgroup"
                ) -> CgroupMemory | None:
    """The container's memory figures, or None outside any memory cgroup we can read."""
    v2, v1 = _own_cgroup_dirs(Path(root), Path(proc_self_cgroup))
    if v2 is not None:
        usage = _read_int(v2 / "memory.current")
        if usage is not None:
            stat = _read_stat(v2 / "memory.stat")
            events = _read_stat(v2 / "memory.events")
            return CgroupMemory(2, usage, _read_int(v2 / "memory.max"),
                                max(0, usage - stat.get("inactive_file", 0)),
                                _read_int(v2 / "memory.peak"), events.get("oom_kill"))
    if v1 is not None:
        usage = _read_int(v1 / "memory.usage_in_bytes")
        if usage is not None:
            limit = _read_int(v1 / "memory.limit_in_bytes")
            stat = _read_stat(v1 / "memory.stat")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            oom = _read_stat(v1 / "memory.oom_control").get("oom_kill")
            return CgroupMemory(1, usage, None if limit is None or limit >= V1_NO_LIMIT else limit,
                                max(0, usage - inactive), _read_int(v1 / "memory.max_usage_in_bytes"), oom)
    return None


def process_rss(pid: int | None = None) -> int:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss


def host_total() -> int:
    import psutil

    return psutil.virtual_memory().total


def effective_limit(cgroup: CgroupMemory | None = None) -> int:
    """The memory this instance can really use: the cgroup limit, or host RAM if smaller or unset."""
    cgroup = cgroup if cgroup is not None else read_cgroup()
    total = host_total()
    if cgroup is None or cgroup.limit is None:
        return total
    return min(cgroup.limit, total)
