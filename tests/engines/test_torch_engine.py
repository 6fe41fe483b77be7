"""TorchEngine: exactness against transformers (logits and greedy tokens, batched, chunked, preempted), the
Engine protocol (streaming, abort, resume, stop tokens, load), seeded sampling, the memory budget, drop and
restore on one engine, and moving a request's KV between engines."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from actors.local_cluster import InProcessCluster
from control.client import DroverClient
from control.settings import load_settings
from engines.base import Engine, EngineError, EngineOutput, EngineRequest
from engines.migration import FrozenRequest, MigratableEngine, MigrationAborted, ReservationRefused, StageReport
from engines.tiny_model import TINY, ensure_model
from engines.tokenizer import ByteTokenizer
from engines.torch import ModelStage, StageBatch, TorchEngine
from engines.torch.config import LlamaConfig
from engines.torch.core import EngineCore
from engines.torch.kv_cache import BlockAllocator
from engines.torch.migration import MigratableTorchEngine
from engines.torch.sampler import SamplingRow, sample
from engines.torch.scheduler import Scheduler, Sequence
from transport.messages import InstanceLoad, SamplingParams

torch.set_num_threads(1)

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "Drover is a control plane for LLM serving clusters; KunServe drops layers under bursts.",
]
PROMPTS: list[list[int]] = [ByteTokenizer().encode(text) for text in TEXTS]
NEW_TOKENS = 24
LOGITS_ATOL = 1e-4  # float32, max abs difference against transformers


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("DROVER_TEST_MODEL_CACHE")
    return ensure_model(Path(cache) if cache else tmp_path_factory.getbasetemp() / "torch-models", TINY)


@pytest.fixture(scope="session")
def hf_model(model_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(hf_model: Any) -> dict[int, list[int]]:
    """transformers' greedy continuation of each prompt (EOS disabled): prompt index -> NEW_TOKENS ids."""
    outputs: dict[int, list[int]] = {}
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outputs[i] = out[0, len(prompt) :].tolist()
        assert len(outputs[i]) == NEW_TOKENS
    return outputs


@pytest_asyncio.fixture(loop_scope="session")
async def engines(model_dir: Path) -> AsyncIterator[list[TorchEngine]]:
    """Engines a test makes with :func:`start_engine`; shut down (and checked for leaked blocks) at the end."""
    made: list[TorchEngine] = []
    yield made
    for engine in made:
        await engine.shutdown()


async def start_engine(made: list[TorchEngine], model_dir: Path, name: str = "t0", **kwargs: Any) -> TorchEngine:
    engine = TorchEngine(name, model_dir, model_name=TINY.name, **kwargs)
    await engine.start()
    made.append(engine)
    return engine


def request(rid: str, prompt: list[int], max_tokens: int = NEW_TOKENS, **sampling: Any) -> EngineRequest:
    sampling.setdefault("ignore_eos", True)
    return EngineRequest(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **sampling))


async def collect(engine: Engine, req: EngineRequest) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason: str | None = None
    async for out in engine.generate(req):
        assert isinstance(out, EngineOutput)
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def assert_no_leak(engine: TorchEngine) -> None:
    allocator = engine.allocator
    assert allocator.num_free == allocator.num_blocks, f"{allocator.num_used} blocks leaked"
    assert not engine.scheduler.has_work


# ---------------------------------------------------------------------------------------------- exactness
def test_logits_match_transformers_with_chunks_and_batching(model_dir: Path, hf_model: Any) -> None:
    """Two prompts in one batch, the long one split over two steps (second chunk reads KV from the pool)."""
    stage = ModelStage(model_dir, block_size=4, num_blocks=64)
    a, b = PROMPTS[1], PROMPTS[3]
    split = 13
    with torch.no_grad():
        ref_a = hf_model(torch.tensor([a])).logits[0]
        ref_b = hf_model(torch.tensor([b])).logits[0]
    table_a, table_b = list(range(0, 16)), list(range(16, 48))
    first = StageBatch(
        positions=torch.cat([torch.arange(len(a)), torch.arange(split)]),
        query_start=torch.tensor([0, len(a), len(a) + split]),
        context_lens=torch.tensor([len(a), split]),
        block_tables=torch.tensor([table_a + [0] * 16, table_b]),
        logits_indices=torch.arange(len(a) + split),
        token_ids=torch.tensor(a + b[:split]),
    )
    second = StageBatch(
        positions=torch.arange(split, len(b)),
        query_start=torch.tensor([0, len(b) - split]),
        context_lens=torch.tensor([len(b)]),
        block_tables=torch.tensor([table_b]),
        logits_indices=torch.arange(len(b) - split),
        token_ids=torch.tensor(b[split:]),
    )
    out1, out2 = stage.forward(first).logits, stage.forward(second).logits
    assert out1 is not None and out2 is not None
    got_a, got_b = out1[: len(a)], torch.cat([out1[len(a) :], out2])
    assert (got_a - ref_a).abs().max().item() < LOGITS_ATOL
    assert (got_b - ref_b).abs().max().item() < LOGITS_ATOL


