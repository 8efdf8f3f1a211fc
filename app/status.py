"""The on-call page ``/status``: the instance's memory over the last hour, drawn on the server as SVG.

What it shows comes from monitoring/history.py's ring, which every worker's watchdog feeds: the
container's working set, the sum of the workers' PSS (where the kernel gives PSS: smaps_rollup), each
worker's private memory (what recycling decides on), recycle and alert events, against the
thresholds MAX_MEMORY_MB and MAX_WORKER_MEMORY_MB and the tier's memory. The chart is plain SVG with
presentation attributes and classes styled by status.css: no script, no inline style, so the strict
CSP of app/__init__.py holds.

Access: STATUS_PAGE=false turns the page off (404). With APP_ENV=production it needs the WRITE_TOKEN,
checked as writes check it (app.api.token_matches), as a Bearer token or as the password of the
browser's own login prompt (HTTP Basic, any user name), and is closed (403) when no token is set.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from flask import Blueprint, render_template, request

from monitoring import history

from .api import token_matches
from .errors import ApiError
from .settings import Settings
from .state import get_service, get_settings

bp = Blueprint("status", __name__)

WINDOW_SECONDS = 3600.0  # the chart covers the last hour, or less when the instance is younger
MIN_SPAN_SECONDS = 60.0
# The figures of a sample (monitoring/watchdog.py's MemorySampler), in order of preference: the first
# present is drawn, and labelled. The sampler reports private memory and RSS in every sample, PSS where
# the kernel gives it; RSS stands in only for a record without private memory.
WORKER_FIGURES = (("process_private_mb", "private"), ("process_rss_mb", "RSS"))
PSS_FIGURES = ("process_pss_mb",)
INSTANCE_FIGURE = "container_working_set_mb"
# Settings shown on the page: what deploy/tiers.yaml sets per tier (tests/test_status.py checks the
# list against it). Never a secret: the page is read by whoever holds the write token.
TIER_SETTINGS = ("MEMORY_TIER", "MAX_MEMORY_MB", "MAX_WORKER_MEMORY_MB", "WEB_CONCURRENCY", "GUNICORN_THREADS",
                 "REQUEST_CONCURRENCY", "GUNICORN_MAX_REQUESTS", "GUNICORN_MAX_REQUESTS_JITTER",
                 "ENABLE_SEMANTIC_SEARCH", "SEMANTIC_MODEL",
                 "SEMANTIC_WARM", "SEMANTIC_MAX_INFLIGHT", "SEMANTIC_DEADLINE_MS", "SEMANTIC_BATCH_MAX",
                 "SEMANTIC_HANDLERS", "SEMANTIC_EMBEDDER", "SEMANTIC_BACKEND", "SEMANTIC_REMOTE_PROTOCOL",
                 "SEMANTIC_REMOTE_QUERY_PROMPT", "SEMANTIC_REMOTE_PASSAGE_PROMPT", "SEMANTIC_REMOTE_CONNECT_TIMEOUT",
                 "SEMANTIC_REMOTE_READ_TIMEOUT", "SEMANTIC_REMOTE_RETRIES", "SEMANTIC_REMOTE_BREAKER_FAILURES",
                 "SEMANTIC_REMOTE_BREAKER_COOLDOWN",
                 "SEMANTIC_MAX_SEQ_LENGTH", "SEMANTIC_THREADS", "SEMANTIC_INDEX_MAX_MB", "EMBEDDING_BATCH_SIZE",
                 "SQLALCHEMY_POOL_SIZE", "SQLALCHEMY_MAX_OVERFLOW", "MEMORY_CHECK_INTERVAL", "STATUS_HISTORY_SLOTS")
# Events the page names; any other kind recorded through monitoring.history.record_event is marked
# under its own name.
EVENT_LABELS = {"recycle": "מיחזור", "alert": "התראה", "killed": "נהרג", "timeout": "פג זמן", "exit": "יציאה"}

LABEL_GAP = 13  # least distance between two threshold labels' baselines, in SVG units
WORKER_COLOURS = 6  # worker lines cycle through CSS classes w0..w5


# --- access ------------------------------------------------------------------------------------


@bp.before_request
def _guard():
    settings = get_settings()
    if not settings.status_page:
        raise ApiError(404, "status_page_off", "the status page is turned off on this instance (STATUS_PAGE=false)")
    if settings.app_env != "production":
        return None
    if not settings.write_token:
        raise ApiError(403, "status_closed", "the status page is closed on this instance: WRITE_TOKEN is not "
                       "configured (APP_ENV=production)")
    if not token_matches(_given_token(), settings.write_token):
        raise ApiError(401, "unauthorized", "the status page needs the write token: Authorization: Bearer "
                       "<WRITE_TOKEN>, or the token as the password of the login prompt",
                       {"WWW-Authenticate": 'Basic realm="memfit status", charset="UTF-8"'})
    return None


def _given_token() -> str:
    """The token the request offers: a Bearer token, or the password of Basic credentials ("" if none)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer":
        return value
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            return ""
        return decoded.partition(":")[2]
    return ""


