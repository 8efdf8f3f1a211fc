"""The on-call page /status (app/status.py) and the ring that feeds it (monitoring/history.py).

Unit tests for the ring's bound and format, the page's access rules, what it shows (never a secret),
and the chart's geometry; then the page in Chromium, drawn from the real samples of a gunicorn run with
two workers and recycles.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import re
import time
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from support import ROOT, Gunicorn, make_settings
from test_web import browser, wait  # noqa: F401  (the page tests' one Chromium set-up)

from app import create_app
from app.status import (NARROW, TIER_SETTINGS, WIDE, WORKER_FIGURES, build_chart, pss_sum, tier_memory_mb,
                        worker_figure)
from monitoring import history
from monitoring.history import FILE_NAME, HEADER_SIZE, SLOT_SIZE, Record, Ring

# --- the ring ------------------------------------------------------------------------------------


def test_the_ring_never_grows_and_keeps_the_newest_records(tmp_path):
    ring = Ring(tmp_path / "r", slots=16)
    for n in range(16 * 10 + 3):
        ring.append({"kind": "sample", "pid": 1, "n": n}, now=1000.0 + n)
        assert os.path.getsize(ring.path) == HEADER_SIZE + 16 * SLOT_SIZE, f"grew after record {n}"
    kept = ring.read()
    assert [r.data["n"] for r in kept] == list(range(16 * 9 + 3, 16 * 10 + 3))  # the 16 newest, oldest first
    assert [r.time for r in kept] == [1000.0 + r.data["n"] for r in kept]
    assert ring.read(since=1000.0 + 16 * 10) == kept[-3:]


def test_a_ring_of_another_size_or_format_starts_over(tmp_path):
    path = tmp_path / "r"
    Ring(path, slots=8).append({"kind": "sample", "pid": 1})
    bigger = Ring(path, slots=32)
    assert bigger.read() == []  # another geometry is not misread as this one
    bigger.append({"kind": "sample", "pid": 2})
    assert os.path.getsize(path) == bigger.size and [r.pid for r in bigger.read()] == [2]
    path.write_bytes(b"garbage" * 100)
    assert bigger.read() == []
    bigger.append({"kind": "recycle", "pid": 3})
    assert [r.kind for r in bigger.read()] == ["recycle"]


def test_a_record_too_long_for_its_slot_loses_its_longest_figures_never_kind_or_pid(tmp_path):
    ring = Ring(tmp_path / "r", slots=4)
    ring.append({"huge": "x" * SLOT_SIZE, "kind": "sample", "pid": 7, "small": 1})
    ring.append({"kind": "k" * 300, "pid": 8, "note": "n" * 250})
    assert [r.data for r in ring.read()] == [{"kind": "sample", "pid": 7, "small": 1}, {"kind": "k" * 300, "pid": 8}]


def test_records_are_keyed_so_new_figures_need_no_format_change(tmp_path):
    ring = Ring(tmp_path / "r", slots=4)
    ring.append({"kind": "sample", "pid": 1, "process_rss_mb": 80.5, "process_pss_mb": 41.0, "later_mb": 3})
    assert ring.read()[0].data == {"kind": "sample", "pid": 1, "process_rss_mb": 80.5, "process_pss_mb": 41.0,
                                   "later_mb": 3}


def _writer(path: str, pid: int, count: int) -> None:
    ring = Ring(path, slots=64)
    for n in range(count):
        ring.append({"kind": "sample", "pid": pid, "n": n})


def test_workers_writing_at_once_lose_no_record_and_tear_none(tmp_path):
    path = str(tmp_path / "r")
    procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, pid, 25)) for pid in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    kept = Ring(path, slots=64).read()
    assert [r.seq for r in kept] == list(range(1, 51))
    for pid in (1, 2):  # each writer's records in its own order
        assert [r.data["n"] for r in kept if r.pid == pid] == list(range(25))


def test_recording_without_a_shared_folder_or_with_a_broken_one_never_raises(tmp_path, caplog):
    settings = make_settings(tmp_path)
    assert settings.prometheus_multiproc_dir == ""
    history.record_event(settings, "recycle", 1)
    assert history.read(settings) == []
    broken = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "missing" / "folder"))
    history.record_sample(broken, {"pid": 1, "process_rss_mb": 1.0})
    assert "could not record sample" in caplog.text


def test_the_ring_is_not_read_as_prometheus_metrics(tmp_path):
    # prometheus_client's multiprocess collector reads every *.db file of the folder.
    assert not FILE_NAME.endswith(".db")


# --- the watchdog and the recycle hook feed it ---------------------------------------------------


def test_each_watchdog_sample_and_alert_lands_in_the_ring(tmp_path):
    from monitoring.watchdog import MemoryWatchdog

    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), MAX_MEMORY_MB="16")
    watchdog = MemoryWatchdog(settings)
    assert watchdog.check(now=1.0) == ["instance"]  # any Python process is above 16 MB
    watchdog.check(now=2.0)
    records = history.read(settings)
    assert [r.kind for r in records] == ["sample", "alert", "sample"]
    assert records[0].data["process_rss_mb"] > 16 and records[0].pid == os.getpid()
    assert records[1].data["subject"] == "instance"


def test_a_recycled_worker_leaves_a_recycle_event(tmp_path):
    from monitoring import hooks

    class Worker:
        alive, nr = True, 7

        class log:
            @staticmethod
            def warning(*args):
                pass

    settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path), MAX_WORKER_MEMORY_MB="1")
    worker = Worker()
    hooks.after_request(worker, settings)
    (event,) = history.read(settings)
    assert not worker.alive and event.kind == "recycle" and event.pid == os.getpid()
    assert event.data["rss_mb"] > 1 and event.data["limit_mb"] == 1


# --- access --------------------------------------------------------------------------------------


def status_app(tmp_path, **env):
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    return create_app(make_settings(tmp_path, **env))


def basic(user: str, password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


PRODUCTION = {"APP_ENV": "production", "SECRET_KEY": "s" * 32}


@pytest.mark.parametrize("env, headers, status, code", [
    ({"APP_ENV": "development"}, {}, 200, None),
    ({"APP_ENV": "development", "STATUS_PAGE": "off"}, {}, 404, "status_page_off"),
    ({**PRODUCTION, "STATUS_PAGE": "off", "WRITE_TOKEN": "t0ken"}, {"Authorization": "Bearer t0ken"}, 404,
     "status_page_off"),
    (PRODUCTION, {}, 403, "status_closed"),
    (PRODUCTION, {"Authorization": "Bearer anything"}, 403, "status_closed"),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, {}, 401, "unauthorized"),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, basic("oncall", "wrong"), 401, "unauthorized"),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, {"Authorization": "Basic !!!not-base64"}, 401, "unauthorized"),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, {"Authorization": "Bearer t0ken"}, 200, None),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, basic("oncall", "t0ken"), 200, None),
    ({**PRODUCTION, "WRITE_TOKEN": "t0ken"}, basic("", "t0ken"), 200, None),
])
def test_who_may_read_the_status_page(tmp_path, env, headers, status, code):
    response = status_app(tmp_path, **env).test_client().get("/status", headers=headers)
    assert response.status_code == status, response.get_data(as_text=True)
    if code:
        assert response.get_json()["error"]["code"] == code
    if status == 401:  # the browser's own login prompt: on call with nothing but a phone
        assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_the_page_answers_while_the_database_is_not_ready(tmp_path):
    # The on-call page is most needed when the database is away: it reads only the ring.
    app = status_app(tmp_path, DATABASE_URL=f"sqlite:///{tmp_path / 'never-released.sqlite3'}")
    assert app.test_client().get("/search?q=x").status_code == 503
    assert app.test_client().get("/status").status_code == 200


# --- what the page shows -------------------------------------------------------------------------


class Elements(HTMLParser):
    """Every start tag of a page as (tag, attributes), and its text."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def classed(self, tag: str, *classes: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and set(classes) <= set(a.get("class", "").split())]