@pytest.mark.parametrize("index", range(len(PROMPTS)))
async def test_greedy_equals_transformers_unbatched(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine], index: int
) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=64)
    tokens, reason = await collect(engine, request(f"r{index}", PROMPTS[index]))
    assert tokens == reference[index]
    assert reason == "length"
    assert_no_leak(engine)


async def test_greedy_equals_transformers_batched_with_chunked_prefill(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    engine = await start_engine(engines, model_dir, block_size=4, num_blocks=128, max_num_batched_tokens=7)
    results = await asyncio.gather(*(collect(engine, request(f"r{i}", p)) for i, p in enumerate(PROMPTS)))
    assert [tokens for tokens, _ in results] == [reference[i] for i in range(len(PROMPTS))]
    longest = max(len(p) for p in PROMPTS)
    assert engine.core.num_steps >= NEW_TOKENS + longest // 7  # prompts really went in chunks of <= 7 tokens
    assert_no_leak(engine)


def test_core_schedules_decodes_with_prefill_chunks(model_dir: Path, reference: dict[int, list[int]]) -> None:
    """A step mixes running decodes with a waiting prompt's chunk, within the token budget."""
    stage = ModelStage(model_dir, block_size=4, num_blocks=64)
    scheduler = Scheduler(
        BlockAllocator(stage.num_blocks), block_size=4, max_num_seqs=8, max_num_batched_tokens=6, max_model_len=512
    )
    core = EngineCore(stage, scheduler)
    seqs = [Sequence(f"s{i}", list(p), len(p), NEW_TOKENS) for i, p in enumerate(PROMPTS[:2])]
    scheduler.add(seqs[0])
    mixed = 0
    while scheduler.has_work:
        if core.num_steps == 3:
            scheduler.add(seqs[1])
        plan = core.schedule()
        assert plan is not None and plan.output.num_tokens <= 6
        samples = [c.sample for c in plan.output.chunks]
        mixed += any(samples) and not all(samples)
        core.commit(plan, core.execute(plan))
    assert mixed > 0
    assert [s.output_token_ids for s in seqs] == [reference[0], reference[1]]
    assert scheduler.allocator.num_free == stage.num_blocks


async def test_preemption_under_small_pool_keeps_tokens(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    # 20 blocks of 4 tokens: each request (at most 68 tokens = 17 blocks) fits alone, the three together
    # (9 + 17 + 7 blocks at their longest) do not.
    prompts = [0, 1, 2]
    engine = await start_engine(engines, model_dir, block_size=4, num_blocks=20, max_num_batched_tokens=16)
    results = await asyncio.gather(*(collect(engine, request(f"r{i}", PROMPTS[i])) for i in prompts))
    assert engine.scheduler.num_preemptions > 0
    assert [tokens for tokens, _ in results] == [reference[i] for i in prompts]
    assert engine.load().num_preempted == engine.scheduler.num_preemptions
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------------------- protocol
async def test_is_an_engine_and_reports_load(model_dir: Path, engines: list[TorchEngine]) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=32, max_num_seqs=2)
    assert isinstance(engine, Engine)
    info = engine.info
    assert (info.engine_kind, info.block_size, info.num_blocks, info.dtype) == ("torch", 32, 32, "float32")
    streams = [engine.generate(request(f"r{i}", PROMPTS[1], max_tokens=40)) for i in range(3)]
    firsts = [await anext(s) for s in streams[:2]]
    assert all(out.new_token_ids for out in firsts)
    load = engine.load()
    assert isinstance(load, InstanceLoad)
    assert (load.num_running, load.num_waiting) == (2, 1)  # max_num_seqs=2
    assert load.num_free_blocks == 32 - sum(r.num_blocks for r in load.running)
    assert load.waiting_blocks == load.head_waiting_blocks > 0
    for s in streams:
        async for _ in s:
            pass
    assert_no_leak(engine)


async def test_event_loop_stays_responsive(model_dir: Path, engines: list[TorchEngine]) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=64)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.0005)

    task = asyncio.create_task(ticker())
    await collect(engine, request("r", PROMPTS[3], max_tokens=32))
    done.set()
    await task
    assert ticks > engine.core.num_steps  # the loop ran between and during steps


