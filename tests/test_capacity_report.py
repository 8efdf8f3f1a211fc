"""bench/capacity.py's report: server CPU per answer, what a CPU quota allows at that cost, and --report."""

import json

from bench import capacity


def step(rate, answered, cpu_s, ok=True, semantic=0.0):
    return {"rate": rate, "ok": ok, "server_cpu_s": cpu_s, "all": {"answered": answered},
            "by_kind": {"semantic": {"answered_per_s": semantic}, "text": {"p50_ms": 5.0}}}


def test_cpu_per_answer_counts_answers_not_requests_sent():
    assert capacity.cpu_per_answer_ms(step(80, 1200, 6.0)) == 5.0
    assert capacity.cpu_per_answer_ms({"answered": 400, "server_cpu_s": 2.0}) == 5.0  # a closed-loop step
    assert capacity.cpu_per_answer_ms(step(80, 0, 6.0)) is None
    assert capacity.cpu_per_answer_ms({"all": {"answered": 10}}) is None  # no CPU figure recorded


def test_quota_ceiling_is_the_quota_over_the_cost_at_capacity():
    run = {"cpus": 0.5, "steps": [step(60, 900, 4.0), step(80, 1200, 6.0), step(100, 1300, 7.5, ok=False)],
           "capacity": {"rate": 80}}
    ceiling = capacity.quota_ceiling(run)
    # 5 ms an answer at the capacity step (not 4.4 at 60): 500 ms of CPU a second answer 100 a second,
    # 15 of them semantic in the mix.
    assert ceiling == {"cpu_ms_per_answer": 5.0, "rate": 100.0, "semantic": 15.0}
    assert capacity.quota_ceiling({**run, "cpus": None}) is None  # no quota: no bound from it
    assert capacity.quota_ceiling({**run, "capacity": None}) is None


def test_report_writes_the_pages_again_from_a_recorded_run(tmp_path, monkeypatch):
    recorded = {"checks": "stale", "runs": []}
    (tmp_path / "capacity.json").write_text(json.dumps(recorded))
    seen = {}
    monkeypatch.setattr(capacity, "checks", lambda data: [("a goal", True)])
    monkeypatch.setattr(capacity, "table", lambda data: seen.setdefault("table", "# the report\n"))
    monkeypatch.setattr(capacity, "plot", lambda data, path: seen.setdefault("plot", path))
    assert capacity.main(["--report", "--results", str(tmp_path)]) == 0
    assert (tmp_path / "capacity.md").read_text() == "# the report\n"
    assert seen["plot"] == tmp_path / "capacity.png"
    assert json.loads((tmp_path / "capacity.json").read_text())["checks"] == [{"goal": "a goal", "met": True}]
    assert capacity.main(["--report", "--results", str(tmp_path / "none")]) == 2


def closed_run(p99s, settings=None):
    return {"kind": "closed", "design": "new", "tier": "512mb", "cpus": 0.5, "settings": settings or {},
            "steps": [{"clients": n, "shed": 0, "answered_per_s": 10.0, "p99_ms": p99} for n, p99 in p99s]}


def deadline_check(run):
    return [(text, met) for text, met in capacity.checks({"runs": [run]}) if "deadline" in text]


def test_closed_loop_p99_is_held_to_the_servers_deadline():
    # The closed-loop goal: p99 within the deadline at every client count, the worst one named.
    [(text, met)] = deadline_check(closed_run([(1, 90.0), (16, 1400.0), (32, 1200.0)]))
    assert met and "1400 ms at 16 clients" in text and "SEMANTIC_DEADLINE_MS 1500" in text
    [(text, met)] = deadline_check(closed_run([(1, 90.0), (32, 1501.0)]))
    assert not met and "1501 ms at 32 clients" in text
    # A run whose server was given another deadline is held to that one.
    [(_, met)] = deadline_check(closed_run([(32, 1800.0)], {"SEMANTIC_DEADLINE_MS": "2000"}))
    assert met
