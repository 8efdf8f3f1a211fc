"""Ops faults: a worker's exit never waits long on a hanging Sentry, gunicorn's timeouts are
counted as timeouts, the metric files stay bounded with totals intact, the metrics folder lives and dies
with the master, and a failing master-side hook never stops the master."""

from __future__ import annotations

import glob
import logging
import os
import re
import runpy
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from fake_sentry import FakeSentry
from support import ROOT, Gunicorn, make_settings, metric, venv_bin
from test_gunicorn import SEARCH, sentry_env, wait_until

from monitoring import hooks, metrics, sentry

EXIT_LINE = re.compile(r"memfit exit: worker pid=(\d+) cause=(\w+) sentry=(.*)")
GAVE_UP = re.compile(r"gave up after (\d+\.\d+)s \(budget (\d+\.\d+)s\)")


def exit_lines(log: str) -> list[tuple[int, str, str]]:
    return [(int(pid), cause, outcome) for pid, cause, outcome in EXIT_LINE.findall(log)]


# --- 1. a hanging Sentry and a worker's exit -------------------------------------------------------


def test_one_budget_bounds_the_flush_and_the_sdks_shutdown_wait(tmp_path):
    """In process: the SDK's shutdown_timeout is the budget, and close_for_exit closes the client, so the
    SDK's atexit hook (which waits shutdown_timeout again for anything pending) has nothing to wait on."""
    import sentry_sdk

    # No client at all, whatever an earlier test left (sentry.init keeps an active client as it is).
    sentry_sdk.get_global_scope().set_client(None)
    with FakeSentry(mode="hang") as fake:
        try:
            assert sentry.init(make_settings(tmp_path, SENTRY_DSN=fake.dsn))
            client = sentry_sdk.get_client()
            assert client.options["shutdown_timeout"] == sentry.EXIT_FLUSH_BUDGET_S
            sentry_sdk.capture_message("pending while Sentry hangs")
            wait_until(lambda: fake.held >= 1, "the event's POST to be held by the hanging Sentry")
            outcome = sentry.close_for_exit()
            assert client.transport is None, "the client was flushed but not closed: atexit would wait again"
        finally:
            sentry_sdk.get_global_scope().set_client(None)  # no later test reports to this fake
    found = GAVE_UP.fullmatch(outcome)
    assert found, outcome
    assert float(found.group(2)) == sentry.EXIT_FLUSH_BUDGET_S


def test_recycles_while_sentry_hangs_give_up_within_the_budget(tmp_path):
    """Real gunicorn recycling every 2 requests while every worker has a check-in stuck on a hanging
    Sentry: each replacement serves, no request fails, and each exit's log line records a flush that
    gave up after the budget, with no second wait from the SDK's atexit hook."""
    lifetimes = 3
    with FakeSentry(mode="hang") as fake:
        env = sentry_env(fake, MAX_MEMORY_MB="100000", SENTRY_CRON_MONITOR="memfit-alive",
                         GUNICORN_MAX_REQUESTS="2", GUNICORN_MAX_REQUESTS_JITTER="0")
        with Gunicorn(tmp_path, env) as g:
            statuses = []
            for lifetime in range(lifetimes):
                # This worker's first check-in is now in flight and never answered: its exit has a pending envelope.
                wait_until(lambda: fake.held >= lifetime + 1, f"worker {lifetime + 1}'s check-in to reach Sentry")
                statuses += [g.get(SEARCH)[0] for _ in range(2)]  # the second one recycles the worker
            wait_until(lambda: len(exit_lines(g.log())) >= lifetimes, f"{lifetimes} worker exits to be logged")
            statuses.append(g.get(SEARCH)[0])  # the replacement serves
            log = g.log()
    assert statuses == [200] * (2 * lifetimes + 1)
    lines = exit_lines(log)
    assert len(lines) == lifetimes, lines
    for pid, cause, outcome in lines:
        assert cause == "graceful", (pid, cause)
        found = GAVE_UP.fullmatch(outcome)
        assert found, f"worker {pid}: the flush did not give up on the hanging Sentry: {outcome}"
        waited, budget = float(found.group(1)), float(found.group(2))
        assert budget == sentry.EXIT_FLUSH_BUDGET_S
        # The recorded wait is the flush's deadline plus scheduling noise; the old exit waited 2 s here.
        assert waited < 2 * sentry.EXIT_FLUSH_BUDGET_S, f"worker {pid} waited {waited}s on Sentry"
    assert "Sentry is attempting to send" not in log, "the SDK's atexit hook waited on Sentry a second time"


# --- 2. gunicorn's timeout -------------------------------------------------------------------------