# --- the chart, as data the template draws -----------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A horizontal threshold line."""

    key: str
    label: str  # the legend's words (Hebrew)
    setting: str  # what sets it, shown left-to-right beside the label
    short: str  # beside the line, in the chart's margin
    mb: float
    y: float = 0.0
    label_y: float = 0.0  # the label's baseline: below the line's, and clear of the label above it


@dataclass
class Series:
    key: str
    label: str
    css: str
    points: list[tuple[float, float]] = field(default_factory=list)  # (time, MB)
    pid: int | None = None
    svg_points: str = ""
    last: tuple[float, float] | None = None  # where the series ends, in SVG units


@dataclass(frozen=True)
class Marker:
    kind: str
    label: str
    time: float
    pid: int | None
    detail: str
    x: float


@dataclass(frozen=True)
class Geometry:
    """A chart's size in SVG user units and its margins (the SVG scales to the page's width)."""

    name: str
    width: int
    height: int
    margins: tuple[int, int, int, int]  # left (MB labels), right (threshold labels), top, bottom (times)
    x_ticks: int  # at most this many time labels

    @property
    def left(self) -> int:
        return self.margins[0]

    @property
    def right(self) -> int:
        return self.width - self.margins[1]

    @property
    def top(self) -> int:
        return self.margins[2]

    @property
    def bottom(self) -> int:
        return self.height - self.margins[3]


# Drawn twice, status.css showing one: a phone gets a chart drawn for its width, whose 12-unit text
# stays readable, rather than the desktop chart shrunk to half.
WIDE = Geometry("wide", 800, 380, (52, 150, 14, 34), 6)
NARROW = Geometry("narrow", 380, 320, (36, 78, 14, 34), 4)
GEOMETRIES = (WIDE, NARROW)


@dataclass
class Chart:
    geometry: Geometry
    start: float
    end: float
    top_mb: float
    series: list[Series]
    lines: list[Line]
    markers: list[Marker]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    worker_figure: str


def tier_memory_mb(tier: str) -> int | None:
    """The memory of a named tier ("512mb" -> 512, "1gb" -> 1024, "512mb-remote" -> 512); None for "custom"."""
    match = re.fullmatch(r"(\d+)(mb|gb)(-[a-z]+)?", tier)  # "512mb-remote": a 512 MB variant
    if not match:
        return None
    return int(match.group(1)) * (1024 if match.group(2) == "gb" else 1)


def _first(data: dict, keys) -> float | None:
    for key in keys:
        value = data.get(key)
        # A figure the page cannot place (text, true/false, NaN from a failed read) is not drawn.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def worker_figure(samples: list[history.Record]) -> tuple[str, str]:
    """The per-worker figure to draw (key, label): the most preferred one any sample reports."""
    for key, label in WORKER_FIGURES:
        if any(key in r.data for r in samples):
            return key, label
    return WORKER_FIGURES[-1]


def pss_sum(samples: list[history.Record], stale_after: float) -> list[tuple[float, float]]:
    """At each sample, the sum of every live worker's latest PSS (a worker silent for stale_after
    seconds has ended); [] when the sampler reports no PSS."""
    latest: dict[int, tuple[float, float]] = {}
    points = []
    for record in samples:
        pss = _first(record.data, PSS_FIGURES)
        if pss is None or record.pid is None:
            continue
        latest[record.pid] = (record.time, pss)
        points.append((record.time, sum(v for t, v in latest.values() if record.time - t <= stale_after)))
    return points


def _nice_step(span: float, most: int, steps) -> float:
    for step in steps:
        if span / step <= most:
            return step
    return steps[-1]


def _y_step(top: float) -> float:
    magnitude = 10 ** math.floor(math.log10(max(top, 1.0)))
    for factor in (0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10):
        if top / (factor * magnitude) <= 6:
            return factor * magnitude
    return 10 * magnitude


def _clock(t: float, seconds: bool) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S" if seconds else "%H:%M")


