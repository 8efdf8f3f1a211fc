"""Memory figures of this process, of the instance's processes, and of its container.

psutil's host figures (``virtual_memory``) describe the machine, not the container: a 512 MB
instance on a 24 GB host would look nearly empty. The container's figures come from its memory
cgroup, v1 (``memory.usage_in_bytes`` / ``memory.limit_in_bytes``) or v2 (``memory.current`` /
``memory.max``). "Working set" subtracts reclaimable page cache (inactive file pages), as
``docker stats`` and the kubelet do: that cache is dropped before the OOM killer acts.

The workers share the memory-mapped model weights, so a sum of their RSS counts those pages once per
worker. A process is described by three figures from ``/proc/PID/smaps_rollup``:

- RSS: every resident page it maps, shared or not (shown, labelled as RSS; never summed to judge);
- PSS: each page divided by the number of processes mapping it, so the PSS of all the instance's
  processes adds up to what they really occupy;
- private (Private_Dirty): the written pages only this process maps, what it alone adds and the
  kernel cannot drop: its heap, and its copies of pages it shared with the master before writing
  to them. Not USS (which adds Private_Clean): a clean page of the weights file that only this
  worker has touched so far (the embedding table's rows for the words it has seen) is page cache,
  shared as soon as another worker reads it and dropped under pressure. Counted as private, it
  recycled workers at 148-208 MB of USS under a load where workers' own written pages measured
  60-70 MB (docs/performance.md).
  Where smaps_rollup is missing (kernels before 4.14) ``RssAnon`` from ``/proc/PID/status`` stands in.

One action lives here too: ``release_free_heap`` hands the C heap's free pages back (glibc's
malloc_trim), after a request and from the watchdog, at most once per MEMORY_TRIM_INTERVAL.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

MB = 1024 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
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


def read_cgroup_dir(path: Path, version: int) -> CgroupMemory | None:
    """The figures of one memory cgroup folder of the given version, or None where its usage is unreadable."""
    if version == 2:
        usage = _read_int(path / "memory.current")
        if usage is None:
            return None
        stat = _read_stat(path / "memory.stat")
        events = _read_stat(path / "memory.events")
        return CgroupMemory(2, usage, _read_int(path / "memory.max"), max(0, usage - stat.get("inactive_file", 0)),
                            _read_int(path / "memory.peak"), events.get("oom_kill"))
    usage = _read_int(path / "memory.usage_in_bytes")
    if usage is None:
        return None
    limit = _read_int(path / "memory.limit_in_bytes")
    stat = _read_stat(path / "memory.stat")
    # total_ counts the hierarchy below too; a leaf cgroup without children writes both.
    inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
    oom = _read_stat(path / "memory.oom_control").get("oom_kill")
    return CgroupMemory(1, usage, None if limit is None or limit >= V1_NO_LIMIT else limit,
                        max(0, usage - inactive), _read_int(path / "memory.max_usage_in_bytes"), oom)


def read_cgroup(root: str | Path = "/sys/fs/cgroup", proc_self_cgroup: str | Path = "/proc/self/cgroup"
                ) -> CgroupMemory | None:
    """The container's memory figures, or None outside any memory cgroup we can read."""
    v2, v1 = _own_cgroup_dirs(Path(root), Path(proc_self_cgroup))
    found = read_cgroup_dir(v2, 2) if v2 is not None else None
    if found is None and v1 is not None:
        found = read_cgroup_dir(v1, 1)
    return found


@dataclass(frozen=True)
class ProcessMemory:
    """One process's memory in bytes. pss is None where the kernel gives no smaps_rollup."""

    pid: int
    rss: int
    pss: int | None
    private: int
    source: str  # "smaps_rollup", "status" (RssAnon stands in for private) or "psutil"


def _read_kb_fields(path: Path) -> dict[str, int]:
    """The "Name:   123 kB" lines of a /proc file, in bytes."""
    fields = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition(":")
        parts = value.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * 1024
    return fields


def read_process(pid: int | None = None, proc: str | Path = "/proc") -> ProcessMemory:
    """RSS, PSS and private memory of one process (this one by default).

    Raises OSError (ProcessLookupError, PermissionError) when the process is gone or unreadable.
    """
    pid = pid or os.getpid()
    base = Path(proc) / str(pid)
    try:
        rollup = _read_kb_fields(base / "smaps_rollup")
    except FileNotFoundError:
        if not base.exists():
            raise ProcessLookupError(pid) from None
        rollup = {}
    if "Rss" in rollup and "Pss" in rollup:
        return ProcessMemory(pid, rollup["Rss"], rollup["Pss"], rollup.get("Private_Dirty", 0), "smaps_rollup")
    try:
        status = _read_kb_fields(base / "status")
    except FileNotFoundError:
        status = {}
    if "VmRSS" in status and "RssAnon" in status:
        return ProcessMemory(pid, status["VmRSS"], None, status["RssAnon"], "status")
    # No /proc (macOS, a developer's laptop): all of RSS counts as private, the cautious reading.
    import psutil

    try:
        rss = psutil.Process(pid).memory_info().rss
    except psutil.Error as exc:
        raise ProcessLookupError(pid) from exc
    return ProcessMemory(pid, rss, None, rss, "psutil")


