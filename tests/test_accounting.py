"""Memory accounting that sees sharing: PSS and private memory per process, the instance
judged on its cgroup working set or PSS sum, recycling decided on private memory, and the bench's cgroup
(v1 and v2) failing loudly when it gives no peak."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from monitoring import memory
from support import ROOT, make_settings
from test_monitoring_memory import write

MB = memory.MB


# --- /proc readers against fixture files ---------------------------------------------------------

ROLLUP = """55e0619dd000-7ffcd65c7000 ---p 00000000 00:00 0                          [rollup]
Rss:              307200 kB
Pss:              133120 kB
Shared_Clean:     204800 kB
Shared_Dirty:          0 kB
Private_Clean:      2048 kB
Private_Dirty:    100352 kB
Anonymous:        100352 kB
"""
STATUS = "Name:\tgunicorn\nVmRSS:\t  307200 kB\nRssAnon:\t  100352 kB\nRssFile:\t  206848 kB\n"


def fake_proc(tmp_path, pid, **files):
    write(tmp_path / "proc" / str(pid), **files)
    return tmp_path / "proc"


def test_smaps_rollup_gives_rss_pss_and_private(tmp_path):
    proc = fake_proc(tmp_path, 41, smaps_rollup=ROLLUP, status=STATUS)
    figures = memory.read_process(41, proc)
    assert (figures.rss, figures.pss, figures.private, figures.source) == (
        300 * MB, 130 * MB, 98 * MB, "smaps_rollup")  # private = Private_Dirty (clean pages are droppable)


def test_without_smaps_rollup_rss_anon_stands_in_for_private(tmp_path):
    proc = fake_proc(tmp_path, 42, status=STATUS)
    figures = memory.read_process(42, proc)
    assert (figures.rss, figures.pss, figures.private, figures.source) == (300 * MB, None, 98 * MB, "status")


def test_a_gone_process_is_a_lookup_error_and_left_out_of_sums(tmp_path):
    proc = fake_proc(tmp_path, 41, smaps_rollup=ROLLUP)
    with pytest.raises(ProcessLookupError):
        memory.read_process(999, proc)
    tree = memory.read_tree([41, 999, 41], proc)
    assert (tree.processes, tree.rss, tree.pss, tree.private) == (2, 600 * MB, 260 * MB, 196 * MB)


def test_a_pss_sum_is_none_when_one_process_has_no_pss(tmp_path):
    fake_proc(tmp_path, 41, smaps_rollup=ROLLUP)
    proc = fake_proc(tmp_path, 42, status=STATUS)
    assert memory.read_tree([41, 42], proc).pss is None  # never a sum that silently leaves a process out


def test_the_instance_is_judged_on_the_working_set_with_a_limit_else_on_pss():
    limited = memory.CgroupMemory(2, 400 * MB, 512 * MB, 300 * MB, None, 0)
    unlimited = memory.CgroupMemory(1, 400 * MB, None, 300 * MB, None, 0)
    assert memory.instance_figure(limited, 250 * MB) == ("cgroup_working_set", 300 * MB)
    assert memory.instance_figure(unlimited, 250 * MB) == ("pss_sum", 250 * MB)
    assert memory.instance_figure(None, 250 * MB) == ("pss_sum", 250 * MB)
    assert memory.instance_figure(None, None) is None


# --- real processes sharing pages ----------------------------------------------------------------

# A sibling that maps the file and touches every page, as another worker maps the shared weights.
HOLDER = """
import mmap, sys
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))
print("ready", flush=True)
sys.stdin.read()
"""

# The worker: its recycle decision (monitoring.hooks.after_request) before and after mapping the shared
# file, then after growing its own memory. The bound is set from its own private memory at the start.
WORKER = """
import json, logging, mmap, sys, tempfile
from types import SimpleNamespace
from monitoring import hooks, memory

MB = memory.MB
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


class Worker:
    alive, nr, log = True, 1, logging.getLogger("worker")


def decide():
    worker = Worker()
    hooks.after_request(worker, settings)
    figures = memory.read_process()
    return {"alive": worker.alive, "rss": figures.rss, "pss": figures.pss, "private": figures.private}