def test_a_worker_killed_by_gunicorns_timeout_is_counted_as_timeout(tmp_path):
    """A semantic request whose model manifest is a FIFO blocks in open() until the master aborts the
    worker (GUNICORN_TIMEOUT); the exit is counted `timeout`, and the replacement serves."""
    from app.semantic.encoders import ARTIFACT_MANIFEST

    model = tmp_path / "fifo-model"
    model.mkdir()
    os.mkfifo(model / ARTIFACT_MANIFEST)  # no writer ever opens it: reading blocks for good
    with Gunicorn(tmp_path, {"SEMANTIC_MODEL": str(model), "GUNICORN_TIMEOUT": "3"}) as g:
        (victim,) = g.workers()
        try:
            g.get("/search?q=%D7%A1%D7%A4%D7%A8&mode=semantic", timeout=60)
        except OSError:  # the connection dies with the worker
            pass
        wait_until(lambda: g.workers() and g.workers() != [victim], "the timed-out worker to be replaced")
        assert g.get(SEARCH)[0] == 200
        _, body = g.get("/metrics")
        log = g.log()
    text = body.decode()
    assert f"WORKER TIMEOUT (pid:{victim})" in log
    assert f"worker pid={victim} timed out" in log
    assert metric(text, "memfit_worker_exits_total", cause="timeout") == 1
    assert metric(text, "memfit_worker_exits_total", cause="graceful") == 0
    assert metric(text, "memfit_worker_exits_total", cause="killed") == 0


class FakeLog:
    def __init__(self):
        self.lines: list[str] = []

    def error(self, message, *args):
        self.lines.append(message % args)

    info = warning = error


def test_a_worker_the_master_aborted_that_left_no_marker_is_a_timeout(tmp_path):
    # Stuck in native code, the worker never ran worker_abort; the master's SIGKILL ended it.
    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m"))
    hooks.reset_metrics_dir(settings.prometheus_multiproc_dir)
    server = SimpleNamespace(log=FakeLog())
    hooks.child_exited(server, SimpleNamespace(pid=999_999_001, aborted=True), settings)
    hooks.child_exited(server, SimpleNamespace(pid=999_999_002, aborted=False), settings)
    assert "worker pid=999999001 timed out" in server.log.lines[0]
    assert "worker pid=999999002 died without a graceful exit" in server.log.lines[1]


def test_worker_exit_called_in_the_master_leaves_no_marker(tmp_path, monkeypatch):
    # arbiter.kill_worker calls worker_exit in the master for a worker that was already gone.
    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "m"))
    hooks.reset_metrics_dir(settings.prometheus_multiproc_dir)
    monkeypatch.setitem(hooks._state, "cause", None)
    hooks.worker_exiting(SimpleNamespace(pid=os.getpid() + 1, log=FakeLog()), settings)
    assert list(Path(settings.prometheus_multiproc_dir, "exits").iterdir()) == []


# --- 3. metric files stay bounded, totals stay whole -----------------------------------------------


def write_lifetime(directory: Path, pid: int, requests: int) -> None:
    """The files a worker leaves behind, written as prometheus_client writes them: its counter, its
    histogram (per-bucket values) and a live gauge."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    counter = MmapedDict(str(directory / f"counter_{pid}.db"))
    counter.write_value(mmap_key("memfit_requests", "memfit_requests_total", ["mode", "status"],
                                 ["text", "200"], "Requests."), float(requests), 0.0)
    counter.write_value(mmap_key("memfit_requests", "memfit_requests_total", ["mode", "status"],
                                 ["tags", "200"], "Requests."), 1.0, 0.0)
    counter.close()
    histogram = MmapedDict(str(directory / f"histogram_{pid}.db"))
    for le, value in (("0.1", requests - 1), ("1.0", 1), ("+Inf", 0)):
        histogram.write_value(mmap_key("memfit_seconds", "memfit_seconds_bucket", ["le"], [le], "Seconds."),
                              float(value), 0.0)
    histogram.write_value(mmap_key("memfit_seconds", "memfit_seconds_count", [], [], "Seconds."), float(requests), 0.0)
    histogram.write_value(mmap_key("memfit_seconds", "memfit_seconds_sum", [], [], "Seconds."), 0.5 * requests, 0.0)
    histogram.close()
    gauge = MmapedDict(str(directory / f"gauge_liveall_{pid}.db"))
    gauge.write_value(mmap_key("memfit_rss", "memfit_rss", [], [], "RSS."), 1e8, 0.0)
    gauge.close()
    (directory / "exits" / str(pid)).write_text("recycled")


def totals(directory: Path) -> dict[tuple, float]:
    """Every counter and histogram sample of a scrape of the folder."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    from prometheus_client import multiprocess

    multiprocess.MultiProcessCollector(registry, path=str(directory))
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            if family.type in ("counter", "histogram") for s in family.samples}


