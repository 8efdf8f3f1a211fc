"""monitoring/sentry.py's event gate and monitoring/faults.py: client faults never reach Sentry, and a flood
of one error costs at most its budget of events while an error of another kind still gets through."""

import logging

import pytest
from gunicorn.http.errors import ConfigurationProblem, InvalidChunkSize, InvalidRequestLine

from monitoring.faults import ClientFaultFilter, is_client_fault
from monitoring.sentry import EVENT_BUDGET, EventGate, event_kind


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def error_event(exc: BaseException) -> tuple[dict, dict]:
    return ({"level": "error", "exception": {"values": [{"type": type(exc).__name__}]}},
            {"exc_info": (type(exc), exc, None)})


def test_a_kind_past_its_budget_is_dropped_until_the_window_ends_and_others_pass():
    clock = Clock()
    gate = EventGate(budget=3, window=60, clock=clock)
    flood = [gate(*error_event(RuntimeError("boom"))) for _ in range(10)]
    assert sum(event is not None for event in flood) == 3
    assert gate(*error_event(KeyError("other"))) is not None  # another kind has its own budget
    clock.now += 59.9
    assert gate(*error_event(RuntimeError("boom"))) is None
    clock.now += 0.1
    assert gate(*error_event(RuntimeError("boom"))) is not None  # a new window


def test_the_first_dropped_event_of_a_window_is_said_once(caplog):
    gate = EventGate(budget=1, window=60, clock=Clock())
    for _ in range(5):
        gate(*error_event(RuntimeError("boom")))
    said = [r for r in caplog.records if r.name == "monitoring.sentry"]
    assert len(said) == 1 and said[0].levelno == logging.WARNING and "builtins.RuntimeError" in said[0].getMessage()


def test_check_ins_are_never_counted():
    gate = EventGate(budget=0, window=60, clock=Clock())
    assert gate({"type": "check_in", "monitor_slug": "m"}, {}) is not None


@pytest.mark.parametrize("fault", [InvalidChunkSize(b"zz"), InvalidRequestLine("GET")])
def test_client_faults_never_pass(fault):
    assert EventGate(clock=Clock())(*error_event(fault)) is None


def test_the_servers_own_configuration_problem_is_not_a_client_fault():
    assert not is_client_fault(ConfigurationProblem("bad forwarded-allow-ips"))
    assert EventGate(clock=Clock())(*error_event(ConfigurationProblem("x"))) is not None


def test_kinds_come_from_fingerprint_then_exception_then_unformatted_message():
    assert event_kind({"fingerprint": ["memfit-memory-threshold", "svc", "instance"]}, {}) == \
        "fingerprint:memfit-memory-threshold/svc/instance"
    assert event_kind(*error_event(ValueError("x"))) == "exception:builtins.ValueError"
    logged = {"logger": "app.errors", "logentry": {"message": "database refused a statement: %s", "params": ["A"]}}
    assert event_kind(logged, {}) == event_kind({**logged, "logentry": {**logged["logentry"], "params": ["B"]}}, {})


def test_a_logged_client_fault_becomes_one_warning_line_without_a_traceback(caplog):
    logger = logging.getLogger("test.gunicorn.error")
    logger.addFilter(ClientFaultFilter())
    try:
        try:
            raise InvalidChunkSize(b"zz")
        except OSError:
            logger.exception("Socket error processing request.")
        try:
            raise RuntimeError("ours")
        except RuntimeError:
            logger.exception("Error handling request")
    finally:
        logger.filters.clear()
    fault, ours = [r for r in caplog.records if r.name == "test.gunicorn.error"]
    assert (fault.levelno, fault.exc_info) == (logging.WARNING, None)
    assert fault.getMessage() == ("Socket error processing request. (client fault, InvalidChunkSize: "
                                  "Invalid chunk size: b'zz')")
    assert ours.levelno == logging.ERROR and ours.exc_info[1].args == ("ours",)  # memfit's own errors stay


def test_a_flood_of_one_error_reaches_the_receiver_at_most_budget_times(tmp_path):
    import sentry_sdk

    from app import create_app
    from fake_sentry import FakeSentry
    from support import make_settings, wait_until

    flood = 3 * EVENT_BUDGET
    with FakeSentry() as fake:
        app = create_app(make_settings(tmp_path, SENTRY_DSN=fake.dsn))
        with app.app_context():
            from app.db import create_schema

            create_schema()

        def flooded():
            raise RuntimeError("the same bug again")

        def other():
            raise LookupError("a different bug")

        app.add_url_rule("/flooded", "flooded", flooded)
        app.add_url_rule("/other", "other", other)
        client = app.test_client()
        try:
            assert {client.get("/flooded").status_code for _ in range(flood)} == {500}
            assert client.get("/other").status_code == 500
            # Sent in order from one thread: once the last one is in, every earlier one that was sent is too.
            wait_until(lambda: any(e.get("exception", {}).get("values", [{}])[-1].get("type") == "LookupError"
                                   for e in fake.events("error")), "the different error at the receiver")
        finally:
            sentry_sdk.get_client().close(timeout=2)
            sentry_sdk.init()  # an inactive client, so no later test reports to this fake
        types = [e["exception"]["values"][-1]["type"] for e in fake.events("error")]
    assert types.count("RuntimeError") == EVENT_BUDGET, types
    assert types.count("LookupError") == 1
