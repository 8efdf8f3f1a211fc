"""monitoring/metrics.py's metrics and the docs name the same set: each metric is documented once it
exists, and a documented metric exists (a name dropped from the code leaves no stale row behind)."""

import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from monitoring import metrics
from support import ROOT

# A metric named in the docs: in backticks, optionally with its labels (`memfit_requests_total{mode,status}`).
DOCUMENTED = re.compile(r"`(memfit_[a-z_]+)(?:\{[^`]*\})?`")


def defined() -> set[str]:
    """The exposed names: prometheus_client keeps a counter's name without the _total it exposes."""
    return {m._name + ("_total" if m._type == "counter" else "") for m in vars(metrics).values()
            if isinstance(m, MetricWrapperBase)}


def documented() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for name in DOCUMENTED.findall(page.read_text(encoding="utf-8")):
            found.setdefault(name, set()).add(page.relative_to(ROOT).as_posix())
    return found


@pytest.mark.parametrize("name", sorted(defined()))
def test_every_metric_is_documented(name):
    assert name in documented(), f"{name} is exposed on /metrics but no page of docs/ names it (docs/operations.md)"


@pytest.mark.parametrize("name", sorted(documented()))
def test_every_documented_metric_exists(name):
    assert name in defined(), f"{sorted(documented()[name])} name {name}, which monitoring/metrics.py does not define"