def feed(settings, records):
    ring = history.ring(settings)
    for when, data in records:
        ring.append(data, now=when)


def test_the_page_shows_no_secret(tmp_path):
    secrets = {"SECRET_KEY": "secret-key-0123456789", "WRITE_TOKEN": "write-token-0123456789",
               "SENTRY_DSN": "https://sentry-key-0123@o1.ingest.sentry.io/9",
               "DATABASE_URL": f"sqlite:///{tmp_path / 'db-password-0123.sqlite3'}"}
    app = status_app(tmp_path, **secrets)
    page = app.test_client().get("/status").get_data(as_text=True)
    for name, value in secrets.items():
        for part in re.findall(r"[\w-]{8,}", value):
            if "0123" in part:
                assert part not in page, f"{name} shown on /status"


def test_the_tier_settings_shown_are_those_tiers_yaml_sets():
    import yaml

    from app.settings import FIELDS

    tiers = yaml.safe_load((ROOT / "deploy" / "tiers.yaml").read_text())["tiers"]
    fields = {f.env for f in FIELDS}
    set_per_tier = {name for tier in tiers.values() for name in tier["env"] if name in fields}
    assert set_per_tier <= set(TIER_SETTINGS), sorted(set_per_tier - set(TIER_SETTINGS))
    assert not {f.env for f in FIELDS if f.secret} & set(TIER_SETTINGS)


