"""Memory and CPU cgroups for a measured server: a limit where the machine allows one (root, cgroup
folders writable), v1 or v2, whichever it mounts, and the figures the kernel keeps for it (usage, working
set, peak, OOM kills, CPU throttling). Where no cgroup can be made, ``enabled`` is False and the caller
runs without a limit (and says so); a figure a cgroup must give but does not raises CgroupError."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from devtools.project import log
from monitoring import memory

MB = 1024 * 1024
CGROUP_V1_ROOT = Path("/sys/fs/cgroup/memory")  # the v1 memory hierarchy (hybrid and legacy mounts)
CGROUP_V2_ROOT = Path("/sys/fs/cgroup")  # the unified hierarchy (cgroup v2 only machines)
CPU_V1_ROOT = Path("/sys/fs/cgroup/cpu")  # the v1 cpu hierarchy (hybrid and legacy mounts)
CPU_PERIOD_US = 100_000


class CgroupError(RuntimeError):
    """A figure the memory cgroup must give is missing or zero: a run must fail on it, never pass."""


class Cgroup:
    """A memory cgroup with a limit, v1 or v2 (whichever the machine mounts with a memory controller), or a
    no-op where the machine does not allow one (``enabled`` False; callers that need it must say so)."""

    def __init__(self, name: str, limit_mb: int, v1_root: Path = CGROUP_V1_ROOT, v2_root: Path = CGROUP_V2_ROOT):
        self.enabled = False
        self.version: int | None = None
        self.path: Path | None = None
        leaf = f"memfit-bench-{name}-{os.getpid()}"
        reasons = []
        for version, root in ((1, v1_root), (2, v2_root)):
            try:
                self._create(version, root, root / leaf, limit_mb)
            except OSError as exc:
                reasons.append(f"v{version} {root}: {exc.strerror or exc}")
                continue
            self.enabled, self.version, self.path = True, version, root / leaf
            return
        log(f"no memory cgroup ({'; '.join(reasons)}); measuring without a limit")

    @staticmethod
    def _create(version: int, root: Path, path: Path, limit_mb: int) -> None:
        if version == 1:
            if not (root / "memory.limit_in_bytes").exists():
                raise FileNotFoundError(2, "no cgroup v1 memory hierarchy", str(root))
            limit, swap = "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"
        else:
            controllers = root / "cgroup.controllers"
            if not controllers.exists() or "memory" not in controllers.read_text().split():
                raise FileNotFoundError(2, "no cgroup v2 memory controller", str(root))
            subtree = root / "cgroup.subtree_control"
            if "memory" not in subtree.read_text().split():
                subtree.write_text("+memory")  # children get memory.* files only once the parent delegates it
            limit, swap = "memory.max", "memory.swap.max"
        path.mkdir()
        try:
            (path / limit).write_text(str(limit_mb * MB))
        except OSError:
            path.rmdir()
            raise
        try:  # no swap either, as on the platforms
            (path / swap).write_text(str(limit_mb * MB) if version == 1 else "0")
        except OSError:
            pass

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.enabled:
            return argv
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def figures(self) -> memory.CgroupMemory | None:
        """Usage, working set, peak and OOM kills as monitoring reads them; None without a cgroup."""
        return memory.read_cgroup_dir(self.path, self.version) if self.enabled else None

    def reset_peak(self) -> bool:
        """Restart the peak from now (v1 always; v2 from kernel 6.12). False: the peak counts from the start."""
        try:
            (self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")).write_text("0")
            return True
        except OSError:
            return False

    def peak(self) -> int:
        """The kernel's peak usage (v1 memory.max_usage_in_bytes, v2 memory.peak). Raises CgroupError when it
        is missing or zero: a cgroup that held a server cannot have peaked at nothing."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        figures = self.figures()
        if figures is None or not figures.peak:
            hint = " (cgroup v2 has memory.peak from Linux 5.19)" if self.version == 2 else ""
            raise CgroupError(f"memory cgroup peak unreadable or zero: {self.path}/{name}{hint}")
        return figures.peak

    def oom_kills(self) -> int:
        """OOM kills in the cgroup (v1 memory.oom_control, v2 memory.events); CgroupError when unreadable."""
        figures = self.figures()
        if figures is None or figures.oom_kills is None:
            name = "memory.oom_control" if self.version == 1 else "memory.events"
            raise CgroupError(f"memory cgroup OOM count unreadable: {self.path}/{name} has no oom_kill")
        return figures.oom_kills

    def final_figures(self) -> dict:
        """The run's cgroup figures for the results; raises CgroupError if the cgroup cannot give them."""
        if not self.enabled:
            return {"cgroup": False, "cgroup_version": None, "cgroup_peak_mb": None, "oom_kills": None}
        return {"cgroup": True, "cgroup_version": self.version, "cgroup_peak_mb": round(self.peak() / MB, 1),
                "oom_kills": self.oom_kills()}

    def remove(self) -> None:
        if self.enabled:
            for _ in range(50):  # the kernel frees the cgroup a moment after its last process exits
                try:
                    self.path.rmdir()
                    return
                except OSError:
                    time.sleep(0.1)


