"""Memory of a server's process tree and of its cgroup over time (a Sampler thread, every 50 ms, labelled
by phase), the peak of a figure that must be there, and measured(): a server started in its cgroup
with a Sampler, stopped and cleaned up whatever happens. Figures are read as monitoring reads them
(monitoring/memory.py): PSS, private and RSS sums of the tree, the cgroup's usage and working set."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from devtools.cgroups import MB, Cgroup
from devtools.gunicorn import GunicornServer
from monitoring import memory


def strict_peak(samples: list[dict], key: str) -> float:
    """The largest value of key over samples; raises when there is none or a sample lacks it (no PSS
    without /proc/PID/smaps_rollup): a missing figure must fail a run, never read as 0."""
    values = [s.get(key) for s in samples]
    if not values or any(v is None for v in values):
        raise ValueError(f"no {key} in {values.count(None)} of {len(values)} memory samples")
    return max(values)


SWEEP_TRIES = 5  # reads of the process tree per sample until one sees no fork or exit (Sampler.take)


class Sampler(threading.Thread):
    """Memory of the gunicorn process tree and of its cgroup, every 50 ms, labelled by phase."""

    def __init__(self, pid: int, cgroup: Cgroup):
        super().__init__(daemon=True, name="bench-sampler")
        self.root_pid = pid
        self.cgroup = cgroup
        self.phase = "startup"
        self.samples: list[dict] = []
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.recorded = threading.Condition()

    def run(self) -> None:
        try:
            self._sample()
        finally:  # wake wait_samples() when the tree is gone, instead of leaving it to its timeout
            with self.recorded:
                self.recorded.notify_all()

    def take(self) -> dict | None:
        """One sample of the tree and the cgroup; None once the tree is gone.

        The processes are read one after another, so a sweep during which a worker exits or is forked
        mixes two states of the tree: PSS splits a shared page among the processes mapping it at the
        moment each is read, and a worker read before a sibling's exit or a fork keeps its old share
        while the others are read with their new one. Such sweeps summed up to ~75 MB above the samples
        around them (one sample, at a recycle). A sweep counts when the tree is the same before and
        after it; otherwise it is read again (a handful of tries: forks and exits are rare events).
        """
        for _ in range(SWEEP_TRIES):
            pids = memory.process_tree(self.root_pid)  # zombies left out: an exited worker's memory is gone
            if not pids:
                return None
            rows = memory.read_processes(pids)
            if len(rows) == len(pids) and set(memory.process_tree(self.root_pid)) == set(pids):
                break
        tree = memory.total(rows)
        workers = [r for r in rows if r.pid != self.root_pid]
        cgroup = self.cgroup.figures()
        return {"t": round(time.monotonic() - self.started, 3), "phase": self.phase, "pids": len(rows),
                "pss_mb": None if tree.pss is None else round(tree.pss / MB, 1),
                "uss_mb": round(tree.private / MB, 1), "rss_mb": round(tree.rss / MB, 1),
                "worker_max_mb": round(max((w.rss for w in workers), default=0) / MB, 1),
                "worker_private_max_mb": round(max((w.private for w in workers), default=0) / MB, 1),
                "cgroup_mb": round(cgroup.usage / MB, 1) if cgroup else 0,
                "working_set_mb": round(cgroup.working_set / MB, 1) if cgroup else None}

    def _sample(self) -> None:
        while not self.stop.is_set():
            sample = self.take()
            if sample is None:
                break
            self.samples.append(sample)
            with self.recorded:
                self.recorded.notify_all()
            self.stop.wait(0.05)

    def wait_samples(self, count: int, timeout: float = 60) -> None:
        """Block until count more samples are recorded: a measuring window counted in samples, not a sleep."""
        target = len(self.samples) + count
        with self.recorded:
            self.recorded.wait_for(lambda: len(self.samples) >= target or not self.is_alive(), timeout)

    def peaks(self) -> dict:
        out = {}
        for phase in dict.fromkeys(s["phase"] for s in self.samples):
            rows = [s for s in self.samples if s["phase"] == phase]
            out[phase] = {key: max((r[key] for r in rows if r.get(key) is not None), default=None)
                          for key in ("pss_mb", "uss_mb", "rss_mb", "working_set_mb")}
        return out


@contextmanager
def measured(server: GunicornServer, cgroup: Cgroup, phase: str, reset_peak: bool = False):
    """Start server in cgroup with a Sampler on its tree, wait until it answers, and run the block under
    `phase`; afterwards stop server and sampler, read the cgroup's figures and remove it, whatever
    happened. Yields (sampler, figures): figures fills with Cgroup.final_figures() on the way out.
    reset_peak: the cgroup's peak counts from readiness, not from boot."""
    sampler = Sampler(server.start().pid, cgroup)
    sampler.start()
    figures: dict = {}
    try:
        server.wait_ready()
        if reset_peak:
            cgroup.reset_peak()
        sampler.phase = phase
        yield sampler, figures
    finally:
        # The shutdown is not serving: the master's own exit briefly copies the pages it shares with
        # the workers still leaving (its sample is kept, under "stop"; the cgroup's peak includes it).
        sampler.phase = "stop"
        server.stop()
        sampler.stop.set()
        sampler.join()
        try:
            figures.update(cgroup.final_figures())  # raises when the cgroup gives no peak or OOM count
        finally:
            cgroup.remove()

