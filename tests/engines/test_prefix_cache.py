"""The simulated engine's prefix cache (vLLM automatic prefix caching): hits skip prefill, cached free blocks
are evicted least recently freed first, events report what is stored and evicted."""

from __future__ import annotations

from engines.sim.core import SimEngineConfig, SimEngineCore, SimRequest
from engines.sim.cost_model import LLAMA7B_A100
from engines.sim.prefix_cache import PrefixCache, engine_block_hashes

BS = 16


def make_core(num_blocks: int = 256) -> SimEngineCore:
    core = SimEngineCore(
        SimEngineConfig(
            block_size=BS, num_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=4096
        ),
        LLAMA7B_A100,
    )
    core.prefix_cache = PrefixCache(BS)
    return core


def request(rid: str, trace_ids: tuple[int, ...], prompt_len: int, arrival: float = 0.0) -> SimRequest:
    r = SimRequest(rid, prompt_len=prompt_len, max_tokens=2, arrival_time=arrival)
    r.block_hashes = engine_block_hashes(trace_ids, prompt_len, BS)
    return r


def run(core: SimEngineCore, r: SimRequest, start: float) -> float:
    """Run ``r`` alone to completion from ``start``; returns its TTFT."""
    core.add(r)
    now = start
    while core.has_work:
        end = core.plan(now)
        assert end is not None
        core.finish_plan()
        now = end
    return r.first_token_time - start


def test_engine_hashes_follow_trace_prefixes() -> None:
    a = engine_block_hashes((1, 2, 3), 1500, BS)
    b = engine_block_hashes((1, 2, 9), 1500, BS)
    assert len(a) == 1500 // BS
    per_trace_block = 512 // BS
    assert a[: 2 * per_trace_block] == b[: 2 * per_trace_block]  # the first 1,024 tokens are shared
    assert a[2 * per_trace_block] != b[2 * per_trace_block]
    assert len(set(a)) == len(a)
    assert engine_block_hashes((5,), 1000, BS) == engine_block_hashes((5,), 1000, BS)  # deterministic


def test_second_request_with_same_prefix_skips_cached_prefill() -> None:
    core = make_core()
    cold = run(core, request("a", (1, 2, 3), 1500), 0.0)
    warm = run(core, request("b", (1, 2, 3), 1500), 10.0)
    stats = core.prefix_cache.stats  # type: ignore[union-attr]
    assert stats.admissions == 2
    assert stats.hit_tokens == (1500 - 1) // BS * BS  # all full blocks but never the last token
    assert warm < cold / 5  # one small chunk instead of the whole prompt (the cost model charges tokens)
    assert core.allocated_blocks == 0


def test_partial_prefix_hit_and_no_hit_for_other_prompt() -> None:
    core = make_core()
    run(core, request("a", (1, 2, 3), 1536), 0.0)
    run(core, request("b", (1, 2, 7), 1536), 10.0)
    run(core, request("c", (8, 9), 1000), 20.0)
    stats = core.prefix_cache.stats  # type: ignore[union-attr]
    assert stats.hit_tokens == 1024  # b shares two trace blocks with a; c nothing


def test_cached_free_blocks_evicted_lru_when_memory_is_needed() -> None:
    core = make_core(num_blocks=100)  # 1,600 tokens
    run(core, request("a", (1, 2), 1000), 0.0)  # 62 full blocks cached, free
    run(core, request("b", (3, 4), 1000), 10.0)  # needs 63: evicts most of a's blocks
    cache = core.prefix_cache
    assert cache is not None
    assert cache.num_cached_blocks <= 100
    stored, removed = cache.drain_events()
    assert stored and removed and not set(stored) & set(removed)
    assert cache.stats.evicted_blocks > 0
    assert run(core, request("b2", (3, 4), 1000), 20.0) < run(core, request("a2", (1, 2), 1000), 30.0)


def test_aborted_request_leaves_its_blocks_cached() -> None:
    core = make_core()
    r = request("a", (1, 2, 3), 1500)
    core.add(r)
    end = core.plan(0.0)
    assert end is not None
    core.finish_plan()
    core.remove("a")  # an abort: its blocks are free but still cached
    assert core.prefix_cache is not None and core.prefix_cache.num_cached_blocks == 1500 // BS
    assert core.allocated_blocks == 0