class CpuCgroup:
    """A CPU quota of `cpus` CPUs for a server: cgroup v1's cpu controller (a child with cpu.cfs_period_us
    100000 and cpu.cfs_quota_us cpus × 100000) or, on a cgroup v2 only machine, cpu.max. cpus None asks
    for no limit. Where the machine allows neither, ``enabled`` is False and ``reason`` says why: the
    caller records no limit, it never pretends one.

    wrap() composes with Cgroup.wrap (cpu.wrap(memory.wrap(argv))): each echoes the shell's pid into its
    cgroup.procs before exec, so the server's pid ends in both and its workers inherit them. On v2 a
    process is in one cgroup only: pass the memory Cgroup's v2 folder as shared_v2 and the quota is set
    there (wrap then adds nothing, and the memory Cgroup removes the folder).

    visible (v1): a container sees its own quota at /sys/fs/cgroup/cpu, and the app sizes itself from
    it (app/semantic/encoders.py available_cpus reads /sys/fs/cgroup/cpu/cpu.cfs_quota_us). Here the
    server would read the host's root (no quota), so wrap starts it in a private mount namespace with
    the child bind-mounted over /sys/fs/cgroup/cpu: its view, and only its, is a container's. Probed
    once; ``visible`` False where unshare or the mount is not allowed.
    """

    def __init__(self, name: str, cpus: float | None, v1_root: Path = CPU_V1_ROOT,
                 v2_root: Path = CGROUP_V2_ROOT, shared_v2: Path | None = None, show_quota: bool = True):
        self.cpus, self.v1_root = cpus, v1_root
        self.enabled, self.version, self.path, self.owned, self.visible = False, None, None, False, False
        self.reason: str | None = None
        if cpus is None:
            self.reason = "no limit asked"
            return
        quota = int(round(cpus * CPU_PERIOD_US))
        leaf = f"memfit-bench-cpu-{name}-{os.getpid()}"
        reasons = []
        try:
            if not (v1_root / "cpu.cfs_quota_us").exists():
                raise FileNotFoundError(2, "no cgroup v1 cpu hierarchy", str(v1_root))
            path = v1_root / leaf
            path.mkdir()
            try:
                (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
            except OSError:
                path.rmdir()
                raise
            self.enabled, self.version, self.path, self.owned = True, 1, path, True
        except OSError as exc:
            reasons.append(f"v1 {v1_root}: {exc.strerror or exc}")
        if not self.enabled:
            try:
                controllers = v2_root / "cgroup.controllers"
                if not controllers.exists() or "cpu" not in controllers.read_text().split():
                    raise FileNotFoundError(2, "no cgroup v2 cpu controller", str(v2_root))
                subtree = v2_root / "cgroup.subtree_control"
                if "cpu" not in subtree.read_text().split():
                    subtree.write_text("+cpu")
                path = shared_v2 or v2_root / leaf
                if shared_v2 is None:
                    path.mkdir()
                try:
                    (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
                except OSError:
                    if shared_v2 is None:
                        path.rmdir()
                    raise
                self.enabled, self.version, self.path, self.owned = True, 2, path, shared_v2 is None
            except OSError as exc:
                reasons.append(f"v2 {v2_root}: {exc.strerror or exc}")
        if not self.enabled:
            self.reason = "no CPU cgroup (" + "; ".join(reasons) + ")"
            log(f"{self.reason}: running without a CPU limit")
        elif self.version == 1 and show_quota:
            self.visible = self._probe_visible(quota)

    def _probe_visible(self, quota: int) -> bool:
        try:
            out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                  f"mount --bind {self.path} {self.v1_root} && cat {self.v1_root}/cpu.cfs_quota_us"],
                                 capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0 and out.stdout.strip() == str(quota)

    def wrap(self, argv: list[str]) -> list[str]:
        if not self.enabled or not self.owned:
            return argv
        script = f"echo $$ > {self.path}/cgroup.procs"
        if self.visible:
            script += f" && mount --bind {self.path} {self.v1_root}"
        command = ["sh", "-c", script + ' && exec "$@"', "sh", *argv]
        return ["unshare", "--mount", "--propagation", "private", *command] if self.visible else command

    def stat(self) -> dict:
        """cpu.stat as seconds and counts: nr_periods, nr_throttled, throttled_s (and usage_s on v2); {}
        without a cgroup or once it is gone."""
        if not self.enabled:
            return {}
        try:
            raw = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines() if line.strip())
        except (OSError, ValueError):
            return {}
        out = {"nr_periods": int(raw.get("nr_periods", 0)), "nr_throttled": int(raw.get("nr_throttled", 0))}
        if "throttled_time" in raw:  # v1: nanoseconds
            out["throttled_s"] = round(int(raw["throttled_time"]) / 1e9, 3)
        if "throttled_usec" in raw:  # v2: microseconds
            out["throttled_s"] = round(int(raw["throttled_usec"]) / 1e6, 3)
        if "usage_usec" in raw:
            out["usage_s"] = round(int(raw["usage_usec"]) / 1e6, 3)
        return out

    def describe(self) -> dict:
        return {"cpus_asked": self.cpus, "cpu_limit": self.cpus if self.enabled else None,
                "cpu_cgroup_version": self.version, "cpu_cgroup": str(self.path) if self.path else None,
                "cpu_quota_visible_to_server": self.visible if self.enabled else None, "cpu_note": self.reason}

    def remove(self) -> None:
        """rmdir the child (retried while the kernel lets go of exited processes); a process still in it
        after that (one of the server's, started through wrap) is moved to the root first."""
        if not (self.enabled and self.owned and self.path):
            return
        root = self.v1_root if self.version == 1 else self.path.parent
        for attempt in range(60):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if attempt == 50:
                    try:
                        for pid in (self.path / "cgroup.procs").read_text().split():
                            (root / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass
                time.sleep(0.1)
        log(f"could not remove {self.path}")
