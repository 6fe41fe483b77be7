"""Metrics: series appear and move on a real scrape endpoint after recording; Prometheus naming."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator

import pytest

from observability.metrics import InstanceGauges, Metrics, MetricsServer, start_metrics_server


@pytest.fixture
def served() -> Iterator[tuple[Metrics, MetricsServer]]:
    metrics = Metrics()
    server = start_metrics_server(0, source=metrics)
    yield metrics, server
    server.stop()
    metrics.shutdown()


def scrape(server: MetricsServer) -> dict[str, float]:
    """``series{labels} -> value`` of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    series: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def test_request_path_series_move(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.request_finished("length", "interactive", prompt_tokens=10, completion_tokens=4)
    metrics.observe_ttft(0.02, "interactive")
    metrics.observe_inter_token([0.004, 0.004, 0.03], "interactive")
    first = scrape(server)
    assert first['drover_requests_total{outcome="length",request_class="interactive"}'] == 1
    assert first['drover_tokens_total{kind="completion",request_class="interactive"}'] == 4
    assert first['drover_ttft_seconds_bucket{le="0.025",request_class="interactive"}'] == 1
    assert first['drover_ttft_seconds_bucket{le="0.01",request_class="interactive"}'] == 0
    assert first['drover_inter_token_seconds_count{request_class="interactive"}'] == 3
    metrics.request_finished("length", "interactive")
    metrics.request_finished("prompt_too_long", "batch")
    second = scrape(server)
    assert second['drover_requests_total{outcome="length",request_class="interactive"}'] == 2
    assert second['drover_requests_total{outcome="prompt_too_long",request_class="batch"}'] == 1


def test_migration_and_instance_series(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.migration_finished("committed", copied_bytes=1 << 20, downtime_s=0.002)
    metrics.migration_finished("aborted", copied_bytes=4096)
    metrics.set_instances(
        [InstanceGauges("sim-0", "serving", 100, 512, 3, 1, 7), InstanceGauges("sim-1", "draining", 500, 512, 0, 0, 2)]
    )
    metrics.set_scheduler(queued=2, in_flight=6)
    metrics.set_migrations(completed=5, aborted=1, in_flight=2)
    series = scrape(server)
    assert series['drover_scheduler_migrations_total{outcome="committed"}'] == 5
    assert series["drover_migrations_in_flight"] == 2
    assert series['drover_migrations_total{outcome="committed"}'] == 1
    assert series["drover_migration_bytes_total"] == (1 << 20) + 4096
    assert series["drover_migration_downtime_seconds_count"] == 1  # only committed migrations have downtime
    assert series['drover_instance_free_blocks{instance="sim-0"}'] == 100
    assert series['drover_instance_dispatched_total{instance="sim-0"}'] == 7
    assert series['drover_instances{state="draining"}'] == 1
    assert (series["drover_queue_depth"], series["drover_requests_in_flight"]) == (2, 6)
    metrics.remove_instance("sim-1")
    metrics.update_instance(InstanceGauges("sim-0", "serving", 90, 512, 4, 0, 8))
    series = scrape(server)
    assert 'drover_instance_free_blocks{instance="sim-1"}' not in series
    assert series['drover_instance_free_blocks{instance="sim-0"}'] == 90


def test_names_follow_prometheus_conventions(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.request_finished("stop", "batch", 1, 1)
    metrics.observe_ttft(0.1, "batch")
    metrics.migration_finished("committed", 10, 0.001)
    metrics.gateway_request("/v1/completions", 200, "alice", 0.5)
    metrics.engine_request_ended("sim-0", "stop")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as response:
        text = response.read().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    assert types, "no metric families exported"
    for name, kind in types.items():
        assert re.fullmatch(r"drover_[a-z0-9_]+", name), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if kind == "histogram":
            assert name.endswith("_seconds"), name


def test_two_metrics_objects_do_not_share_series() -> None:
    a, b = Metrics(), Metrics()
    a.request_finished("stop", "interactive")
    assert b"drover_requests_total" in a.render()
    assert b"drover_requests_total" not in b.render()


def test_prefix_cache_series(served: tuple[Metrics, MetricsServer]) -> None:
    metrics, server = served
    metrics.set_prefix_cache("a", cached_blocks=40, query_tokens=1000, hit_tokens=600)
    metrics.set_prefix_cache("b", cached_blocks=0, query_tokens=1000, hit_tokens=0)
    series = scrape(server)
    assert series['drover_instance_cached_blocks{instance="a"}'] == 40
    assert series["drover_prefix_cache_hit_rate"] == pytest.approx(0.3)
    assert series["drover_prefix_cache_saved_tokens_total"] == 600
    metrics.remove_instance("a")
    assert 'drover_instance_cached_blocks{instance="a"}' not in scrape(server)