def private_bound(pid: int | None = None) -> int:
    """An upper bound of private memory from counters the kernel keeps (no page-table walk): RssAnon +
    RssShmem of /proc/PID/status. Cheap enough for every request, where smaps_rollup costs ~3 ms of CPU
    a read for a worker that maps the weights.

    A page only this process has written is anonymous (its heap, its copies of the master's pages) or
    shared memory; a file's page is written in place only through a writable shared mapping, and the
    only ones memfit makes are prometheus_client's files, in /dev/shm (shared memory) unless
    PROMETHEUS_MULTIPROC_DIR puts them on a disk. The bound also counts anonymous pages still shared
    with the master since fork, so it reads above Private_Dirty (88 against 54 MB in a worker under
    load): it only decides whether smaps_rollup is read. RSS where status lacks those lines.
    Read directly: psutil's Process object costs ten times the read."""
    try:
        status = _read_kb_fields(Path(f"/proc/{pid or 'self'}/status"))
        return status["RssAnon"] + status["RssShmem"]
    except (OSError, KeyError):
        pass
    try:
        with open(f"/proc/{pid or 'self'}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):  # no procfs (macOS): psutil knows the platform's way
        import psutil

        return psutil.Process(pid or os.getpid()).memory_info().rss


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Hand the C heap's free pages back to the system: glibc's malloc_trim(0). Returns whether it ran.

    glibc returns the top of its heap when freed, but not free pages between live allocations: a
    worker that served a burst keeps them resident and counted as its own (private) memory. Under the
    512 MB tier's overload run, trimming once a second lowered the instance's PSS peak by 10-15 MB
    (bench.serving). A trim walks the heap's free pieces under the allocator's lock: 3-6 ms for a
    50 MB heap of freed pieces here, so callers space them out (release_free_heap_every)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


_last_trim: dict[int, float] = {}  # by pid: a forked child has trimmed nothing yet


def release_free_heap_every(interval: float, now: float) -> bool:
    """release_free_heap() unless this process ran it less than ``interval`` seconds before ``now``
    (0: never); never raises. Whether it ran. Two threads passing together may both trim: harmless,
    and no lock is taken on a request's way out."""
    if not interval or now - _last_trim.get(os.getpid(), -math.inf) < interval:
        return False
    _last_trim[os.getpid()] = now
    try:
        return release_free_heap()
    except Exception:  # noqa: BLE001 -- a trim is an optimisation: it never costs a request or a sample
        return False


def process_tree(root: int) -> list[int]:
    """root and its live descendants: the gunicorn master and its workers (zombies left out)."""
    import psutil

    try:
        top = psutil.Process(root)
        procs = [top, *top.children(recursive=True)]
    except psutil.Error:
        return []
    pids = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@dataclass(frozen=True)
class TreeMemory:
    """Sums over a set of processes. pss is None if any process had no PSS (no smaps_rollup)."""

    processes: int
    rss: int
    pss: int | None
    private: int


def total(rows: list[ProcessMemory]) -> TreeMemory:
    """Sums over processes already read."""
    pss = None if any(r.pss is None for r in rows) else sum(r.pss for r in rows)
    return TreeMemory(len(rows), sum(r.rss for r in rows), pss, sum(r.private for r in rows))


def read_processes(pids: list[int], proc: str | Path = "/proc") -> list[ProcessMemory]:
    """read_process for each pid; a process that ended meanwhile (or is unreadable) is left out."""
    rows = []
    for pid in pids:
        try:
            rows.append(read_process(pid, proc))
        except OSError:
            continue
    return rows


def read_tree(pids: list[int], proc: str | Path = "/proc") -> TreeMemory:
    """Sum RSS, PSS and private memory over pids; a process that ended meanwhile is left out."""
    return total(read_processes(pids, proc))


def host_total() -> int:
    import psutil

    return psutil.virtual_memory().total


def instance_figure(cgroup: CgroupMemory | None, pss_sum: int | None) -> tuple[str, int] | None:
    """What the instance is judged on, and its name: the cgroup's working set where the cgroup has a
    limit (what the OOM killer weighs), else the PSS sum of the instance's processes; None if neither."""
    if cgroup is not None and cgroup.limit is not None:
        return "cgroup_working_set", cgroup.working_set
    if pss_sum is not None:
        return "pss_sum", pss_sum
    return None


def effective_limit(cgroup: CgroupMemory | None = None) -> int:
    """The memory this instance can really use: the cgroup limit, or host RAM if smaller or unset."""
    cgroup = cgroup if cgroup is not None else read_cgroup()
    total = host_total()
    if cgroup is None or cgroup.limit is None:
        return total
    return min(cgroup.limit, total)