hooks.PRIVATE_READING_MAX_AGE = 0  # read afresh at each decision (the reuse has its own test)
start = memory.read_process()
limit_mb = start.private // MB + 48
settings = SimpleNamespace(max_worker_memory_mb=limit_mb, memory_trim_interval=0, shared_folder=tempfile.mkdtemp())
out = {"limit_mb": limit_mb, "start": decide()}
with open(sys.argv[1], "rb") as f:
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # every page resident in this process too
out["shared"] = decide()
grown = bytearray(b"x") * (96 * MB)  # written, so resident and private
out["grown"] = decide()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharing(tmp_path_factory):
    """Run WORKER beside HOLDER over one 160 MB file; returns the worker's report and its log."""
    path = tmp_path_factory.mktemp("shared") / "weights.bin"
    with open(path, "wb") as f:
        for _ in range(160):
            f.write(bytes(range(256)) * (MB // 256))  # real data: a hole could map the shared zero page
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(WORKER), str(path)],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_shared_pages_fill_rss_but_not_pss_or_private(sharing):
    report, _ = sharing
    start, shared = report["start"], report["shared"]
    assert shared["rss"] - start["rss"] > 150 * MB  # all 160 MB resident in the worker
    assert shared["private"] - start["private"] < 16 * MB  # none of it private: the holder maps it too
    assert shared["pss"] - start["pss"] < 100 * MB  # half of it, split with the holder


def test_a_worker_high_only_through_shared_pages_is_not_recycled(sharing):
    report, log = sharing
    assert report["start"]["alive"]
    # Its RSS is past the bound, so a decision on RSS would recycle it; on private memory it stays.
    assert report["shared"]["rss"] > report["limit_mb"] * MB, report
    assert report["shared"]["alive"], f"recycled for shared pages: {report}\n{log}"


def test_private_growth_past_the_bound_is_recycled(sharing):
    report, log = sharing
    assert report["grown"]["private"] > report["limit_mb"] * MB, report
    assert not report["grown"]["alive"], report
    assert "memfit recycle: worker pid=" in log and "private=" in log and "MAX_WORKER_MEMORY_MB=" in log, log


def test_private_memory_is_read_only_past_the_cheap_bound_and_at_most_once_a_second(monkeypatch, tmp_path):
    import logging
    from types import SimpleNamespace

    from monitoring import hooks

    state = {"bound": 100 * MB, "private": 100 * MB, "now": 1000.0, "reads": 0}

    def read_process(pid=None, proc="/proc"):
        state["reads"] += 1
        return memory.ProcessMemory(1, 400 * MB, state["private"], state["private"], "smaps_rollup")

    monkeypatch.setattr(hooks, "_state", {})
    monkeypatch.setattr(hooks, "time", SimpleNamespace(monotonic=lambda: state["now"]))
    monkeypatch.setattr(hooks.memory, "private_bound", lambda pid=None: state["bound"])
    monkeypatch.setattr(hooks.memory, "read_process", read_process)
    settings = SimpleNamespace(max_worker_memory_mb=150, memory_trim_interval=0, shared_folder=str(tmp_path))
    worker = SimpleNamespace(alive=True, nr=1, log=logging.getLogger("worker"))

    hooks.after_request(worker, settings)
    assert (state["reads"], worker.alive) == (0, True)  # the cheap bound under the limit: smaps is not read
    state["bound"] = 160 * MB  # anonymous pages, some still shared with the master
    hooks.after_request(worker, settings)
    assert (state["reads"], worker.alive) == (1, True)
    state["private"], state["now"] = 200 * MB, state["now"] + 0.5
    hooks.after_request(worker, settings)
    assert (state["reads"], worker.alive) == (1, True)  # the reading of half a second ago is reused
    state["now"] += 0.6
    hooks.after_request(worker, settings)
    assert (state["reads"], worker.alive) == (2, False)  # read again, past the bound: recycled
    os.close(hooks._state["recycle_turn"])  # this test process is not exiting: let go of the turn


def test_workers_past_the_bound_together_recycle_one_after_the_other(monkeypatch, tmp_path):
    import fcntl
    import logging
    from types import SimpleNamespace

    from monitoring import hooks

    monkeypatch.setattr(hooks, "_state", {})
    monkeypatch.setattr(hooks.memory, "private_bound", lambda pid=None: 400 * MB)
    monkeypatch.setattr(hooks.memory, "read_process",
                        lambda pid=None, proc="/proc": memory.ProcessMemory(1, 400 * MB, 300 * MB, 200 * MB, "smaps_rollup"))
    settings = SimpleNamespace(max_worker_memory_mb=150, memory_trim_interval=0, shared_folder=str(tmp_path))
    worker = SimpleNamespace(alive=True, nr=1, log=logging.getLogger("worker"))
    # A sibling recycling: it holds the instance's turn (its own open file, as another process would).
    sibling = os.open(tmp_path / hooks.RECYCLE_LOCK, os.O_RDONLY | os.O_CREAT)
    fcntl.flock(sibling, fcntl.LOCK_EX)
    monkeypatch.setattr(hooks, "PRIVATE_READING_MAX_AGE", 0)  # read afresh at each decision
    hooks.after_request(worker, settings)
    assert worker.alive, "recycled while a sibling was draining"
    os.close(sibling)  # the sibling exited: the kernel dropped its lock
    hooks.after_request(worker, settings)
    assert not worker.alive, "still serving past the bound with the turn free"
    os.close(hooks._state["recycle_turn"])  # this test process is not exiting: let go of the turn


def test_the_instance_tree_sums_the_processes_and_sees_their_sharing(tmp_path):
    """The sampler's instance: a root and its children, the PSS sum well under the RSS sum when they share."""
    from monitoring.watchdog import MemorySampler

    script = "import sys; sys.stdin.read()"
    children = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE) for _ in range(2)]
    try:
        figures = MemorySampler(450, str(tmp_path / "no-cgroup"), instance_root=memory.os.getpid()).sample()
        alone = MemorySampler(450, str(tmp_path / "no-cgroup")).sample()
    finally:
        for child in children:
            child.stdin.close()
            child.wait(timeout=30)
    assert figures["instance_processes"] >= 3 and alone["instance_processes"] == 1
    # Three Pythons share the interpreter's and libraries' pages: their PSS sum is below their RSS sum.
    assert figures["instance_pss_mb"] < figures["instance_rss_sum_mb"], figures
    assert figures["instance_basis"] == "pss_sum" and figures["instance_mb"] == figures["instance_pss_mb"]


