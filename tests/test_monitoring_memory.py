"""monitoring/memory.py: cgroup v1 and v2 readers against fixture files, "no limit" included."""
import os

import pytest

from monitoring import memory

MB = memory.MB


def write(path, **files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name.replace("__", ".")).write_text(text)


@pytest.fixture
def v1(tmp_path):
    def make(limit: str, rel: str = "/docker/abc"):
        root = tmp_path / "cg"
        write(root / "memory" / rel.lstrip("/"), memory__usage_in_bytes=str(300 * MB),
              memory__limit_in_bytes=limit, memory__max_usage_in_bytes=str(350 * MB),
              memory__stat=f"cache 100\ntotal_inactive_file {40 * MB}\nrss 5\n",
              memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        proc = tmp_path / "cgroup"
        proc.write_text(f"12:cpu,cpuacct:{rel}\n9:memory:{rel}\n0::/\n")
        return memory.read_cgroup(root, proc)
    return make


def test_v1_with_a_limit(v1):
    cg = v1(str(512 * MB))
    assert (cg.version, cg.usage, cg.limit, cg.peak, cg.oom_kills) == (1, 300 * MB, 512 * MB, 350 * MB, 2)
    assert cg.working_set == 260 * MB  # usage minus inactive file cache


def test_v1_no_limit_is_none(v1):
    assert v1("9223372036854771712").limit is None


def test_v1_inside_a_container_reads_the_namespace_root(v1):
    assert v1(str(256 * MB), rel="/").limit == 256 * MB


@pytest.fixture
def v2(tmp_path):
    def make(limit: str):
        root = tmp_path / "cg2"
        write(root / "system.slice" / "app.scope", memory__current=str(200 * MB), memory__max=limit,
              memory__peak=str(220 * MB), memory__stat=f"anon 1\ninactive_file {50 * MB}\n",
              memory__events="low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
        proc = tmp_path / "cgroup2"
        proc.write_text("0::/system.slice/app.scope\n")
        return memory.read_cgroup(root, proc)
    return make


def test_v2_with_a_limit(v2):
    cg = v2(str(1024 * MB))
    assert (cg.version, cg.usage, cg.limit, cg.working_set, cg.peak, cg.oom_kills) == (
        2, 200 * MB, 1024 * MB, 150 * MB, 220 * MB, 1)


def test_v2_max_means_no_limit(v2):
    assert v2("max").limit is None


def test_no_cgroup_at_all(tmp_path):
    (tmp_path / "cgroup").write_text("")
    assert memory.read_cgroup(tmp_path / "empty", tmp_path / "cgroup") is None


def test_effective_limit_is_the_smaller_of_cgroup_and_host(v1):
    host = memory.host_total()
    assert memory.effective_limit(v1(str(512 * MB))) == min(512 * MB, host)
    assert memory.effective_limit(v1("9223372036854771712")) == host
    assert memory.effective_limit(v1(str(host * 4))) == host


def test_the_cheap_private_bound_is_above_private_memory_and_blind_to_mapped_files(tmp_path):
    """The per-request reading (/proc/PID/status) is never below Private_Dirty (this process's or another's),
    grows with written pages, and not with a file's pages mapped and read (the weights)."""
    import mmap

    from monitoring import memory

    def written(size: int) -> mmap.mmap:
        """Fresh anonymous pages, each written: private, whatever the allocator already holds (in a long
        test run malloc hands out freed memory that is resident already, and RSS would not move)."""
        pages = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            pages[offset] = 1
        return pages

    ballast = written(32 * MB)
    for pid in (None, os.getppid()):  # read a moment apart: the reading itself allocates a page or two
        assert memory.private_bound(pid) >= memory.read_process(pid).private - MB, pid
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * (64 * MB // 256))
    before = memory.private_bound(), memory.read_process().rss
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))  # every page resident here
        mapped_bound, mapped_rss = memory.private_bound(), memory.read_process().rss
    assert mapped_rss - before[1] > 60 * MB  # the file is in RSS ...
    assert mapped_bound - before[0] < 8 * MB  # ... and not in the bound
    grown = written(48 * MB)
    assert memory.private_bound() - mapped_bound > 40 * MB
    ballast.close()
    grown.close()