async def test_abort_and_cancelled_consumer_free_blocks(model_dir: Path, engines: list[TorchEngine]) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=64)
    stream = engine.generate(request("a", PROMPTS[1], max_tokens=200))
    await anext(stream)
    await engine.abort("a")
    rest = [out async for out in stream]
    assert rest[-1].finish_reason == "abort"

    other = engine.generate(request("b", PROMPTS[1], max_tokens=200))
    await anext(other)
    assert isinstance(other, AsyncGenerator)
    await other.aclose()  # the consumer goes away
    await engine.abort("unknown")  # ignored
    for _ in range(3):
        await asyncio.sleep(0.01)
    assert_no_leak(engine)


async def test_rejects_what_cannot_run(model_dir: Path, engines: list[TorchEngine]) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=4, max_model_len=256)
    with pytest.raises(EngineError, match="empty prompt"):
        engine.generate(request("e", []))
    with pytest.raises(EngineError, match="max_model_len"):
        engine.generate(request("long", [5] * 300))
    with pytest.raises(EngineError, match="KV blocks"):
        engine.generate(request("big", [5] * 100, max_tokens=100))  # 200 tokens > 4 blocks of 32
    stream = engine.generate(request("dup", [5] * 10, max_tokens=5))
    with pytest.raises(EngineError, match="already running"):
        engine.generate(request("dup", [5] * 10))
    await collect_stream(stream)
    partial = await start_engine(engines, model_dir, "part", layer_range=(0, 2), num_blocks=8)
    with pytest.raises(EngineError, match="cannot run a request alone"):
        partial.generate(request("x", [5] * 4))
    with pytest.raises(EngineError, match="not started"):
        TorchEngine("cold", model_dir, model_name=TINY.name).generate(request("x", [5]))


async def collect_stream(stream: AsyncIterator[EngineOutput]) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


async def test_resume_and_stop_tokens(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    engine = await start_engine(engines, model_dir, num_blocks=64)
    ref = reference[1]
    resumed = EngineRequest("res", PROMPTS[1], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), ref[:9])
    tokens, reason = await collect(engine, resumed)
    assert tokens == ref[9:] and reason == "length"

    stop = ref[5]
    tokens, reason = await collect(engine, request("stop", PROMPTS[1], stop_token_ids=[stop]))
    assert tokens == ref[: ref.index(stop) + 1] and reason == "stop"

    done = EngineRequest("done", PROMPTS[1], SamplingParams(max_tokens=3), [7, 8, 9])
    assert await collect(engine, done) == ([], "length")
    assert_no_leak(engine)


async def test_seeded_sampling_is_reproducible_and_survives_preemption(
    model_dir: Path, engines: list[TorchEngine]
) -> None:
    roomy = await start_engine(engines, model_dir, "roomy", block_size=4, num_blocks=128)
    tight = await start_engine(engines, model_dir, "tight", block_size=4, num_blocks=20, max_num_batched_tokens=16)
    params: dict[str, Any] = {"temperature": 0.9, "top_p": 0.9, "top_k": 50}

    async def run(engine: TorchEngine, seed: int) -> list[list[int]]:
        reqs = [request(f"s{i}-{seed}", PROMPTS[i], seed=seed + i, **params) for i in range(3)]
        return [tokens for tokens, _ in await asyncio.gather(*(collect(engine, r) for r in reqs))]

    first = await run(roomy, 7)
    assert await run(roomy, 7) == first
    assert await run(tight, 7) == first
    assert tight.scheduler.num_preemptions > 0
    assert await run(roomy, 8) != first
    greedy = [(await collect(roomy, request(f"g{i}", PROMPTS[i])))[0] for i in range(3)]
    assert greedy != first  # the sampled path really sampled


