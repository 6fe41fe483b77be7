"""Continuous batching with chunked prefill and preemption by recompute (vLLM v1's scheduling model).

Every step the scheduler hands out a token budget: first to running requests in priority order (a decode
takes one token, an unfinished prefill takes the next chunk), then to waiting requests, which join the
batch with as much of their prompt as the remaining budget allows. A request that needs a new KV block
when none is free preempts the lowest-priority, latest running request: its blocks are freed and it goes
back to the front of the waiting queue to be recomputed from its tokens (prompt + output so far), which
yields the same tokens as if it had never been interrupted.

Pure Python: block ids come from a :class:`~engines.torch.kv_cache.BlockAllocator`; no tensors here.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from engines.torch.kv_cache import BlockAllocator


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_order = itertools.count()


@dataclass(eq=False, slots=True)
class Sequence:
    """One request's token state. ``token_ids`` is prompt + every output token (resumed ones included)."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_output_tokens: int  # the request's max_tokens, counting outputs produced before a resume
    stop_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int = 0
    order: int = field(default_factory=lambda: next(_order))  # FCFS tie-break, kept across preemptions
    num_computed: int = 0  # tokens whose KV is in this sequence's blocks
    block_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def decoding(self) -> bool:
        return self.num_output_tokens > 0 and self.num_computed >= self.num_tokens - 1


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq`` from position ``start``; ``sample`` when they end its context."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids[self.start : self.start + self.num_tokens]


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True, slots=True)
class SeqUpdate:
    """New tokens of one sequence after a step (``finish_reason`` set when it ended)."""

    seq: Sequence
    new_token_ids: list[int]
    finish_reason: str | None = None


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Sequence] = {}
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.unfit: list[Sequence] = []  # finished by schedule(): they can never fit the pool (drain_unfit())

    # ------------------------------------------------------------------------------------------ queries
    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def waiting_blocks(self) -> int:
        return sum(self.blocks_for(s.num_tokens + 1) for s in self.waiting)

    def head_waiting_blocks(self) -> int:
        ordered = self._waiting_order()
        return self.blocks_for(ordered[0].num_tokens + 1) if ordered else 0

    def seqs_holding_blocks(self) -> list[Sequence]:
        return [s for s in self.running if s.block_ids]

    # ------------------------------------------------------------------------------------------ membership
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        seq.status = SeqStatus.WAITING
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Admit a sequence whose blocks are already allocated and filled (KV loaded, not recomputed)."""
        if seq.request_id in self.requests:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        seq.status = SeqStatus.RUNNING
        self.requests[seq.request_id] = seq
        self.running.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        seq = self.requests.get(request_id)
        if seq is not None:
            self.finish(seq, "abort")
        return seq

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self.requests.pop(seq.request_id, None)

    def detach(self, seq: Sequence) -> None:
        """Remove a sequence without freeing its blocks (the caller takes ownership of them)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.requests.pop(seq.request_id, None)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = "migrated"

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it for recompute (ahead of newer requests)."""
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_ids)
        seq.block_ids = []

    def remap_blocks(self, moves: dict[int, int]) -> None:
        """Rewrite block tables after the KV bytes moved (compaction)."""
        if not moves:
            return
        for seq in self.running:
            seq.block_ids = [moves.get(b, b) for b in seq.block_ids]
        self.allocator.apply(moves)

    # ------------------------------------------------------------------------------------------ scheduling
    def _waiting_order(self) -> list[Sequence]:
        return sorted(self.waiting, key=lambda s: (-s.priority, s.order))

    def _victim_order(self) -> list[Sequence]:
        """Running sequences, most deserving first (high priority, then first come)."""
        return sorted(self.running, key=lambda s: (-s.priority, s.order))

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_for(num_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        queue = self._victim_order()
        while queue and budget > 0:
            seq = queue.pop(0)
            start = seq.num_computed
            n = min(seq.num_tokens - start, budget)
            while not self._grow(seq, start + n):
                victim = queue.pop() if queue else seq
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                chunks.append(ScheduledChunk(seq, start, n, start + n == seq.num_tokens))
                budget -= n
        if not preempted:
            for seq in self._waiting_order():
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                n = min(seq.num_tokens, budget)
                if self.blocks_for(seq.num_tokens + 1) > self.allocator.num_blocks:
                    self.finish(seq, "abort")  # can never fit here (the pool shrank under it)
                    self.unfit.append(seq)
                    continue
                if not self._grow(seq, n):
                    break
                self.waiting.remove(seq)
                seq.status = SeqStatus.RUNNING
                self.running.append(seq)
                chunks.append(ScheduledChunk(seq, 0, n, n == seq.num_tokens))
                budget -= n
        return SchedulerOutput(chunks, preempted)

    def drain_unfit(self) -> list[Sequence]:
        """Sequences :meth:`schedule` ended because they can no longer fit (their owners must be told)."""
        unfit, self.unfit = self.unfit, []
        return unfit

    def commit(self, output: SchedulerOutput, sampled: list[int]) -> list[SeqUpdate]:
        """Apply a finished step: advance computed tokens, append sampled ones (one per ``sample`` chunk)."""
        updates: list[SeqUpdate] = []
        tokens = iter(sampled)
        for chunk in output.chunks:
            token = next(tokens) if chunk.sample else None
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:  # aborted while the step ran
                continue
            seq.num_computed = chunk.start + chunk.num_tokens
            if token is None:
                continue
            seq.token_ids.append(token)
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.finish(seq, reason)
            updates.append(SeqUpdate(seq, [token], reason))
        return updates

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= seq.max_output_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None
