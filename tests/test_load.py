"""The load suite, short version (the full 60 s run is `make load`): real gunicorn, 512mb tier settings,
a 512 MB memory cgroup where the machine allows it, 16 clients, workers recycling during the run."""

import pytest

pytestmark = pytest.mark.load


@pytest.fixture(scope="module")
def result():
    from bench.load import run

    return run(seconds=15, clients=16, max_requests=25)


def test_no_request_failed(result):
    assert result["requests"] > 100
    assert result["failed"] == 0, result["failures"]


def test_every_created_item_is_readable(result):
    assert result["created"] > 10 and result["created_missing"] == 0


def test_workers_recycled_during_the_run(result):
    assert result["recycles"] >= 2 and result["killed"] == 0


def test_memory_stayed_under_the_tier_threshold(result):
    assert result["peak_rss_mb"] < result["max_memory_mb"], result
    if result["cgroup"]:
        assert result["cgroup_peak_mb"] < result["max_memory_mb"] and result["oom_kills"] == 0, result
