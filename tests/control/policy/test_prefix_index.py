"""The global prefix index: incremental batches, lost/duplicate/reordered batches, resync, expiry, bounds."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from control.policy.prefix_index import PrefixIndex, PrefixIndexParams


def test_apply_and_overlap() -> None:
    index = PrefixIndex()
    assert not index.apply("a", epoch="e", seq=0, stored=[1, 2, 3])
    assert index.overlap("a", (1, 2, 3, 4)) == 3
    assert index.deepest((1, 2, 3, 4)) == 3
    assert index.holders(2) == {"a"}
    index.apply("a", epoch="e", seq=1, removed=[3])
    assert index.overlap("a", (1, 2, 3, 4)) == 2
    assert index.holders(3) == set()


def test_gap_marks_resync_and_duplicates_are_dropped() -> None:
    index = PrefixIndex()
    index.apply("a", epoch="e", seq=0, stored=[1])
    assert index.apply("a", epoch="e", seq=2, stored=[2])  # batch 1 lost
    assert index.needs_resync("a") and index.stats.gaps == 1
    index.apply("a", epoch="e", seq=1, removed=[1])  # late: ignored
    assert index.holds("a", 1) and index.stats.duplicates == 1
    assert index.resync("a", epoch="e", seq=3, hashes=[5, 6])
    assert not index.needs_resync("a")
    assert not index.holds("a", 1) and index.holds("a", 6)
    assert not index.resync("a", epoch="e", seq=2, hashes=[9])  # an older listing is ignored


def test_new_epoch_drops_old_entries_and_heartbeat_reveals_lost_last_batch() -> None:
    index = PrefixIndex()
    index.apply("a", epoch="e1", seq=0, stored=[1, 2])
    index.apply("a", epoch="e2", seq=0, stored=[3])  # the engine restarted
    assert not index.holds("a", 1) and index.holds("a", 3) and not index.needs_resync("a")
    assert not index.heard("a", epoch="e2", seq=0, now=1.0)
    assert index.heard("a", epoch="e2", seq=1, now=1.0)  # batch 1 never arrived


def test_expiry_and_removal() -> None:
    index = PrefixIndex(PrefixIndexParams(expiry_s=5.0))
    index.apply("a", epoch="e", seq=0, stored=[1], now=0.0)
    index.apply("b", epoch="e", seq=0, stored=[1], now=4.0)
    assert index.expire(6.0) == ["a"]
    assert index.holders(1) == {"b"}
    index.remove_instance("b")
    assert index.holders(1) == set() and index.total_entries() == 0


def test_bounded_by_capacity() -> None:
    index = PrefixIndex()
    index.set_capacity("a", 10)
    index.apply("a", epoch="e", seq=0, stored=range(100))
    assert index.num_blocks("a") == 10
    assert index.holds("a", 99) and not index.holds("a", 0)  # oldest dropped first
    assert index.total_entries() == 10


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 0.5))
def test_lossy_feed_converges_after_resync(seed: int, loss: float) -> None:
    """Batches lost, duplicated and reordered at random: entries are always ones the engine held at some
    point, and after the next full listing the index equals the engine's cache exactly."""
    rng = random.Random(seed)
    truth: set[int] = set()
    ever: set[int] = set()
    index = PrefixIndex()
    delivered: list[tuple[int, list[int], list[int]]] = []
    for seq in range(40):
        stored = [rng.randrange(60) for _ in range(rng.randrange(4))]
        removed = [h for h in truth if rng.random() < 0.2]
        truth.difference_update(removed)
        truth.update(stored)
        ever.update(stored)
        batch = (seq, stored, removed)
        if rng.random() >= loss:
            delivered.append(batch)
        if rng.random() < 0.1:
            delivered.append(batch)  # duplicate
    for i in range(len(delivered) - 1):
        if rng.random() < 0.1:
            delivered[i], delivered[i + 1] = delivered[i + 1], delivered[i]
    for seq, stored, removed in delivered:
        index.apply("a", epoch="e", seq=seq, stored=stored, removed=removed)
        assert {h for h in range(60) if index.holds("a", h)} <= ever
    index.resync("a", epoch="e", seq=40, hashes=sorted(truth))
    assert {h for h in range(60) if index.holds("a", h)} == truth
    assert {h for h in range(60) if index.holders(h)} == truth


def test_a_chunked_listing_applies_whole_or_not_at_all() -> None:
    index = PrefixIndex()
    index.apply("i", epoch="e", seq=0, stored=[1, 2, 3])
    listing = list(range(100, 130))
    assert not index.resync_chunk("i", epoch="e", seq=5, chunk=0, chunks=3, hashes=listing[:10])
    assert index.num_blocks("i") == 3  # nothing shows until the last chunk
    assert not index.resync_chunk("i", epoch="e", seq=5, chunk=1, chunks=3, hashes=listing[10:20])
    assert index.resync_chunk("i", epoch="e", seq=5, chunk=2, chunks=3, hashes=listing[20:])
    assert index.num_blocks("i") == 30 and not index.holds("i", 1) and index.holds("i", 129)
    # a lost chunk: what was collected is dropped, the old entries stay, and the engine is asked again
    assert not index.resync_chunk("i", epoch="e", seq=6, chunk=0, chunks=3, hashes=[7])
    assert not index.resync_chunk("i", epoch="e", seq=6, chunk=2, chunks=3, hashes=[9])
    assert index.needs_resync("i") and index.num_blocks("i") == 30 and index.stats.chunk_gaps == 1
    # a listing started again from chunk 0 replaces a half-received one
    index.resync_chunk("i", epoch="e", seq=7, chunk=0, chunks=2, hashes=[11])
    index.resync_chunk("i", epoch="e", seq=8, chunk=0, chunks=2, hashes=[21])
    assert index.resync_chunk("i", epoch="e", seq=8, chunk=1, chunks=2, hashes=[22])
    assert sorted(h for h in (11, 21, 22) if index.holds("i", h)) == [21, 22] and not index.needs_resync("i")