# --- /metrics ------------------------------------------------------------------------------------

def test_metrics_show_private_pss_and_rss_per_worker_and_the_instance(tmp_path):
    from app import create_app
    from support import metric

    app = create_app(make_settings(tmp_path))
    body = app.test_client().get("/metrics").get_data(as_text=True)
    private, pss, rss = (metric(body, f"memfit_worker_{kind}_bytes") for kind in ("private", "pss", "rss"))
    assert 0 < private <= pss <= rss, (private, pss, rss)
    assert metric(body, "memfit_instance_pss_bytes") >= pss


# --- the bench's cgroup: v1 and v2, and no silent peak of 0 ---------------------------------------

def v1_root(tmp_path):
    root = tmp_path / "v1"
    write(root, memory__limit_in_bytes="9223372036854771712")
    return root


def v2_root(tmp_path, controllers="cpu io memory pids"):
    root = tmp_path / "v2"
    write(root, cgroup__controllers=controllers, cgroup__subtree_control="")
    return root


def test_bench_cgroup_v2_is_created_with_its_limit_and_read(tmp_path):
    from devtools.cgroups import Cgroup

    cgroup = Cgroup("t", 512, v1_root=tmp_path / "absent", v2_root=v2_root(tmp_path))
    assert (cgroup.enabled, cgroup.version) == (True, 2)
    assert (cgroup.path / "memory.max").read_text() == str(512 * MB)
    assert (cgroup.path / "memory.swap.max").read_text() == "0"
    assert (cgroup.path.parent / "cgroup.subtree_control").read_text() == "+memory"
    write(cgroup.path, memory__current=str(300 * MB), memory__peak=str(320 * MB),
          memory__stat=f"inactive_file {40 * MB}\n", memory__events="oom 0\noom_kill 0\n")
    assert cgroup.figures().working_set == 260 * MB
    assert cgroup.final_figures() == {"cgroup": True, "cgroup_version": 2, "cgroup_peak_mb": 320.0, "oom_kills": 0}