def test_two_thousand_worker_lifetimes_leave_a_bounded_set_of_files_with_the_same_totals(tmp_path):
    directory = tmp_path / "metrics"
    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))
    hooks.reset_metrics_dir(str(directory))
    server = SimpleNamespace(log=FakeLog())
    served = 0
    for n in range(2000):
        pid = 100_000 + n
        requests = 1 + n % 7
        write_lifetime(directory, pid, requests)
        served += requests
        before = totals(directory) if n % 50 == 0 or n < 5 else None
        hooks.child_exited(server, SimpleNamespace(pid=pid, aborted=False), settings)
        if before is not None:
            assert totals(directory) == before, f"lifetime {n}: folding changed the totals"
    files = sorted(os.path.basename(f) for f in glob.glob(str(directory / "*.db")))
    assert files == ["counter_archive.db", "histogram_archive.db"]
    assert list((directory / "exits").iterdir()) == []
    final = totals(directory)
    assert final[("memfit_requests_total", (("mode", "text"), ("status", "200")))] == served
    assert final[("memfit_requests_total", (("mode", "tags"), ("status", "200")))] == 2000
    assert final[("memfit_seconds_count", ())] == served
    assert final[("memfit_seconds_bucket", (("le", "+Inf"),))] == served
    assert final[("memfit_seconds_bucket", (("le", "0.1"),))] == served - 2000


def test_a_fold_waits_for_a_scrape_in_progress_and_is_retried_later(tmp_path, monkeypatch):
    """The master never folds while a scrape reads (it would see the dead worker twice or not at all),
    and a fold the lock held off is done with the next exit."""
    directory = tmp_path / "metrics"
    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(directory))
    hooks.reset_metrics_dir(str(directory))
    monkeypatch.setitem(hooks._state, "unarchived", [])
    monkeypatch.setattr(metrics, "FOLD_LOCK_WAIT_S", 0)
    server = SimpleNamespace(log=FakeLog())
    write_lifetime(directory, 200_001, 3)
    with metrics._fold_lock(str(directory), exclusive=False):  # a scrape in progress
        hooks.child_exited(server, SimpleNamespace(pid=200_001, aborted=False), settings)
        assert (directory / "counter_200001.db").exists(), "folded while a scrape was reading"
        assert totals(directory)[("memfit_seconds_count", ())] == 3
    write_lifetime(directory, 200_002, 4)
    hooks.child_exited(server, SimpleNamespace(pid=200_002, aborted=False), settings)
    assert sorted(os.path.basename(f) for f in glob.glob(str(directory / "*.db"))) == \
        ["counter_archive.db", "histogram_archive.db"]
    assert totals(directory)[("memfit_seconds_count", ())] == 7
    assert hooks._state["unarchived"] == []


def test_a_scrape_keeps_folds_out_while_it_reads(tmp_path, monkeypatch):
    directory = tmp_path / "metrics"
    hooks.reset_metrics_dir(str(directory))
    write_lifetime(directory, 300_001, 2)
    attempts = []
    real_generate = metrics.generate_latest

    def generate_and_try_a_fold(registry):  # the master's fold, arriving while this scrape reads
        attempts.append(metrics.archive_dead_process(300_001, str(directory), wait=0))
        return real_generate(registry)

    monkeypatch.setattr(metrics, "generate_latest", generate_and_try_a_fold)
    body, _ = metrics.render(str(directory))
    assert attempts == [False], "a fold ran in the middle of a scrape"
    assert b"memfit_seconds_count 2.0" in body
    assert metrics.archive_dead_process(300_001, str(directory), wait=0)  # after the scrape it goes through