def test_a_chunked_listing_is_bounded_by_the_instance_capacity() -> None:
    index = PrefixIndex()
    index.set_capacity("i", 10)
    assert not index.resync_chunk("i", epoch="e", seq=0, chunk=0, chunks=3, hashes=list(range(8)))
    assert not index.resync_chunk("i", epoch="e", seq=0, chunk=1, chunks=3, hashes=list(range(8, 16)))
    assert index.needs_resync("i") and index.num_blocks("i") == 0


def test_no_resync_is_asked_for_while_a_listing_arrives_and_one_is_after_it_broke_off() -> None:
    index = PrefixIndex()
    index.heard("i", epoch="e", seq=4, now=0.0)  # a control plane that joined mid-stream
    assert index.needs_resync("i")
    index.resync_chunk("i", epoch="e", seq=5, chunk=0, chunks=3, hashes=[1])
    assert not index.needs_resync("i")  # asking again would restart the listing
    index.resync_chunk("i", epoch="e", seq=5, chunk=1, chunks=3, hashes=[2])
    index.heard("i", epoch="e", seq=5, now=1.0)  # the last chunk was lost: a keepalive came instead
    assert index.needs_resync("i") and index.num_blocks("i") == 0
    index.resync_chunk("i", epoch="e", seq=6, chunk=0, chunks=2, hashes=[1])
    index.apply("i", epoch="e", seq=7, stored=[9])  # events after a listing whose last chunk was lost
    assert index.needs_resync("i") and index.stats.chunk_gaps == 2


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_overlap_through_the_holder_sets_equals_the_instances_own_binary_search(seed: int) -> None:
    """``overlap`` probes the global hash -> holders map (hot in the CPU cache) instead of the instance's own
    map, and reuses the first probe of a ``deep_holders`` call on the same prompt; both maps are kept by every
    change, so its answer must be the instance's own binary search's, including on holdings whose chains a
    lost removal broke, after capacity drops, clears, resyncs, restarts, and a report after the choice."""
    rng = random.Random(seed)
    index = PrefixIndex(PrefixIndexParams(default_capacity_blocks=48))
    chains = [[rng.getrandbits(40) for _ in range(rng.randint(1, 16))] for _ in range(5)]
    seqs: dict[str, int] = {}
    for _ in range(120):
        iid = f"i{rng.randrange(4)}"
        chain = rng.choice(chains)
        roll = rng.random()
        if roll < 0.05:
            index.set_capacity(iid, rng.randint(4, 40))
        elif roll < 0.1:
            index.resync(iid, epoch="e", seq=seqs.get(iid, 0), hashes=rng.sample(chain, rng.randint(0, len(chain))))
        elif roll < 0.13:
            index.remove_instance(iid)
            seqs.pop(iid, None)
        else:
            seq = seqs[iid] = seqs.get(iid, -1) + 1
            batch: dict[str, object] = {"stored": chain[: rng.randint(1, len(chain))]}
            if roll < 0.3:
                batch = {"removed": chain[rng.randrange(len(chain)) :]}
            elif roll < 0.35:
                batch = {"cleared": True}
            elif roll < 0.5:  # a broken chain
                batch = {"stored": sorted(rng.sample(chain, rng.randint(1, len(chain))), key=chain.index)}
            index.apply(iid, epoch="e", seq=seq, **batch)  # type: ignore[arg-type]
        hashes = rng.choice(chains)
        upto = rng.choice((None, None, rng.randint(0, len(hashes))))
        at_least = rng.choice((0, 0, rng.randint(0, min(2, len(hashes) if upto is None else upto))))
        if rng.random() < 0.6:  # a choice first (its first probe is reused while nothing changed) ...
            index.deep_holders(hashes, 4)
            if rng.random() < 0.3:  # ... and a cache report between the choice and the dispatch
                changed = f"i{rng.randrange(4)}"
                seq = seqs[changed] = seqs.get(changed, -1) + 1
                index.apply(changed, epoch="e", seq=seq, stored=hashes[: rng.randint(1, len(hashes))])
        for instance in ("i0", "i1", "i2", "i3"):
            lo, hi = at_least, len(hashes) if upto is None else min(upto, len(hashes))
            while lo < hi:  # the instance's own binary search, through ``holds``
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if index.holds(instance, hashes[mid - 1]) else (lo, mid - 1)
            assert index.overlap(instance, hashes, upto, at_least) == lo