def test_trace_level_hashes_are_mapped_onto_engine_blocks() -> None:
    """A request that carries a trace's 512-token ids (``hash_block_tokens``) hits like one that carries
    engine-block hashes."""
    core = make_core()
    run(core, request("a", (1, 2, 3), 1500), 0.0)
    coarse = SimRequest("b", prompt_len=1500, max_tokens=2, block_hashes=(1, 2, 3), hash_block_tokens=512)
    run(core, coarse, 10.0)
    assert core.prefix_cache is not None
    assert core.prefix_cache.stats.hit_tokens == (1500 - 1) // BS * BS


def test_reporter_numbers_batches_lists_first_and_on_request() -> None:
    from engines.sim.prefix_cache import PrefixReporter

    core = make_core()
    cache = core.prefix_cache
    assert cache is not None
    woken: list[int] = []
    reporter = PrefixReporter(cache, full_every_s=1000.0, wake=lambda: woken.append(1))
    assert reporter.report(now=0.0).seq == -1  # nothing collected yet: a keepalive before any batch
    run(core, request("a", (1, 2), 700), 0.0)
    reporter.collect()  # the first collection is a full listing
    first = reporter.report(now=0.1)
    assert first.full and first.seq == 0 and set(first.stored) == set(cache.cached_hashes())
    assert first.num_cached == cache.num_cached_blocks > 0
    run(core, request("b", (3, 4), 700), 1.0)
    reporter.collect()
    delta = reporter.report(now=0.2)
    assert not delta.full and delta.seq == 1 and delta.stored and not set(delta.stored) & set(first.stored)
    keepalive = reporter.report(now=0.3)
    assert keepalive.seq == 1 and not keepalive.stored  # seq moves only with content
    reporter.request_full()  # the control plane lost track
    assert woken  # the engine's loop is asked to collect
    reporter.collect()
    listing = reporter.report(now=0.4)
    assert listing.full and listing.seq == 2 and set(listing.stored) == set(cache.cached_hashes())
    assert reporter.resyncs_requested == 1


def test_reporter_lists_again_after_full_every_s() -> None:
    from engines.sim.prefix_cache import PrefixReporter

    core = make_core()
    assert core.prefix_cache is not None
    reporter = PrefixReporter(core.prefix_cache, full_every_s=10.0)
    reporter.collect()
    assert reporter.report(now=0.0).full
    reporter.collect()
    assert not reporter.report(now=5.0).full
    assert not reporter.report(now=10.5).full  # due: the listing is collected on the loop first
    reporter.collect()
    assert reporter.report(now=10.6).full


def test_reporter_sends_a_big_listing_in_chunks_then_the_events_that_followed() -> None:
    from control.policy.prefix_index import PrefixIndex
    from engines.sim.prefix_cache import PrefixReporter

    core = make_core(num_blocks=512)
    cache = core.prefix_cache
    assert cache is not None
    reporter = PrefixReporter(cache, full_every_s=1000.0)
    run(core, request("a", (1, 2, 3), 1500), 0.0)  # 93 cached blocks
    reporter.collect()
    index = PrefixIndex()
    reports = []
    for k in range(4):
        report = reporter.report(now=0.1 * k, max_blocks=40)
        reports.append(report)
        if k == 1:  # events while the listing is being sent wait for it
            run(core, request("b", (7, 8), 700), 1.0)
            reporter.collect()
        if not report.full:
            continue
        applied = index.resync_chunk(
            "i", epoch=report.epoch, seq=report.seq, chunk=report.chunk, chunks=report.chunks, hashes=report.stored
        )
        assert applied == (k == 2)  # atomically, with the last chunk
    assert [(r.full, r.seq, r.chunk, r.chunks) for r in reports[:3]] == [
        (True, 0, 0, 3),
        (True, 0, 1, 3),
        (True, 0, 2, 3),
    ]
    assert all(len(r.stored) <= 40 for r in reports)
    assert not reports[3].full and reports[3].seq == 1 and reports[3].stored  # the events, after the listing
    assert len(reports[3].stored) == 40  # 43 new blocks: the events are capped per report too
    rest = reporter.report(now=0.5, max_blocks=40)
    assert rest.seq == 2 and len(rest.stored) == 3
    for report in (reports[3], rest):
        index.apply("i", epoch=report.epoch, seq=report.seq, stored=report.stored, removed=report.removed)
    assert index.num_blocks("i") == cache.num_cached_blocks and not index.needs_resync("i")
