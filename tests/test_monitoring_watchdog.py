"""monitoring/watchdog.py: one alert per crossing, re-arming, cooldown, and never raising."""

from monitoring.watchdog import Alarm, MemoryWatchdog
from support import make_settings
from test_monitoring_memory import write

MB = 1024 * 1024


def test_alarm_fires_once_per_crossing_and_rearms_below_the_lower_mark():
    alarm = Alarm(threshold=100, rearm_below=90, cooldown=0)
    fired = [alarm.update(v, now=t) for t, v in enumerate([50, 101, 120, 150, 95, 130, 80, 110])]
    #                                                      -   fire  -    -   (no re-arm at 95)  re-arm fire
    assert fired == [False, True, False, False, False, False, False, True]


def test_alarm_cooldown_delays_a_second_alert():
    alarm = Alarm(threshold=100, rearm_below=90, cooldown=60)
    assert alarm.update(150, now=0)
    alarm.update(10, now=5)  # re-armed
    assert not alarm.update(150, now=30)  # crossing within the cooldown: held
    assert alarm.update(150, now=61)  # still above once the cooldown is over: sent


def container(tmp_path, usage_mb, limit_mb):
    root = tmp_path / "cg"
    write(root / "memory", memory__usage_in_bytes=str(usage_mb * MB), memory__limit_in_bytes=str(limit_mb * MB),
          memory__stat="total_inactive_file 0\n")
    return str(root)


def test_container_crossing_alerts_once(tmp_path):
    settings = make_settings(tmp_path, MAX_MEMORY_MB="450", MEMORY_ALERT_COOLDOWN="0")
    root = container(tmp_path, 470, 512)
    watchdog = MemoryWatchdog(settings, cgroup_root=root)
    # With a cgroup limit the instance is judged on the cgroup's working set, whatever this process holds.
    assert watchdog.check(now=1) == ["instance"]
    assert watchdog.last_sample["instance_basis"] == "cgroup_working_set"
    assert watchdog.check(now=2) == []
    write(tmp_path / "cg" / "memory", memory__usage_in_bytes=str(300 * MB))
    assert watchdog.check(now=3) == []  # below 405 MB: re-armed
    write(tmp_path / "cg" / "memory", memory__usage_in_bytes=str(480 * MB))
    assert watchdog.check(now=4) == ["instance"]
    assert watchdog.last_sample["container_limit_mb"] == 512


def test_without_a_cgroup_limit_the_pss_sum_is_judged(tmp_path):
    watchdog = MemoryWatchdog(make_settings(tmp_path, MAX_MEMORY_MB="16"), cgroup_root=str(tmp_path / "none"))
    assert watchdog.check(now=1) == ["instance"]  # any Python process's PSS is over 16 MB
    figures = watchdog.last_sample
    assert "container_usage_mb" not in figures and figures["instance_basis"] == "pss_sum"
    assert figures["instance_mb"] == figures["instance_pss_mb"] > 16


def test_a_failing_sample_never_raises(tmp_path, monkeypatch):
    watchdog = MemoryWatchdog(make_settings(tmp_path), cgroup_root=str(tmp_path))
    monkeypatch.setattr(watchdog, "sample", lambda: 1 / 0)
    assert watchdog.check() == []


def test_thread_is_named_daemon_and_restarts_after_fork(tmp_path):
    watchdog = MemoryWatchdog(make_settings(tmp_path, MEMORY_CHECK_INTERVAL="0.05"), cgroup_root=str(tmp_path))
    watchdog.ensure_running()
    thread = watchdog._thread
    assert thread.name == MemoryWatchdog.THREAD_NAME and thread.daemon and thread.is_alive()
    watchdog.ensure_running()
    assert watchdog._thread is thread  # same process: not started twice
    watchdog._pid = -1  # what a forked child sees: the parent's pid
    watchdog.ensure_running()
    assert watchdog._thread is not thread and watchdog._thread.is_alive()
    watchdog.stop()
    watchdog._thread.join(timeout=5)
    assert not watchdog._thread.is_alive()


def test_metrics_scrapes_export_figures_but_never_alert(tmp_path):
    from app import create_app
    from monitoring import metrics
    from support import metric

    app = create_app(make_settings(tmp_path, MAX_MEMORY_MB="16", MEMORY_ALERT_COOLDOWN="0"))
    before = metrics.alerts.labels(subject="process")._value.get()
    bodies = [app.test_client().get("/metrics").get_data(as_text=True) for _ in range(3)]
    assert metrics.alerts.labels(subject="process")._value.get() == before
    assert metric(bodies[-1], "memfit_worker_rss_bytes") > 16 * MB  # over the threshold, yet no alert


def test_two_threads_calling_ensure_running_start_one_watchdog(tmp_path, monkeypatch):
    import threading

    watchdog = MemoryWatchdog(make_settings(tmp_path, MEMORY_CHECK_INTERVAL="60"), cgroup_root=str(tmp_path))
    started = []
    real_start = threading.Thread.start
    # Widen the race: the first start waits (up to 1 s) for a second one, which only an unlocked check lets in.
    barrier = threading.Barrier(2, timeout=1)

    def counting_start(self):
        if self.name == MemoryWatchdog.THREAD_NAME:
            started.append(self)
            try:
                barrier.wait()  # unlocked, the second caller arrives here too; locked, it cannot
            except threading.BrokenBarrierError:
                pass
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    callers = [threading.Thread(target=watchdog.ensure_running, name=f"caller-{i}") for i in range(2)]
    for caller in callers:
        real_start(caller)
    for caller in callers:
        caller.join(timeout=10)
    watchdog.stop()
    assert len(started) == 1, f"{len(started)} watchdog threads started by two concurrent callers"