def test_sampler_degenerate_settings_pick_the_top_token() -> None:
    logits = torch.randn(4, 320, generator=torch.Generator().manual_seed(3))
    rows = [
        SamplingRow(temperature=1.0, top_p=0.0, seed=1),
        SamplingRow(temperature=1e-7, seed=2),
        SamplingRow(temperature=2.0, top_k=1, seed=3),
        SamplingRow(),
    ]
    assert sample(logits, rows) == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------------------------------------- memory
def test_memory_budget_sets_num_blocks(model_dir: Path) -> None:
    config = LlamaConfig.from_model_dir(model_dir)
    weights = config.weight_bytes(0, config.num_layers, 4)
    block = config.kv_block_bytes(config.num_layers, 32, 4)
    stage = ModelStage(model_dir, memory_budget_bytes=weights + 100 * block + 5)
    assert stage.weight_bytes == weights
    assert stage.num_blocks == 100
    assert stage.kv_bytes == 100 * block
    assert stage.weight_bytes + stage.kv_bytes <= stage.budget_bytes
    with pytest.raises(ValueError, match="no KV block"):
        ModelStage(model_dir, memory_budget_bytes=weights)
    half = ModelStage(model_dir, layer_range=(1, 3), num_blocks=8)
    assert sorted(half.layers) == [1, 2] and half.kv.layers == [1, 2]
    assert half.edge.embed is None and half.edge.lm_head is None
    assert half.weight_bytes == config.weight_bytes(1, 3, 4)


async def test_drop_and_restore_on_one_engine(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    """Memory numbers of a drop; a running request survives drop + restore (its dropped layers' KV is
    recomputed because nobody held it) and frees every block."""
    engine = await start_engine(engines, model_dir, block_size=4, num_blocks=64)
    stream = engine.generate(request("r", PROMPTS[1]))
    got = list((await anext(stream)).new_token_ids)
    dropped = await engine.drop_layers((0, 2))
    assert dropped.layers_before == (0, 4) and dropped.layers_after == (0, 2)
    assert dropped.weight_bytes_after < dropped.weight_bytes_before
    assert dropped.kv_blocks_after > 2 * dropped.kv_blocks_before  # freed weights + half-size blocks
    assert dropped.weight_bytes_after + dropped.kv_bytes_after <= dropped.budget_bytes
    assert engine.allocator.num_blocks == dropped.kv_blocks_after
    with pytest.raises(EngineError, match="alone"):
        engine.generate(request("new", PROMPTS[0]))
    steps = engine.core.num_steps
    await asyncio.sleep(0.05)
    assert engine.core.num_steps == steps  # no step without every layer
    restored = await engine.restore_layers()
    assert restored.layers_after == (0, 4) and restored.kv_blocks_after == 64
    assert restored.weight_bytes_after == dropped.weight_bytes_before
    got += await collect_stream(stream)
    assert got == reference[1]
    assert engine.scheduler.num_preemptions == 1  # recomputed: the dropped layers' KV was gone
    assert_no_leak(engine)


async def test_kv_moves_between_engines(
    model_dir: Path, reference: dict[int, list[int]], engines: list[TorchEngine]
) -> None:
    """Export a running request's KV (every layer) from A, resume it on B with that KV: no recompute."""
    a = await start_engine(engines, model_dir, "a", block_size=4, num_blocks=64)
    b = await start_engine(engines, model_dir, "b", block_size=4, num_blocks=64)
    stream = a.generate(request("m", PROMPTS[3]))
    got: list[int] = []
    while len(got) < 10:
        got += (await anext(stream)).new_token_ids
    async with a.paused():
        seq = a.scheduler.requests["m"]
        payload = a.export_kv("m", list(range(4)))
        outputs = seq.output_token_ids
        await a.abort("m")
    assert payload["num_tokens"] == len(PROMPTS[3]) + len(outputs) - 1
    got = outputs  # (tokens sampled but not yet read from the stream are part of the state)
    await collect_stream(stream)
    resumed = EngineRequest(
        "m",
        PROMPTS[3],
        SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
        outputs,
        kv_transfer={"torch_kv": payload},
    )
    steps_before = b.core.num_steps
    tokens, _ = await collect(b, resumed)
    assert got + tokens == reference[3]
    assert b.core.num_steps - steps_before == NEW_TOKENS - len(outputs)  # one decode per token: nothing recomputed
    with pytest.raises(EngineError, match="paused"):
        a.export_kv("m", [0])
    assert_no_leak(a)
    assert_no_leak(b)


# ---------------------------------------------------------------------------------------------- live migration
class Client:
    """One request as a client sees it across engines (as an EngineActor streams it): tokens once, in order."""

    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = NEW_TOKENS) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.tokens: list[int] = []
        self.reasons: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def on(self, engine: TorchEngine, kv_transfer: dict[str, Any] | None = None) -> None:
        stream = engine.generate(
            EngineRequest(self.request_id, self.prompt, self.sampling, list(self.tokens), kv_transfer=kv_transfer)
        )

        async def consume() -> None:
            async for out in stream:
                self.tokens += out.new_token_ids
                if out.finish_reason is not None:
                    self.reasons.append(out.finish_reason)

        self.tasks.append(asyncio.create_task(consume()))

    def take_tail(self, frozen: FrozenRequest) -> None:
        assert frozen.output_token_ids[: len(self.tokens)] == self.tokens
        self.tokens += frozen.output_token_ids[len(self.tokens) :]

    async def wait_tokens(self, count: int) -> None:
        async with asyncio.timeout(30):
            while len(self.tokens) < count:
                await asyncio.sleep(0.001)

    async def finish(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 30)