def test_bench_cgroup_v1_is_preferred_where_mounted(tmp_path):
    from devtools.cgroups import Cgroup

    cgroup = Cgroup("t", 256, v1_root=v1_root(tmp_path), v2_root=v2_root(tmp_path))
    assert cgroup.version == 1 and (cgroup.path / "memory.limit_in_bytes").read_text() == str(256 * MB)
    write(cgroup.path, memory__usage_in_bytes=str(200 * MB), memory__max_usage_in_bytes=str(210 * MB),
          memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cgroup.final_figures()["cgroup_peak_mb"] == 210.0 and cgroup.oom_kills() == 1


@pytest.mark.parametrize("peak", [None, "0"], ids=["missing memory.peak", "memory.peak of 0"])
def test_bench_cgroup_without_a_peak_fails_loudly(tmp_path, peak):
    from devtools.cgroups import Cgroup, CgroupError

    cgroup = Cgroup("t", 512, v1_root=tmp_path / "absent", v2_root=v2_root(tmp_path))
    write(cgroup.path, memory__current=str(300 * MB), memory__events="oom_kill 0\n",
          **({"memory__peak": peak} if peak else {}))
    with pytest.raises(CgroupError, match="memory.peak"):
        cgroup.final_figures()


def test_bench_cgroup_without_an_oom_count_fails_loudly(tmp_path):
    from devtools.cgroups import Cgroup, CgroupError

    cgroup = Cgroup("t", 512, v1_root=tmp_path / "absent", v2_root=v2_root(tmp_path))
    write(cgroup.path, memory__current=str(300 * MB), memory__peak=str(310 * MB))
    with pytest.raises(CgroupError, match="oom_kill"):
        cgroup.final_figures()


def test_no_memory_controller_means_no_cgroup(tmp_path):
    from devtools.cgroups import Cgroup

    cgroup = Cgroup("t", 512, v1_root=tmp_path / "absent", v2_root=v2_root(tmp_path, controllers="cpu io"))
    assert not cgroup.enabled and cgroup.wrap(["gunicorn"]) == ["gunicorn"]
    assert cgroup.final_figures()["cgroup"] is False


@pytest.mark.parametrize("samples", [[], [{"pss_mb": 10.0}, {"pss_mb": None}]], ids=["no samples", "one without"])
def test_a_peak_over_missing_figures_raises_instead_of_reading_zero(samples):
    from devtools.sampler import strict_peak

    with pytest.raises(ValueError, match="pss_mb"):
        strict_peak(samples, "pss_mb")


def test_a_peak_is_the_largest_sample():
    from devtools.sampler import strict_peak

    assert strict_peak([{"pss_mb": 10.0}, {"pss_mb": 12.5}, {"pss_mb": 11.0}], "pss_mb") == 12.5


def test_bench_sampler_reads_again_when_a_worker_exits_mid_sweep(monkeypatch):
    # A sweep that reads worker 3 before it exits and worker 2 after would count the weights' pages
    # twice over (3's old share and 2's new, larger one): the sampler keeps only a sweep of a tree that
    # did not change while it was read.
    from types import SimpleNamespace

    from devtools import sampler

    trees = iter([[1, 2, 3], [1, 2], [1, 2], [1, 2]])  # before and after each sweep: 3 exits during the first
    pss = {1: 40, 2: 150, 3: 60}
    monkeypatch.setattr(sampler.memory, "process_tree", lambda root: next(trees))
    monkeypatch.setattr(sampler.memory, "read_processes", lambda pids: [
        memory.ProcessMemory(p, 200 * MB, pss[p] * MB, 10 * MB, "smaps_rollup") for p in pids])
    sample = sampler.Sampler(1, SimpleNamespace(figures=lambda: None)).take()
    assert (sample["pids"], sample["pss_mb"]) == (2, 190.0), sample


def test_threads_ending_past_the_bound_together_recycle_the_worker_once(monkeypatch, tmp_path):
    import logging
    import threading
    from types import SimpleNamespace

    from monitoring import hooks

    count = []
    together = threading.Barrier(8)

    def read_process(pid=None, proc="/proc"):
        together.wait(timeout=30)  # every thread has passed the alive check before any decides
        return memory.ProcessMemory(1, 400 * MB, 300 * MB, 200 * MB, "smaps_rollup")

    monkeypatch.setattr(hooks, "_state", {})
    monkeypatch.setattr(hooks, "PRIVATE_READING_MAX_AGE", 0)
    monkeypatch.setattr(hooks.memory, "private_bound", lambda pid=None: 400 * MB)
    monkeypatch.setattr(hooks.memory, "read_process", read_process)
    monkeypatch.setattr(hooks, "_recycle", lambda worker, *args: (count.append(1), setattr(worker, "alive", False)))
    settings = SimpleNamespace(max_worker_memory_mb=150, memory_trim_interval=0, shared_folder=str(tmp_path))
    worker = SimpleNamespace(alive=True, nr=1, log=logging.getLogger("worker"))
    threads = [threading.Thread(target=hooks.after_request, args=(worker, settings)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not worker.alive and len(count) == 1, count
    os.close(hooks._state["recycle_turn"])  # this test process is not exiting: let go of the turn


# --- Freed heap pages handed back --------------------------------------------------------------------

# Freed pieces of glibc's heap between live ones stay resident until malloc_trim: a burst's leftovers.
FRAGMENTED = """
import ctypes, json
from monitoring import memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
pieces = [libc.malloc(4000) for _ in range(20000)]  # 80 MB in pieces below the mmap threshold
for piece in pieces[:-1]:
    ctypes.memset(piece, 1, 4000)  # written: resident
for i, piece in enumerate(pieces[:-1]):
    if i % 16:
        libc.free(piece)  # 15 in 16 freed; the rest, and the last, keep the heap from shrinking by itself
before = memory.read_process().private
ran = memory.release_free_heap()
print(json.dumps({"ran": ran, "before": before, "after": memory.read_process().private}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")
def test_freed_heap_pages_go_back_to_the_system():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED], capture_output=True, text=True, timeout=60, cwd=ROOT,
                         env={**os.environ, "MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ran"] and report["before"] - report["after"] > 48 * MB, report


def test_a_worker_trims_after_a_request_and_in_its_watchdog_at_most_once_an_interval(monkeypatch, tmp_path):
    import logging
    from types import SimpleNamespace

    from monitoring import hooks
    from monitoring.watchdog import MemoryWatchdog

    clock, trims = {"now": 1000.0}, []
    monkeypatch.setattr(hooks, "_state", {"private_reading": (999.5, "read before the trim")})
    monkeypatch.setattr(memory, "_last_trim", {})
    monkeypatch.setattr(hooks, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(memory, "release_free_heap", lambda: trims.append(clock["now"]) or True)
    worker = SimpleNamespace(alive=True, nr=1, log=logging.getLogger("worker"))
    settings = SimpleNamespace(max_worker_memory_mb=0, memory_trim_interval=1.0, shared_folder=str(tmp_path))
    for step in (0.0, 0.5, 0.25, 0.5, 2.0):
        clock["now"] += step
        hooks.after_request(worker, settings)
    assert trims == [1000.0, 1001.25, 1003.25], trims  # the first request, then once at least a second apart
    assert "private_reading" not in hooks._state  # a reading from before a trim is not reused
    off = SimpleNamespace(**{**vars(settings), "memory_trim_interval": 0})
    for _ in range(2):
        clock["now"] += 5
        hooks.after_request(worker, off)
    assert len(trims) == 3 and worker.alive  # 0: never
    # A worker gone idle after a burst is trimmed by its watchdog, through the same gate.
    monkeypatch.setattr(memory, "_last_trim", {})
    watchdog = MemoryWatchdog(make_settings(tmp_path, MEMORY_TRIM_INTERVAL="3600"), cgroup_root=str(tmp_path))
    watchdog.check()
    watchdog.check()
    assert len(trims) == 4


def test_without_glibc_the_trim_is_skipped_and_never_raises(monkeypatch):
    def no_libc(name):
        raise OSError(f"{name}: cannot open shared object file")

    memory._malloc_trim.cache_clear()
    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    monkeypatch.setattr(memory, "_last_trim", {})
    try:
        assert memory.release_free_heap() is False
        assert memory.release_free_heap_every(1.0, 100.0) is False
    finally:
        memory._malloc_trim.cache_clear()
