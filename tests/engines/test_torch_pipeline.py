"""Pipeline stages and KunServe groups: g-stage pipelines compute exactly what the full model computes, the
stage boundary survives its wire form, and drop -> generate -> restore across engines keeps running
requests' tokens identical to an undisturbed run without recomputing them."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from engines.base import EngineError
from engines.torch import LayerGroup, ModelStage, PipelineGroup, StageBatch, TorchEngine, serialize_hop, split_layers
from engines.torch.core import EngineCore, StageRunner
from engines.torch.kv_cache import BlockAllocator
from engines.torch.remote import RemoteStage, RemoteStageError
from engines.torch.scheduler import Scheduler, Sequence
from tests.engines.test_torch_engine import (
    LOGITS_ATOL,
    NEW_TOKENS,
    PROMPTS,
    assert_no_leak,
    collect,
    collect_stream,
    engines,
    hf_model,
    model_dir,
    reference,
    request,
    start_engine,
)

__all__ = ["engines", "hf_model", "model_dir", "reference"]  # fixtures shared with test_torch_engine

torch.set_num_threads(1)


def stages_for(model_dir: Path, groups: int, num_blocks: int = 64, block_size: int = 4) -> list[ModelStage]:
    return [
        ModelStage(model_dir, layer_range=r, num_blocks=num_blocks, block_size=block_size)
        for r in split_layers(4, groups)
    ]


def run_core(runner: StageRunner, prompts: list[list[int]], budget: int = 7) -> list[list[int]]:
    """Greedy continuations through ``runner`` with chunked prefill; checks that no block leaks."""
    allocator = BlockAllocator(runner.num_blocks)
    scheduler = Scheduler(allocator, block_size=4, max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=512)
    core = EngineCore(runner, scheduler)
    seqs = [Sequence(f"s{i}", list(p), len(p), NEW_TOKENS) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work:
        core.step()
    assert allocator.num_free == allocator.num_blocks
    return [seq.output_token_ids for seq in seqs]


def full_batch(prompt: list[int]) -> StageBatch:
    n = len(prompt)
    return StageBatch(
        positions=torch.arange(n),
        query_start=torch.tensor([0, n]),
        context_lens=torch.tensor([n]),
        block_tables=torch.arange(-(-n // 4))[None, :],
        logits_indices=torch.arange(n),
        token_ids=torch.tensor(prompt),
    )


@pytest.mark.parametrize("groups", [2, 4])
def test_pipeline_logits_equal_full_model_and_transformers(model_dir: Path, hf_model: Any, groups: int) -> None:
    prompt = PROMPTS[3]
    full = ModelStage(model_dir, num_blocks=64, block_size=4).forward(full_batch(prompt)).logits
    piped = PipelineGroup(stages_for(model_dir, groups)).forward(full_batch(prompt)).logits
    assert full is not None and piped is not None
    assert torch.equal(piped, full)  # the same arithmetic, split at layer boundaries
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0]
    assert (piped - ref).abs().max().item() < LOGITS_ATOL


@pytest.mark.parametrize("groups", [2, 4])
def test_pipeline_group_generates_the_full_models_tokens(
    model_dir: Path, reference: dict[int, list[int]], groups: int
) -> None:
    expected = [reference[i] for i in range(len(PROMPTS))]
    assert run_core(PipelineGroup(stages_for(model_dir, groups)), PROMPTS) == expected
    assert run_core(PipelineGroup(stages_for(model_dir, groups), hop=serialize_hop), PROMPTS) == expected


@pytest.mark.parametrize(("groups", "micro_batches"), [(2, 2), (2, 3), (4, 4)])
def test_micro_batched_pipeline_generates_the_same_tokens(
    model_dir: Path, reference: dict[int, list[int]], groups: int, micro_batches: int
) -> None:
    """Requests cut into micro-batches that overlap across stages: the same greedy tokens, no block leaked."""
    expected = [reference[i] for i in range(len(PROMPTS))]
    pipeline = PipelineGroup(stages_for(model_dir, groups), hop=serialize_hop, micro_batches=micro_batches)
    try:
        assert run_core(pipeline, PROMPTS, budget=24) == expected
    finally:
        pipeline.close()


def test_split_micro_batches_keeps_every_row_and_logit() -> None:
    from engines.torch.pipeline import split_micro_batches

    # Three requests: a 3-token prefill chunk (sampled), a decode, a 2-token chunk (not sampled).
    batch = StageBatch(
        positions=torch.tensor([0, 1, 2, 7, 4, 5]),
        query_start=torch.tensor([0, 3, 4, 6]),
        context_lens=torch.tensor([3, 8, 6]),
        block_tables=torch.tensor([[1, 0], [2, 3], [4, 5]]),
        logits_indices=torch.tensor([2, 3]),
        token_ids=torch.tensor([10, 11, 12, 13, 14, 15]),
    )
    parts = split_micro_batches(batch, 2)
    assert len(parts) == 2
    (prefill, prefill_logits), (decode, decode_logits) = parts
    assert prefill.token_ids is not None and prefill.token_ids.tolist() == [10, 11, 12, 14, 15]
    assert prefill.query_start.tolist() == [0, 3, 5] and prefill.logits_indices.tolist() == [2]
    assert prefill_logits.tolist() == [0]
    assert decode.token_ids is not None and decode.token_ids.tolist() == [13]
    assert decode.logits_indices.tolist() == [0] and decode_logits.tolist() == [1]
    assert decode.block_tables.tolist() == [[2, 3]]
    assert split_micro_batches(batch, 1) == []


def test_stage_batch_round_trips_through_bytes() -> None:
    batch = StageBatch(
        positions=torch.arange(5),
        query_start=torch.tensor([0, 2, 5]),
        context_lens=torch.tensor([2, 9]),
        block_tables=torch.tensor([[0, 0], [3, 1]]),
        logits_indices=torch.tensor([1, 4]),
        hidden=torch.randn(5, 8).to(torch.bfloat16),
    )
    back = StageBatch.from_bytes(batch.to_bytes())
    assert back.token_ids is None and back.hidden is not None and batch.hidden is not None
    assert back.hidden.dtype == torch.bfloat16 and torch.equal(back.hidden, batch.hidden)
    for name in ("positions", "query_start", "context_lens", "block_tables", "logits_indices"):
        assert torch.equal(getattr(back, name), getattr(batch, name))


def test_stage_in_another_process(model_dir: Path, reference: dict[int, list[int]]) -> None:
    """Layers 2-3 run in a child process behind a StageServer; activations and KV cross as bytes over TCP."""
    repo = Path(__file__).resolve().parents[2]
    command = [sys.executable, "-m", "engines.torch.remote", str(model_dir), "--first", "2", "--last", "4"]
    command += ["--block-size", "4", "--num-blocks", "64"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(command, cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("listening tcp://"), line
        remote = RemoteStage(line.split()[1])
        assert (remote.layer_range, remote.num_blocks) == ((2, 4), 64)
        local = ModelStage(model_dir, layer_range=(0, 2), num_blocks=64, block_size=4)
        assert run_core(PipelineGroup([local, remote]), PROMPTS) == [reference[i] for i in range(len(PROMPTS))]
        kv = remote.export_kv([2, 3], [0, 1])
        remote.import_kv(kv, [7, 9])
        assert all(torch.equal(kv[layer], back) for layer, back in remote.export_kv([2, 3], [7, 9]).items())
        report = remote.drop_layers((3, 4))
        assert remote.layer_range == (3, 4) and report.kv_blocks_after > 64
        with pytest.raises(RemoteStageError, match="not held"):
            remote.import_kv({2: kv[2]}, [0, 1])
        remote.close()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)


def test_pipeline_checks_its_stages(model_dir: Path) -> None:
    first, _, third = (ModelStage(model_dir, layer_range=r, num_blocks=4) for r in [(0, 1), (1, 2), (2, 4)])
    with pytest.raises(ValueError, match="do not follow"):
        PipelineGroup([first, third])
    with pytest.raises(ValueError, match="first stage needs token ids"):
        first.forward(full_batch([1, 2]).with_hidden(torch.zeros(2, 256)))


def test_stage_drop_and_restore_memory(model_dir: Path) -> None:
    stage = ModelStage(model_dir, num_blocks=64, block_size=4)
    full_weights, full_kv = stage.weight_bytes, stage.kv_bytes
    report = stage.drop_layers((2, 4))
    assert sorted(stage.layers) == [2, 3] and stage.kv.layers == [2, 3]
    assert stage.edge.embed is None and stage.edge.lm_head is not None
    assert report.weight_bytes_after == stage.config.weight_bytes(2, 4, 4) < full_weights
    assert report.kv_blocks_after == (report.budget_bytes - report.weight_bytes_after) // stage.kv.block_bytes
    assert report.weight_bytes_after + report.kv_bytes_after <= report.budget_bytes == full_weights + full_kv
    back = stage.restore_layers()
    assert (back.weight_bytes_after, back.kv_blocks_after, back.kv_bytes_after) == (full_weights, 64, full_kv)


# ---------------------------------------------------------------------------------------------- groups
async def _take(stream: Any, count: int, into: list[int]) -> None:
    while len(into) < count:
        into += (await anext(stream)).new_token_ids


@pytest.mark.parametrize("groups", [2, 4])
async def test_drop_generate_restore_keeps_running_tokens(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine], groups: int
) -> None:
    members = [
        await start_engine(engines, model_dir, f"g{groups}-{r}", block_size=4, num_blocks=48) for r in range(groups)
    ]
    leader = members[0]
    long_stream = leader.generate(request("long", PROMPTS[3]))
    short_stream = leader.generate(request("short", PROMPTS[0]))
    got_long: list[int] = []
    got_short: list[int] = []
    await _take(long_stream, 6, got_long)
    await _take(short_stream, 6, got_short)

    group, formed = await LayerGroup.form(members)
    assert formed.ranges == split_layers(4, groups)
    assert formed.moved_requests == 2 and formed.moved_kv_bytes > 0
    assert formed.kv_blocks_after > formed.kv_blocks_before  # freed weights became KV blocks
    assert formed.freed_weight_bytes > 0
    assert all(r.kv_blocks_after > r.kv_blocks_before for r in formed.stages)
    assert leader.role == "leader" and all(m.role == "member" for m in members[1:])
    with pytest.raises(EngineError, match="stage of a pipeline group"):
        members[1].generate(request("x", PROMPTS[2]))
    assert members[1].load().num_total_blocks == 0

    await _take(long_stream, 14, got_long)
    joined = await collect(leader, request("joined", PROMPTS[1]))  # admitted and finished while grouped
    assert joined[0] == reference[1]

    restored = await group.dissolve()
    assert restored.kv_blocks_after == 48 and not restored.preempted
    assert all(r.layers_after == (0, 4) for r in restored.stages)
    assert leader.role == "standalone" and all(m.role == "standalone" for m in members)
    got_long += await collect_stream(long_stream)
    got_short += await collect_stream(short_stream)
    assert got_long == reference[3]
    assert got_short == reference[0]
    assert leader.scheduler.num_preemptions == 0  # KV moved with its layers; nothing was recomputed
    for engine in members:
        assert_no_leak(engine)
    member_tokens = await collect(members[-1], request("after", PROMPTS[2]))  # members serve alone again
    assert member_tokens[0] == reference[2]


async def test_dissolve_preempts_what_no_longer_fits(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    """The group's pool is larger than the leader's own: requests admitted under the group that do not fit
    after the restore are recomputed, and still produce exactly their tokens."""
    members = [
        await start_engine(engines, model_dir, f"small-{r}", block_size=4, num_blocks=20, max_num_batched_tokens=16)
        for r in range(2)
    ]
    group, formed = await LayerGroup.form(members)
    assert formed.kv_blocks_after > 40
    streams = [members[0].generate(request(f"p{i}", PROMPTS[i])) for i in range(3)]
    got: list[list[int]] = [[], [], []]
    for stream, into in zip(streams, got, strict=True):
        await _take(stream, 12, into)
    assert members[0].allocator.num_used > 20  # 6 + 14 + 4 blocks (at least) of 4 tokens
    restored = await group.dissolve()
    assert restored.preempted
    for stream, into in zip(streams, got, strict=True):
        into += await collect_stream(stream)
    assert got == [reference[i] for i in range(3)]
    assert_no_leak(members[0])


async def test_group_checks_its_members(model_dir: Path, engines: list[TorchEngine]) -> None:
    a = await start_engine(engines, model_dir, "ca", num_blocks=16)
    b = await start_engine(engines, model_dir, "cb", num_blocks=16)
    stream = b.generate(request("busy", PROMPTS[0], max_tokens=500))
    await anext(stream)
    with pytest.raises(EngineError, match="drain or migrate"):
        await LayerGroup.form([a, b])
    await b.abort("busy")
    await collect_stream(stream)
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="at least two"):
        await LayerGroup.form([a])


async def test_request_that_no_longer_fits_after_dissolve_is_aborted(
    model_dir: Path, engines: list[TorchEngine]
) -> None:
    """A request admitted under the group's larger pool that cannot fit the leader's own pool ends as an
    abort when the group dissolves (rather than waiting forever)."""
    members = [await start_engine(engines, model_dir, f"fit-{r}", block_size=4, num_blocks=20) for r in range(2)]
    with pytest.raises(EngineError, match="KV blocks"):
        members[0].generate(request("big", PROMPTS[3]))  # 112 tokens = 28 blocks > 20
    group, _ = await LayerGroup.form(members)
    stream = members[0].generate(request("big", PROMPTS[3]))
    got: list[int] = []
    await _take(stream, 3, got)
    restored = await group.dissolve()
    assert restored.preempted == ["big"]
    outputs = [out async for out in stream]
    assert outputs[-1].finish_reason == "abort"
    assert_no_leak(members[0])


@pytest.mark.parametrize("room", [True, False])
async def test_a_joining_members_request_moves_into_the_group_with_its_kv(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine], room: bool
) -> None:
    """The engine half of a live join (``actors/engine_groups.py``): the member parks a running request's
    KV of every layer and drops to its stage, served over TCP; the leader, as the pipeline, holds blocks for
    it and takes the KV in (the member writes its own layers, the rest crosses); the request resumes on the
    leader after its outputs so far, on that KV: the reference tokens, nothing recomputed. Without room on
    the leader it is recomputed there: the same tokens."""
    from engines.torch.engine import GROUP_KV_KEY
    from engines.torch.remote import StageServer

    leader, member = [
        await start_engine(engines, model_dir, f"join{room}-{r}", block_size=4, num_blocks=48) for r in range(2)
    ]
    stream = member.generate(request("handed", PROMPTS[3]))
    got: list[int] = []
    await _take(stream, 8, got)
    async with member.paused():
        parked = member.park_paused("handed")
        assert parked is not None
        outputs, num_tokens, kv = parked
        assert outputs[: len(got)] == got and num_tokens > len(PROMPTS[3]) and sorted(kv) == [0, 1, 2, 3]
        await member.drop_layers_paused((2, 4))
        member.use_runner(member.stage, "member")
    assert (await collect_stream(stream)) == []  # its stream here ends (as evicted), nothing more from it
    server = StageServer(member.stage, parked={"handed": (num_tokens, kv)})
    remote = RemoteStage(server.address)
    try:
        assert remote.parked() == [("handed", num_tokens)]
        async with leader.paused():
            await leader.drop_layers_paused((0, 2))
            leader.use_runner(PipelineGroup([leader.stage, remote]), "leader")
            blocks = leader.adopt_kv_paused("handed", num_tokens) if room else None
            taken = remote.take_parked("handed", blocks)
            if blocks is not None:
                assert sorted(taken) == [0, 1]  # the member wrote layers 2-3 itself
                leader.import_adopted_kv("handed", taken)
        assert remote.parked() == []
        resumed = dataclasses.replace(
            request("handed", PROMPTS[3]),
            output_token_ids=list(outputs),
            kv_transfer={GROUP_KV_KEY: {"num_tokens": num_tokens}},
        )
        tokens, _ = await collect(leader, resumed)
        assert outputs + tokens == reference[3]
        assert leader.group_counters == {"kv_adopted": int(room), "kv_recomputed": int(not room)}
        assert leader.scheduler.num_preemptions == 0 == member.scheduler.num_preemptions
        assert_no_leak(leader)
    finally:
        remote.close()
        server.close()