@pytest.mark.parametrize("tier", ["512mb", "1gb", "512mb-remote"])
def test_a_tier_line_is_the_memory_tiers_yaml_gives_the_tier(tier):
    import yaml

    tiers = yaml.safe_load((ROOT / "deploy" / "tiers.yaml").read_text())["tiers"]
    assert tier_memory_mb(tier) == tiers[tier]["memory_mb"]


def test_the_page_draws_samples_thresholds_and_events_with_no_inline_script_or_style(tmp_path):
    app = status_app(tmp_path, MEMORY_TIER="1gb", MAX_MEMORY_MB="900", MAX_WORKER_MEMORY_MB="600",
                     SEMANTIC_MODEL="/nonexistent/model")
    settings = app.extensions["memfit"].settings
    now = time.time()
    feed(settings, [(now - 100 + i, {"kind": "sample", "pid": pid, "process_rss_mb": 100.0 + pid + i,
                                     "container_working_set_mb": 300.0 + i})
                    for i in range(0, 60, 10) for pid in (11, 12)])
    feed(settings, [(now - 50, {"kind": "recycle", "pid": 11, "rss_mb": 612.0, "limit_mb": 600}),
                    (now - 40, {"kind": "alert", "pid": 12, "subject": "container"}),
                    (now - 7200, {"kind": "recycle", "pid": 10})])  # older than an hour: not drawn
    page = app.test_client().get("/status").get_data(as_text=True)
    html = Elements(page)
    for geometry in ("wide", "narrow"):
        assert [a for t, a in html.tags if t == "svg" and a.get("id") == f"chart-{geometry}"]
    assert {a["data-pid"] for a in html.classed("g", "series", "worker")} == {"11", "12"}
    assert len(html.classed("g", "series", "instance")) == 2  # once per drawing
    assert {a["data-mb"] for a in html.classed("g", "threshold")} == {"900", "600", "1024"}
    assert [a["data-pid"] for a in html.classed("g", "event", "recycle")] == ["11", "11"]
    assert [a["data-pid"] for a in html.classed("g", "event", "alert")] == ["12", "12"]
    assert "rss_mb=612.0" in page
    assert "not_loaded" in page and "/nonexistent/model" in page  # the model state of the worker answering
    # The CSP (default-src 'self') allows no inline script or style: the page must not need any.
    assert not [t for t, a in html.tags if t == "script"]
    assert not [(t, a) for t, a in html.tags if "style" in a or any(k.startswith("on") for k in a)]
    assert "<style" not in page


def test_without_a_shared_folder_the_page_says_why_there_is_no_history(tmp_path):
    app = create_app(make_settings(tmp_path))
    page = app.test_client().get("/status").get_data(as_text=True)
    assert 'id="no-history"' in page and "PROMETHEUS_MULTIPROC_DIR" in page


# --- the chart's geometry ------------------------------------------------------------------------


def rec(when, **data):
    return Record(0, when, data)