def build_chart(records: list[history.Record], settings: Settings, now: float, geometry: Geometry = WIDE) -> Chart:
    """The chart of the records of the last hour: series, threshold lines, event markers, axes."""
    start = now - WINDOW_SECONDS
    records = [r for r in records if start <= r.time <= now]
    if records:
        start = max(start, min(r.time for r in records))
    start = min(start, now - MIN_SPAN_SECONDS)
    samples = [r for r in records if r.kind == "sample"]

    instance = Series("instance", "זיכרון המופע (cgroup working set)", "instance")
    instance.points = [(r.time, v) for r in samples if (v := _first(r.data, (INSTANCE_FIGURE,))) is not None]
    pss = Series("pss", "סכום PSS של העובדים", "pss", pss_sum(samples, 2.5 * settings.memory_check_interval))
    figure_key, figure_label = worker_figure(samples)
    workers: dict[int, Series] = {}
    for record in samples:
        value = _first(record.data, (figure_key,))
        if value is None or record.pid is None:
            continue
        if record.pid not in workers:
            workers[record.pid] = Series(f"worker-{record.pid}", f"עובד {record.pid} ({figure_label})",
                                         f"worker w{len(workers) % WORKER_COLOURS}", pid=record.pid)
        workers[record.pid].points.append((record.time, value))
    series = [s for s in (instance, pss, *workers.values()) if s.points]

    lines = [Line("alert", "סף התראה", f"MAX_MEMORY_MB = {settings.max_memory_mb} MB",
                  f"התראה {settings.max_memory_mb}", settings.max_memory_mb)]
    if settings.max_worker_memory_mb:
        lines.append(Line("recycle", "סף מיחזור עובד", f"MAX_WORKER_MEMORY_MB = {settings.max_worker_memory_mb} MB",
                          f"מיחזור {settings.max_worker_memory_mb}", settings.max_worker_memory_mb))
    tier_mb = tier_memory_mb(settings.memory_tier)
    if tier_mb is not None:
        lines.append(Line("tier", "זיכרון השכבה", f"MEMORY_TIER = {settings.memory_tier}: {tier_mb} MB",
                          f"שכבה {tier_mb}", tier_mb))
    else:  # a custom tier: the container's own limit, when it has one
        limits = [v for r in samples if (v := _first(r.data, ("container_limit_mb",))) is not None]
        if limits:
            lines.append(Line("tier", "מגבלת הקונטיינר", f"cgroup: {limits[-1]:.0f} MB", f"מגבלה {limits[-1]:.0f}",
                              limits[-1]))

    peak = max([v for s in series for _, v in s.points] + [line.mb for line in lines] + [1.0])
    step = _y_step(peak * 1.05)
    top_mb = math.ceil(peak * 1.05 / step) * step
    chart = Chart(geometry, start, now, top_mb, series, [], [], [], [], figure_label)
    g = geometry

    def x(t: float) -> float:
        return round(g.left + (t - start) / (now - start) * (g.right - g.left), 1)

    def y(mb: float) -> float:
        return round(g.bottom - mb / top_mb * (g.bottom - g.top), 1)

    for s in series:
        s.svg_points = " ".join(f"{x(t)},{y(v)}" for t, v in s.points)
        s.last = (x(s.points[-1][0]), y(s.points[-1][1]))
    placed, below = [], -math.inf
    for line in sorted(lines, key=lambda line: -line.mb):  # top of the chart first
        below = max(y(line.mb) + 4, below + LABEL_GAP)
        placed.append(dataclasses.replace(line, y=y(line.mb), label_y=below))
    chart.lines = placed
    for record in records:
        if record.kind == "sample":
            continue
        detail = ", ".join(f"{k}={v}" for k, v in record.data.items() if k not in ("kind", "pid"))
        chart.markers.append(Marker(record.kind, EVENT_LABELS.get(record.kind, record.kind), record.time,
                                    record.pid, detail, x(record.time)))
    x_step = _nice_step(now - start, g.x_ticks, (10, 15, 30, 60, 120, 300, 600, 900, 1200, 1800))
    first_tick = math.ceil(start / x_step) * x_step
    chart.x_ticks = [(x(t), _clock(t, x_step < 60)) for t in _frange(first_tick, now, x_step)]
    chart.y_ticks = [(y(v), f"{v:g}") for v in _frange(0, top_mb, step)]
    return chart


def _frange(first: float, last: float, step: float) -> list[float]:
    count = int((last - first) // step) + 1
    return [first + i * step for i in range(max(count, 0))]


# --- the page ----------------------------------------------------------------------------------


def tier_settings(settings: Settings) -> list[tuple[str, str]]:
    """(variable, value) for each of TIER_SETTINGS, as the instance runs with it."""
    return [(name, str(getattr(settings, name.lower()))) for name in TIER_SETTINGS]


def worker_rows(chart: Chart) -> list[dict]:
    """One row per worker seen in the window: first and last sample, latest figure, how it ended."""
    ended = {m.pid: m.label for m in chart.markers if m.kind == "recycle"}
    rows = []
    for s in chart.series:
        if s.pid is None:
            continue
        rows.append({"pid": s.pid, "css": s.css, "first": _clock(s.points[0][0], True),
                     "last": _clock(s.points[-1][0], True), "mb": s.points[-1][1], "samples": len(s.points),
                     "ended": ended.get(s.pid, "")})
    return rows


@bp.get("/status")
def page():
    settings = get_settings()
    now = time.time()
    records = history.read(settings, since=now - WINDOW_SECONDS)
    charts = [build_chart(records, settings, now, geometry) for geometry in GEOMETRIES]
    chart = charts[0]
    return render_template(
        "status.html", chart=chart, charts=charts, settings=settings, tier_settings=tier_settings(settings),
        workers=worker_rows(chart), model=get_service().status(), pid=os.getpid(),
        history_on=bool(settings.prometheus_multiproc_dir), now=_clock(now, True),
        events=list(reversed(chart.markers)), clock=_clock)