async def migrate(
    src: MigratableTorchEngine, dst: MigratableTorchEngine, client: Client, mid: str
) -> list[StageReport]:
    """The MigratorActor's order: reserve, begin, pre-copy stages, stop, resume at dst, commit."""
    blocks = src.scheduler.blocks_for(len(client.prompt) + len(client.tokens))
    endpoint = await dst.migrate_in_reserve(mid, blocks + 2)
    assert endpoint is not None and endpoint.address.startswith("tcp://")
    await src.migrate_out_begin(client.request_id, mid, endpoint)
    reports = []
    for _ in range(4):
        report = await src.migrate_out_stage(mid)
        assert not report.request_finished
        reports.append(report)
        assert await dst.migrate_in_reserve(mid, report.total_blocks + 2) is not None
    frozen = await src.migrate_out_stop(mid)
    assert frozen.final_stage.copied_blocks >= 1  # at least the partial last block
    client.take_tail(frozen)
    client.on(dst, frozen.kv_transfer)
    await src.migrate_out_commit(mid)
    return reports


async def start_migratable(made: list[TorchEngine], model_dir: Path, name: str, **kwargs: Any) -> MigratableTorchEngine:
    engine = MigratableTorchEngine(name, model_dir, model_name=TINY.name, block_size=4, num_blocks=96, **kwargs)
    await engine.start()
    made.append(engine)
    assert await engine.migrate_in_reserve("warm-up", 1) is not None  # staging and data server up front
    await engine.migrate_in_release("warm-up")
    return engine


async def test_live_migration_back_and_forth_matches_never_migrated(
    model_dir: Path, engines: list[TorchEngine]
) -> None:
    a = await start_migratable(engines, model_dir, "mig-a")
    b = await start_migratable(engines, model_dir, "mig-b")
    assert isinstance(a, MigratableEngine)
    expected, _ = await collect(a, request("ref", PROMPTS[3], max_tokens=120))
    client = Client("m", PROMPTS[3], max_tokens=120)
    client.on(a)
    await client.wait_tokens(10)
    reports = await migrate(a, b, client, "ab")
    assert reports[0].copied_blocks > 0 and sum(r.copied_blocks for r in reports) >= reports[0].total_blocks - 2
    assert_no_leak(a)  # the source's blocks went with the last stage
    await client.wait_tokens(len(client.tokens) + 10)
    await migrate(b, a, client, "ba")
    await client.finish()
    assert client.tokens == expected
    assert client.reasons == ["migrated", "migrated", "length"]
    assert a.migration_counters["blocks_loaded"] > 0 and b.migration_counters["blocks_loaded"] > 0
    assert a.migration_counters["recomputed"] == b.migration_counters["recomputed"] == 0
    await asyncio.sleep(0.01)
    assert_no_leak(a)
    assert_no_leak(b)


