"""A smaller run of scripts/fuzz_bus.py in CI (the script itself sends 10,000+): malformed, truncated,
oversized and wrong-typed messages on every subject Drover listens on, while well-formed requests run."""

from __future__ import annotations

from scripts.fuzz_bus import run


async def test_fuzzing_every_subject_leaves_every_actor_and_request_intact() -> None:
    assert await run(messages=600, seed=1) == 0
