"""monitoring/ sits below the app and reads its settings through ``monitoring.config.MonitoringSettings``:
the app's Settings has every attribute declared there, monitoring reads no other, and monitoring runs
on an object that has those attributes and nothing more. (That monitoring imports nothing from the app
is tests/test_layout.py's.)"""

import ast
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from monitoring.config import MonitoringSettings
from support import ROOT, make_settings

MODULES = sorted(Path(ROOT, "monitoring").glob("*.py"))
DECLARED = sorted(name for name, value in vars(MonitoringSettings).items() if isinstance(value, property))


def settings_reads(path: Path) -> set[str]:
    """The attributes a file reads off a settings object (``settings.x``, ``self.settings.x``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and ((isinstance(node.value, ast.Name) and node.value.id == "settings")
                 or (isinstance(node.value, ast.Attribute) and node.value.attr == "settings"))}


def test_the_apps_settings_have_everything_monitoring_reads(tmp_path):
    settings = make_settings(tmp_path)
    missing = [name for name in DECLARED if not hasattr(settings, name)]
    assert DECLARED and not missing, f"app.settings.Settings lacks {missing}, which monitoring/config.py declares"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_monitoring_reads_only_the_settings_it_declares(path):
    undeclared = sorted(settings_reads(path) - set(DECLARED))
    assert not undeclared, (f"monitoring/{path.name} reads settings.{undeclared}: declare them in "
                            "monitoring/config.py, or have the app hand the value over as an argument")


def test_the_reads_check_sees_a_read(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f(settings, self):\n    return settings.max_memory_mb, self.settings.sentry_dsn\n")
    assert settings_reads(source) == {"max_memory_mb", "sentry_dsn"}


def test_monitoring_runs_on_its_declared_settings_alone(tmp_path, caplog):
    from monitoring import history, hooks, sentry
    from monitoring.watchdog import MemoryWatchdog

    # The threshold far above this test process, which the watchdog measures (it has no cgroup limit).
    app_settings = make_settings(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"), MAX_MEMORY_MB="1048576")
    own = SimpleNamespace(**{name: getattr(app_settings, name) for name in DECLARED})
    os.makedirs(own.prometheus_multiproc_dir)

    assert sentry.init(own) is False  # no DSN: off
    watchdog = MemoryWatchdog(own)
    assert watchdog.check() == [] and watchdog.last_sample["pid"] == os.getpid()
    assert [r.kind for r in history.read(own)] == ["sample"]
    server = SimpleNamespace(log=logging.getLogger("test.monitoring"))
    with caplog.at_level(logging.INFO, logger="test.monitoring"):
        hooks.startup_report(server, own, {"workers": 2, "model": "m", "database": "postgresql"})
    assert "memfit start-up:" in caplog.text and "workers=2 " in caplog.text and "database=postgresql" in caplog.text
    failed = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not failed, failed  # the watchdog and history log what they swallow
