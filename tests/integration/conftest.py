from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors.local_cluster import InProcessCluster
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer


def make_sim_cluster(nats_url: str, instances: int = 2, **engine_kwargs: object) -> InProcessCluster:
    from engines.sim.live_migration import MigratableSimEngine as SimEngine

    settings = load_settings(
        overrides={"nats": {"url": nats_url}, "engine": {"kind": "sim", "heartbeat_interval_s": 0.05}}
    )
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for index in range(instances):
        cluster.add_engine(SimEngine(f"sim-{index}", **engine_kwargs))  # type: ignore[arg-type]
    return cluster


@pytest.fixture(scope="module")
def sim_cluster(nats_url: str, span_exporter: object) -> Iterator[InProcessCluster]:
    # time_scale slows modelled steps to wall time: long requests stay in flight long enough to cancel.
    cluster = make_sim_cluster(nats_url, 2, time_scale=1.0, max_model_len=1024)
    yield cluster
    cluster.stop()