def test_values_and_lines_land_where_they_should(tmp_path):
    settings = make_settings(tmp_path, MEMORY_TIER="512mb", MAX_MEMORY_MB="450", MAX_WORKER_MEMORY_MB="400")
    now = 10_000.0
    records = [rec(now - 600, kind="sample", pid=5, process_rss_mb=0.0, container_working_set_mb=0.0),
               rec(now, kind="sample", pid=5, process_rss_mb=250.0, container_working_set_mb=500.0),
               rec(now - 300, kind="recycle", pid=5)]
    chart = build_chart(records, settings, now, WIDE)
    g = WIDE

    def y(mb):
        return round(g.bottom - mb / chart.top_mb * (g.bottom - g.top), 1)

    assert chart.top_mb >= 512 and chart.start == now - 600  # a young instance: from its first record
    lines = {line.key: line.y for line in chart.lines}
    assert lines == {"alert": y(450), "recycle": y(400), "tier": y(512)}
    (instance,) = [s for s in chart.series if s.key == "instance"]
    assert instance.svg_points == f"{g.left:.1f},{y(0)} {g.right:.1f},{y(500)}"
    (marker,) = chart.markers
    assert marker.x == round((g.left + g.right) / 2, 1) and marker.kind == "recycle"
    assert all(g.left <= x <= g.right for x, _ in chart.x_ticks)


def test_threshold_labels_close_together_do_not_overlap(tmp_path):
    settings = make_settings(tmp_path, MEMORY_TIER="custom", MAX_MEMORY_MB="110", MAX_WORKER_MEMORY_MB="100")
    chart = build_chart([rec(1.0, kind="sample", pid=1, process_rss_mb=60.0, container_limit_mb=512.0)],
                        settings, 2.0)
    labels = sorted(line.label_y for line in chart.lines)
    assert [line.key for line in sorted(chart.lines, key=lambda line: line.y)] == ["tier", "alert", "recycle"]
    assert all(b - a >= 13 for a, b in zip(labels, labels[1:])), labels
    assert all(line.label_y >= line.y for line in chart.lines)


def test_the_chart_covers_one_hour_at_most(tmp_path):
    settings = make_settings(tmp_path)
    now = 100_000.0
    records = [rec(now - t, kind="sample", pid=1, process_rss_mb=1.0) for t in (7200, 3601, 3000, 10)]
    chart = build_chart(records, settings, now, NARROW)
    assert chart.start == now - 3000 and [len(s.points) for s in chart.series] == [2]
    assert 1 <= len(chart.x_ticks) <= NARROW.x_ticks
    young = build_chart(records[-1:], settings, now, NARROW)
    assert young.start == now - 60  # a minute at least, so that one sample is not a zero-width chart


def test_a_custom_tier_draws_the_containers_limit_when_it_has_one(tmp_path):
    settings = make_settings(tmp_path, MEMORY_TIER="custom")
    sample = {"kind": "sample", "pid": 1, "process_rss_mb": 50.0}
    assert "tier" not in {line.key for line in build_chart([rec(1.0, **sample)], settings, 2.0).lines}
    chart = build_chart([rec(1.0, **sample, container_limit_mb=768.0)], settings, 2.0)
    assert [line.mb for line in chart.lines if line.key == "tier"] == [768.0]
    assert "tier" not in {line.key for line in
                          build_chart([rec(1.0, **sample)], settings.replace(max_worker_memory_mb=0), 2.0).lines}


def test_a_figure_that_is_not_a_number_is_not_drawn(tmp_path):
    settings = make_settings(tmp_path)
    records = [rec(1.0, kind="sample", pid=1, process_rss_mb=float("nan"), container_working_set_mb="12"),
               rec(2.0, kind="sample", pid=1, process_rss_mb=True),
               rec(3.0, kind="sample", pid=1, process_rss_mb=50.0)]
    (series,) = build_chart(records, settings, 4.0).series
    assert series.pid == 1 and series.points == [(3.0, 50.0)]


def test_private_memory_is_drawn_once_the_sampler_reports_it():
    rss_only = [rec(1.0, kind="sample", pid=1, process_rss_mb=90.0)]
    assert worker_figure(rss_only) == ("process_rss_mb", "RSS")
    assert worker_figure(rss_only + [rec(2.0, kind="sample", pid=1, process_rss_mb=90.0,
                                         process_private_mb=40.0)]) == WORKER_FIGURES[0]