async def test_a_stop_past_the_reservation_grows_it_from_free_blocks(
    model_dir: Path, engines: list[TorchEngine]
) -> None:
    """The request decodes far past what the destination reserved (2 blocks) before its stop; the destination
    has free blocks, so the last stage grows the reservation to the request's size instead of being refused:
    the request resumes there with its KV loaded (not recomputed), the same tokens, and the grown blocks are
    counted as used until it resumes; nothing leaks."""
    a = await start_migratable(engines, model_dir, "grow-a")
    b = await start_migratable(engines, model_dir, "grow-b")
    expected, _ = await collect(a, request("ref", PROMPTS[1], max_tokens=120))
    client = Client("g", PROMPTS[1], max_tokens=120)
    client.on(a)
    await client.wait_tokens(20)  # the prompt plus 20 tokens: many more than 2 blocks of 4 tokens
    endpoint = await b.migrate_in_reserve("mg", 2)
    assert endpoint is not None
    await a.migrate_out_begin("g", "mg", endpoint)
    frozen = await a.migrate_out_stop("mg")
    assert frozen.num_blocks > 2 and frozen.kv_transfer
    assert b.allocator.num_blocks - b.load().num_free_blocks >= frozen.num_blocks  # the growth counts as used
    client.take_tail(frozen)
    client.on(b, frozen.kv_transfer)
    await a.migrate_out_commit("mg")
    await client.finish()
    assert client.tokens == expected
    assert client.reasons == ["migrated", "length"]
    assert b.migration_counters["blocks_loaded"] == frozen.num_blocks
    assert b.migration_counters["recomputed"] == 0
    await asyncio.sleep(0.01)
    assert_no_leak(a)
    assert_no_leak(b)


async def test_a_refused_reservation_names_the_limit(model_dir: Path, engines: list[TorchEngine]) -> None:
    """The destination says which limit refused a reservation: its staging pool (8 slots here, far fewer than
    its 96 KV blocks), or its free KV blocks; nothing is held after either refusal."""
    b = await start_migratable(engines, model_dir, "small-staging", staging_blocks=8)
    with pytest.raises(ReservationRefused, match=r"^staging pool holds 8 blocks \(8 unreserved\), asked 9$"):
        await b.migrate_in_reserve("too-big", 9)
    with pytest.raises(ReservationRefused, match=r"^\d+ KV blocks free, asked 97 more \(97 in total\)$"):
        await b.migrate_in_reserve("too-big", 97)
    assert_no_leak(b)


async def test_migration_abort_paths(model_dir: Path, engines: list[TorchEngine]) -> None:
    a = await start_migratable(engines, model_dir, "ab-a")
    b = await start_migratable(engines, model_dir, "ab-b")
    expected, _ = await collect(a, request("ref", PROMPTS[1], max_tokens=120))

    # Before the stop: the request goes on at the source; the destination releases its reservation.
    client = Client("x", PROMPTS[1], max_tokens=120)
    client.on(a)
    await client.wait_tokens(5)
    endpoint = await b.migrate_in_reserve("m1", 40)
    assert endpoint is not None and b.load().num_free_blocks == b.allocator.num_blocks - 40
    await a.migrate_out_begin("x", "m1", endpoint)
    await a.migrate_out_stage("m1")
    assert await a.migrate_out_abort("m1") is None
    await b.migrate_in_release("m1")
    await b.migrate_in_release("m1")  # idempotent
    await client.finish()
    assert client.tokens == expected and client.reasons == ["length"]
    assert_no_leak(b)

    # After the stop: the frozen state (no KV) resumes elsewhere by recompute, with the same tokens.
    client = Client("y", PROMPTS[1], max_tokens=120)
    client.on(a)
    await client.wait_tokens(5)
    endpoint = await b.migrate_in_reserve("m2", 40)
    assert endpoint is not None
    await a.migrate_out_begin("y", "m2", endpoint)
    await a.migrate_out_stop("m2")
    frozen = await a.migrate_out_abort("m2")
    assert frozen is not None and frozen.kv_transfer == {}
    await b.migrate_in_release("m2")
    client.take_tail(frozen)
    client.on(b)
    await client.finish()
    assert client.tokens == expected and client.reasons == ["migrated", "length"]

    # The stop copies more blocks than the destination reserved and the destination has no room to grow
    # the reservation (another reservation holds its free blocks): the stop fails, the frozen state comes
    # back without KV and the request resumes by recompute, with the same tokens.
    client = Client("w", PROMPTS[1], max_tokens=120)
    client.on(a)
    await client.wait_tokens(5)
    endpoint = await b.migrate_in_reserve("m4", 2)
    assert endpoint is not None
    assert await b.migrate_in_reserve("hog", b.allocator.num_free) is not None
    await a.migrate_out_begin("w", "m4", endpoint)
    with pytest.raises(MigrationAborted, match="exceeds the reservation of 2 blocks"):
        await a.migrate_out_stop("m4")
    frozen = await a.migrate_out_abort("m4")
    assert frozen is not None and frozen.kv_transfer == {}
    await b.migrate_in_release("m4")
    await b.migrate_in_release("hog")
    assert_no_leak(a)
    assert_no_leak(b)  # the refused growth took nothing
    client.take_tail(frozen)
    client.on(b)
    await client.finish()
    assert client.tokens == expected

    # The destination cannot hold the blocks; a request that ends while migrating reports it.
    with pytest.raises(ReservationRefused, match=rf"KV blocks free, asked {b.allocator.num_blocks + 1} more"):
        await b.migrate_in_reserve("big", b.allocator.num_blocks + 1)
    client = Client("z", PROMPTS[0], max_tokens=12)
    client.on(a)
    await client.wait_tokens(1)
    endpoint = await b.migrate_in_reserve("m3", 10)
    assert endpoint is not None
    await a.migrate_out_begin("z", "m3", endpoint)
    await client.finish()
    assert (await a.migrate_out_stage("m3")).request_finished
    with pytest.raises(EngineError, match="ended before it could stop"):
        await a.migrate_out_stop("m3")
    assert await a.migrate_out_abort("m3") is None
    await b.migrate_in_release("m3")
    assert_no_leak(a)
    assert_no_leak(b)