def test_recycled_workers_files_are_folded_under_real_gunicorn(tmp_path):
    requests = 12
    with Gunicorn(tmp_path, {"GUNICORN_MAX_REQUESTS": "2", "GUNICORN_MAX_REQUESTS_JITTER": "0"}) as g:
        directory = Path(g.env["PROMETHEUS_MULTIPROC_DIR"])
        assert [g.get(SEARCH)[0] for _ in range(requests)] == [200] * requests

        def dead_workers_files() -> list[str]:
            alive = {str(pid) for pid in [g.proc.pid, *g.workers()]}
            return [f for f in glob.glob(str(directory / "*.db"))
                    if os.path.basename(f)[:-3].rsplit("_", 1)[1] not in alive | {"archive"}]

        wait_until(lambda: g.log().count("memfit exit:") >= requests // 2, "six recycles")
        wait_until(lambda: not dead_workers_files(), "the dead workers' files to be folded into the archive")
        _, body = g.get("/metrics")
    assert metric(body.decode(), "memfit_requests_total", mode="text", status="200") == requests
    assert os.path.exists(directory / "counter_archive.db")


# --- 4. the metrics folder lives and dies with the master ------------------------------------------


def owned_dir(pid: int) -> str:
    return os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", f"memfit-metrics-{pid}")


def test_check_config_makes_no_metrics_folder():
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.Popen([venv_bin("gunicorn"), "--check-config", "-c", "gunicorn.conf.py", "app:create_app()"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert not os.path.exists(owned_dir(proc.pid)), f"--check-config left {owned_dir(proc.pid)} behind"


def test_a_run_removes_the_metrics_folder_it_made(tmp_path):
    g = Gunicorn(tmp_path, {})
    del g.env["PROMETHEUS_MULTIPROC_DIR"]  # as in production: the master makes its own
    with g:
        made = owned_dir(g.proc.pid)
        assert os.path.isdir(made)
        assert g.get(SEARCH)[0] == 200
        assert glob.glob(os.path.join(made, "counter_*.db")), "the workers did not write their metrics there"
    assert g.proc.returncode == 0
    assert not os.path.exists(made), f"{made} was left behind at exit"


def test_a_metrics_folder_given_by_the_operator_is_kept(tmp_path):
    with Gunicorn(tmp_path, {}) as g:
        given = g.env["PROMETHEUS_MULTIPROC_DIR"]
        assert g.get(SEARCH)[0] == 200
    assert os.path.isdir(given)


def test_a_metrics_folder_that_cannot_be_made_leaves_workers_on_their_own_metrics(conf, monkeypatch):
    def read_only(path):
        raise PermissionError(13, "Read-only file system", path)

    monkeypatch.setattr(hooks, "reset_metrics_dir", read_only)
    monkeypatch.setattr(hooks, "startup_report", lambda *args: None)
    monkeypatch.setitem(conf, "schema_revision", lambda: "none")
    server = SimpleNamespace(log=FakeLog())
    conf["on_starting"](server)
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ  # workers forked from here write no files
    assert conf["settings"].prometheus_multiproc_dir == ""
    assert "no metrics folder" in server.log.lines[0] and "Read-only" in server.log.lines[0]


# --- 5. a failing hook never stops the master ------------------------------------------------------


def boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.fixture
def conf(tmp_path, monkeypatch):
    """gunicorn.conf.py's namespace, loaded as gunicorn loads it, with its process-wide effects undone."""
    from gunicorn import util

    monkeypatch.setattr(util, "write_error", util.write_error)  # the conf installs its JSON writer
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'conf.sqlite3'}")
    # run_path returns a copy of the module's globals: the hooks read (and write) the original.
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))["on_exit"].__wrapped__.__globals__


@pytest.mark.parametrize("hook, target", [
    ("child_exit", "monitoring.metrics.worker_exits"),
    ("on_starting", "monitoring.hooks.reset_metrics_dir"),
    ("on_exit", "monitoring.hooks.remove_metrics_dir"),
    ("worker_abort", "monitoring.hooks.worker_aborted"),
    ("worker_exit", "monitoring.sentry.close_for_exit"),
])
def test_a_failing_hook_is_logged_and_never_raises(conf, hook, target, tmp_path, monkeypatch, caplog):
    module, _, name = target.rpartition(".")
    if name == "worker_exits":
        monkeypatch.setattr(metrics, "worker_exits", SimpleNamespace(labels=boom))
    else:
        monkeypatch.setattr(f"{module}.{name}", boom)
    if hook == "on_exit":  # on_exit removes only a folder of its own making
        monkeypatch.setitem(conf, "owned_metrics_dir", lambda: str(tmp_path / "metrics"))
        monkeypatch.setitem(conf, "settings", make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics")))
    server = SimpleNamespace(log=FakeLog())
    worker = SimpleNamespace(pid=os.getpid(), aborted=False, log=FakeLog())
    args = {"child_exit": (server, worker), "on_starting": (server,), "on_exit": (server,),
            "worker_abort": (worker,), "worker_exit": (server, worker)}[hook]
    with caplog.at_level(logging.ERROR, logger="memfit.ops"):
        conf[hook](*args)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "memfit.ops"]
    assert errors and f"the {hook} hook failed" in errors[0].getMessage(), caplog.text
    assert errors[0].exc_info and "boom" in str(errors[0].exc_info[1])