def test_the_pss_sum_adds_live_workers_and_forgets_ended_ones():
    samples = [rec(0.0, kind="sample", pid=1, process_pss_mb=100.0),
               rec(1.0, kind="sample", pid=2, process_pss_mb=50.0),
               rec(2.0, kind="sample", pid=1, process_pss_mb=110.0),
               rec(9.0, kind="sample", pid=3, process_pss_mb=70.0)]  # 1 and 2 silent for 7 s: ended
    assert pss_sum(samples, stale_after=5.0) == [(0.0, 100.0), (1.0, 150.0), (2.0, 160.0), (9.0, 70.0)]
    assert pss_sum([rec(0.0, kind="sample", pid=1, process_rss_mb=1.0)], 5.0) == []


# --- in Chromium, from a real gunicorn run ---------------------------------------------------------


@pytest.mark.browser
def test_the_chart_of_a_real_run_with_two_workers_and_recycles(tmp_path, browser):
    """gunicorn with two workers sampled every 0.2 s, each recycled after its first request (its private
    memory is above MAX_WORKER_MEMORY_MB from the start) and above MAX_MEMORY_MB too, so alerts fire: the page
    draws what the workers really wrote."""
    from selenium.webdriver.common.by import By

    env = {"WEB_CONCURRENCY": "2", "MEMORY_CHECK_INTERVAL": "0.2", "MAX_MEMORY_MB": "40",
           "MAX_WORKER_MEMORY_MB": "4", "MEMORY_TIER": "512mb", "APP_ENV": "development",
           "GUNICORN_MAX_REQUESTS": "0"}
    with Gunicorn(tmp_path, env) as g:
        ring = Ring(Path(g.env["PROMETHEUS_MULTIPROC_DIR"]) / FILE_NAME, slots=1024)

        def until(condition, what):
            deadline = time.monotonic() + 90
            while not condition(ring.read()):
                assert time.monotonic() < deadline, f"{what}: {ring.read()[-20:]}"
                time.sleep(0.2)

        def sampled(records):
            return Counter(r.pid for r in records if r.kind == "sample")

        # The start-up check's /healthz recycled the worker that answered it, maybe before its first
        # sample. Once two workers have been sampled a few times, one more request recycles a worker
        # whose line is drawn, and its replacement starts a third line.
        until(lambda records: sum(n >= 3 for n in sampled(records).values()) >= 2, "two workers sampled")
        g.get("/healthz")
        until(lambda records: len(sampled(records)) >= 3 and {r.pid for r in records if r.kind == "recycle"}
              & {pid for pid, n in sampled(records).items() if n >= 3}, "a sampled worker recycled, a third sampled")
        recycled = {str(r.pid) for r in ring.read() if r.kind == "recycle"}
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        browser.get(g.url + "/status")
        wait(browser).until(lambda d: d.find_elements(By.ID, "chart-wide"), "no chart")
        chart = browser.find_element(By.ID, "chart-wide")
        assert chart.is_displayed() and not browser.find_element(By.ID, "chart-narrow").is_displayed()
        drawn = browser.execute_script(
            "const svg = arguments[0];"
            "return {workers: Array.from(svg.querySelectorAll('g.series.worker'), (e) => e.dataset.pid),"
            " lengths: Array.from(svg.querySelectorAll('g.series.worker polyline'), (e) => e.getTotalLength()),"
            " recycles: Array.from(svg.querySelectorAll('g.event.recycle'), (e) => e.dataset.pid),"
            " alerts: svg.querySelectorAll('g.event.alert').length,"
            " thresholds: Array.from(svg.querySelectorAll('g.threshold'), (e) => e.getAttribute('class')),"
            " markerBox: Array.from(svg.querySelectorAll('g.event.recycle path'),"
            "                       (e) => e.getBBox().width)}", chart)
        severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert len(drawn["workers"]) >= 3, drawn
    assert any(length > 0 for length in drawn["lengths"]), f"no worker drawn as a line: {drawn}"
    # A recycle marker, drawn, for a worker whose line is drawn too.
    assert set(drawn["recycles"]) & recycled & set(drawn["workers"]), drawn
    assert drawn["markerBox"] and all(w > 0 for w in drawn["markerBox"]), drawn
    assert drawn["alerts"] >= 1, drawn
    assert sorted(drawn["thresholds"]) == ["threshold alert", "threshold recycle", "threshold tier"]
    assert not severe, severe  # the strict CSP holds: Chromium logs any blocked inline script or style