# ---------------------------------------------------------------------------------------------- through Drover
@pytest.fixture(scope="module")
def torch_cluster(nats_url: str, model_dir: Path) -> Iterator[InProcessCluster]:
    """Control plane + two migratable torch engines on real NATS and real actors, in this process."""
    settings = load_settings(overrides={"nats": {"url": nats_url}, "engine": {"heartbeat_interval_s": 0.05}})
    cluster = InProcessCluster(settings=settings, tokenizer=ByteTokenizer())
    cluster.start_control()
    for name in ("torch-a", "torch-b"):
        # block_size 32: the migrator's headroom (2 blocks) must cover what the fast tiny model decodes
        # between the last pre-copy stage and the stop.
        engine = MigratableTorchEngine(name, model_dir, model_name=settings.model.name, block_size=32, num_blocks=64)
        cluster.add_engine(engine)
    yield cluster
    cluster.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def drover(torch_cluster: InProcessCluster) -> AsyncIterator[DroverClient]:
    client = await DroverClient(torch_cluster.url, name="torch-client").connect()
    await client.wait_for_instances(2, timeout_s=30)
    await client.policy({"migration_enabled": "false"})  # the test decides every move
    yield client
    await client.close()


async def test_dispatch_and_migration_through_drover(drover: DroverClient, reference: dict[int, list[int]]) -> None:
    sampling = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    results = await asyncio.gather(*(drover.generate(text, sampling=sampling) for text in TEXTS))
    assert [r.token_ids for r in results] == [reference[i] for i in range(len(TEXTS))]
    assert {r.done.instances[0] for r in results if r.done} == {"torch-a", "torch-b"}
    status = await drover.status()
    assert {i.info.engine_kind for i in status.instances} == {"torch"}

    long = SamplingParams(max_tokens=300, ignore_eos=True)
    expected = (await drover.generate(TEXTS[3], sampling=long)).token_ids
    stream = await drover.submit(TEXTS[3], sampling=long, request_id="torch-mig")
    replies = []
    for target in (10, 100):
        async for _ in stream.events():
            if len(stream.result_data.token_ids) >= target:
                break
        status = await drover.status()
        source = next(r.instance_id for r in status.requests if r.request_id == "torch-mig")
        replies.append(await drover.migrate("torch-mig", "torch-b" if source == "torch-a" else "torch-a"))
    result = await stream.result()
    assert result.token_ids == expected  # exact whether a migration moved KV or fell back to a recompute
    assert result.done is not None
    assert any(r.ok for r in replies), [r.message for r in replies]
    assert len(result.done.instances) >= 2
