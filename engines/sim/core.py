"""Discrete-event core of the simulated engine: paged KV blocks, continuous batching, preemption.

No clock of its own and no I/O: the caller says when a step starts (``plan(now)``) and when it ends
(``finish_plan()``), so the same core runs in virtual time inside the cluster simulator and in real time
inside :class:`engines.sim.engine.SimEngine`.

Scheduling follows vLLM v1 (``vllm/v1/core/sched/scheduler.py``): each step has a token budget
(``max_num_batched_tokens``); running requests are scheduled first, in admission order (decode needs one
token, a prefill in progress takes what the budget leaves, chunked); a request that cannot get the KV
blocks it needs preempts the *newest* running request (recompute: its blocks are freed and it goes back to
the front of the waiting queue) until it fits or preempts itself; then, if nothing was preempted this step,
waiting requests are admitted in order while ``max_num_seqs`` and the budget allow and their blocks fit
(the whole sequence's blocks, as vLLM's ``scheduler_reserve_full_isl``, unless ``reserve_full_prompt`` is
off; then only the first chunk's).
With ``chunked_prefill`` off the core follows vLLM v0's ``_schedule_default`` instead (Llumnix's engine):
waiting prompts are scheduled first, whole, with the full budget, and a step that schedules any runs no
decodes; the running requests decode only in steps where no prompt could start.
A request produces a token when its context is fully computed (the end of prefill, then every decode).

Fast-forward: when a step is decode-only and nothing can change until the earliest request finishes or
the blocks run out, ``plan(now, max_steps>1)`` plans a run of identical-shape steps at once; the caller can
``advance_to(t)`` to materialise the state inside the run and ``truncate(t)`` it when something external
happens (a new request, a migration), exactly as if it had stepped one by one.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from control.adaptive_budget import AdaptiveStepBudget, BudgetState
from engines.sim.cost_model import DEFAULT_COST_MODEL, CostModel
from engines.sim.prefix_cache import PrefixCache

WAITING, RUNNING, FINISHED, REMOVED = "waiting", "running", "finished", "removed"


@dataclass(frozen=True, slots=True)
class SimEngineConfig:
    """Shape of a simulated instance (defaults match Drover's live engine settings)."""

    block_size: int = 32
    num_blocks: int = 512
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    chunked_prefill: bool = True  # vLLM v1 default; Llumnix's vLLM v0 prefilled whole prompts
    watermark_blocks: int = 0  # blocks kept free when admitting (vLLM v0 used 1 %; v1 none)
    reserve_full_prompt: bool = True
    """Admit a waiting request only when its whole sequence (prompt and any output so far) fits the free
    blocks, not just its first chunk: vLLM v1's ``scheduler_reserve_full_isl`` (default on). Off, a long
    prompt is admitted chunk by chunk and can thrash beside a growing older request (older vLLM v1)."""
    adaptive_budget: AdaptiveStepBudget | None = None
    """Choose each step's token budget between the rule's ceiling and its SLO-sized floor by recent pressure
    (``control/adaptive_budget.py``) instead of ``max_num_batched_tokens``; None: the fixed budget, as vLLM."""


@dataclass(slots=True, eq=False)
class SimRequest:
    """Mutable state of one request inside a core (counts only; token ids live in the live wrapper)."""

    request_id: str
    prompt_len: int
    max_tokens: int  # total output tokens wanted, counting ones generated before a resume
    target_output: int = 0  # where it stops (<= max_tokens; earlier when a stop probability fires)
    num_output: int = 0
    num_computed: int = 0
    num_blocks: int = 0
    priority: int = 0
    arrival_time: float = 0.0
    state: str = WAITING
    admitted_time: float = -1.0
    first_token_time: float = -1.0
    finish_time: float = -1.0
    num_preemptions: int = 0
    recomputed_tokens: int = 0
    preempted_at: float = -1.0
    preemption_loss: float = 0.0
    tag: object = None  # the caller's per-request data (the simulator's metrics record)
    block_hashes: tuple[int, ...] = ()  # prefix-block hashes of the prompt (a trace's hash_ids), for prefix caching
    hash_block_tokens: int = 0  # tokens each of ``block_hashes`` covers; 0: one hash per engine block (chained)
    _waiting_need: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.target_output <= 0:
            self.target_output = self.max_tokens

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        return self.num_output >= self.target_output


@dataclass(frozen=True, slots=True)
class SimOutput:
    """Tokens a request produced in a finished plan (``new_tokens`` >= 1)."""

    request: SimRequest
    new_tokens: int
    finished: bool
    first: bool  # this output carries the request's first token


@dataclass(slots=True)
class _Plan:
    start: float
    end: float
    steps: int
    done: int
    entries: list[tuple[SimRequest, int]]  # (request, tokens computed this step) for single steps
    decode_seqs: int
    prefill_tokens: int  # prompt tokens the step computes, as its cost counts them (0 in a multi-step run)
    context0: int  # sum of decode contexts at the first step (multi-step runs only)
    base_computed: list[int]  # per entry, num_computed at plan time (multi-step runs only)
    run_base: float = 0.0  # multi-step runs: the first step's ms and the ms each later step adds
    run_growth: float = 0.0
    bump_ms: float = math.inf  # multi-step runs: elapsed ms by which the next step that adds a block has ended


class SimEngineCore:
    """One simulated instance. Not thread-safe; one owner drives it."""

    def __init__(self, config: SimEngineConfig | None = None, cost_model: CostModel | None = None) -> None:
        self.config = config or SimEngineConfig()
        self.cost = cost_model or DEFAULT_COST_MODEL
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.requests: dict[str, SimRequest] = {}
        self.allocated_blocks = 0  # held by running requests
        self.reserved_blocks = 0  # capacity held for incoming migrations
        self.outgoing_blocks = 0  # held by requests migrating out, until commit
        self.waiting_blocks = 0  # blocks all waiting requests need
        self.num_preemptions = 0  # cumulative
        self.num_steps = 0
        self.busy_time = 0.0
        self.version = 0  # bumped whenever block-level state changes (the simulator's snapshot cache key)
        self._plan: _Plan | None = None
        self._pending_removal: dict[str, bool] = {}  # request id -> keep its blocks
        self._outgoing: dict[str, int] = {}  # request id -> blocks held for its migration
        # Prefix caching (engines/sim/prefix_cache.py): None = off. Every hook below is one guarded line.
        self.prefix_cache: PrefixCache | None = None
        # the adaptive step budget's memory (control/adaptive_budget.py): BudgetState's fields, kept flat
        self.budget_share = 0.0
        self.budget_pressed = False
        self.budget_seen = 0.0
        self.budget_second = 0.0

    # ------------------------------------------------------------------------------------------ capacity
    @property
    def num_free_blocks(self) -> int:
        return self.config.num_blocks - self.allocated_blocks - self.reserved_blocks - self.outgoing_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.config.block_size) if num_tokens > 0 else 0

    def max_request_blocks(self, prompt_len: int, max_tokens: int) -> int:
        return self.blocks_for(min(prompt_len + max_tokens, self.config.max_model_len))

    def can_ever_fit(self, prompt_len: int, max_tokens: int) -> str | None:
        """A user-facing reason this request can never run here, or None."""
        if prompt_len <= 0:
            return "empty prompt"
        if prompt_len >= self.config.max_model_len:
            return f"prompt of {prompt_len} tokens does not fit max_model_len {self.config.max_model_len}"
        if self.max_request_blocks(prompt_len, max_tokens) > self.config.num_blocks:
            return f"request needs more than the instance's {self.config.num_blocks} KV blocks"
        return None

    # ------------------------------------------------------------------------------------------ requests
    @property
    def has_plan(self) -> bool:
        return self._plan is not None

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def add(self, request: SimRequest) -> None:
        """Queue a new (or resumed-by-recompute) request; it is considered at the next step.

        Raises ValueError when it could never run here (see :meth:`can_ever_fit`): it would preempt
        itself forever.
        """
        reason = self.can_ever_fit(request.context_len, request.max_tokens - request.num_output)
        if reason is not None:
            raise ValueError(reason)
        cap = self.config.max_model_len - request.prompt_len
        request.target_output = min(request.target_output, request.max_tokens, max(1, cap))
        request.num_computed = 0
        request.num_blocks = 0
        self.requests[request.request_id] = request
        self._push_waiting(request, front=False)

    def add_resumed(self, request: SimRequest, now: float, reservation_blocks: int = 0) -> bool:
        """Resume a migrated request whose KV was copied in: it runs straight away, holding its blocks.

        ``reservation_blocks`` (held for it with :meth:`reserve`) are released first and its allocation
        taken from them. Returns False (changing nothing) when the blocks are not there.
        """
        needed = self.blocks_for(request.context_len)
        released = min(reservation_blocks, self.reserved_blocks)
        if needed > self.num_free_blocks + released:
            return False
        self.reserved_blocks -= released
        request.num_computed = max(0, request.context_len - 1)
        request.num_blocks = needed
        request.state = RUNNING
        if request.admitted_time < 0:
            request.admitted_time = now
        self.allocated_blocks += needed
        self.running.append(request)
        self.requests[request.request_id] = request
        self.version += 1
        return True

    def remove(self, request_id: str, *, keep_blocks: bool = False) -> SimRequest | None:
        """Take a request out (abort, or stop for migration).

        During a plan the request is removed when the plan finishes (it still gets that step's token);
        otherwise now. ``keep_blocks`` moves its blocks to ``outgoing_blocks`` (a migration's source holds
        them until :meth:`release_outgoing` of that request).
        """
        request = self.requests.get(request_id)
        if request is None:
            return None
        if self._plan is not None and request.state == RUNNING and self._in_plan(request):
            self._pending_removal[request_id] = keep_blocks
            return request
        self._detach(request, keep_blocks=keep_blocks)
        return request

    def release_outgoing(self, request_id: str) -> int:
        """Free the blocks a migrated-out request held here (after the destination resumed it)."""
        blocks = self._outgoing.pop(request_id, 0)
        self.outgoing_blocks -= blocks
        if self.prefix_cache is not None:  # prefix-cache hook: the migrated request's blocks are free now
            self.prefix_cache.release(request_id)
        if blocks:
            self.version += 1
        return blocks

    def reserve(self, num_blocks: int) -> bool:
        """Hold ``num_blocks`` more for an incoming migration; False when they are not free."""
        if num_blocks > self.num_free_blocks:
            return False
        self.reserved_blocks += num_blocks
        self.version += 1
        return True

    def release_reservation(self, num_blocks: int) -> None:
        self.reserved_blocks = max(0, self.reserved_blocks - num_blocks)
        self.version += 1

    # ------------------------------------------------------------------------------------------ stepping
    def plan(self, now: float, max_steps: int = 1) -> float | None:
        """Schedule the next step (or a decode-only run of up to ``max_steps``); return when it ends.

        None: nothing to run. Must be followed by :meth:`finish_plan` (at the returned time) before the
        next plan.
        """
        assert self._plan is None, "finish_plan() before planning again"
        if not self.running and not self.waiting:
            return None
        budget = self.config.max_num_batched_tokens
        if self.config.adaptive_budget is not None:  # configured or SLO-sized, by recent pressure
            budget = self.config.adaptive_budget.budget_when(self.budget_pressed)
        entries: list[tuple[SimRequest, int]] = []
        preempted = False
        prefill_tokens = decode_seqs = decode_context = 0
        completes_prefill = False
        prefill_pairs = 0.0  # prefill attention's (query, key) pairs: a chunk attends to what precedes it
        # vLLM v0 without chunked prefill (``_schedule_default`` in ``vllm/core/scheduler.py``): waiting
        # prompts are scheduled first, with the whole token budget, and a step that schedules any runs no
        # decodes ("Don't schedule decodes if prefills are scheduled"); only when none fits do the running
        # requests decode (and may preempt). Decodes first would eat the budget a whole prompt needs.
        prefill_first = not self.config.chunked_prefill and bool(self.waiting)
        if prefill_first:
            budget, prefill_tokens, prefill_pairs = self._admit_waiting(now, budget, entries)
        i = len(self.running) if entries else 0  # prefills were scheduled: no decode this step
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            need = request.context_len - request.num_computed
            n = min(need, budget)
            fits, preempted_now = self._allocate_or_preempt(request, n, now)
            preempted = preempted or preempted_now
            if not fits:  # it preempted itself: it was the newest, nothing runs after it
                break
            entries.append((request, n))
            if self.prefix_cache is not None:  # prefix-cache hook: cache the blocks this chunk completes
                self.prefix_cache.schedule(request, n)
            budget -= n
            if need == 1 and request.num_computed > 0:
                decode_seqs += 1
                decode_context += request.context_len
                if request.first_token_time < 0:
                    # the prompt's last token (a chunk boundary left one): a decode-sized step, but it yields
                    # the first token at this step's end, so no multi-step run may defer that output
                    completes_prefill = True
            else:
                prefill_tokens += n
                prefill_pairs += n * (request.num_computed + (n + 1) / 2)
            i += 1
        if not preempted and not prefill_first:
            budget, tokens, pairs = self._admit_waiting(now, budget, entries)
            prefill_tokens += tokens
            prefill_pairs += pairs
        if self.prefix_cache is not None:  # prefix-cache hook: allocation may have evicted cached blocks
            self.prefix_cache.trim(self.num_free_blocks)
        if not entries:
            return None
        steps = 1
        base_computed: list[int] = []
        if max_steps > 1 and prefill_tokens == 0 and not preempted and not completes_prefill:
            steps = self._decode_run_length(entries, max_steps)
            if steps > 1:
                base_computed = [r.num_computed for r, _ in entries]
        run_base = run_growth = 0.0
        if steps > 1:
            run_base, run_growth = self.cost.run_coefficients(decode_seqs, decode_context)
            duration_ms = self.cost.run_ms(run_base, run_growth, steps)
        else:
            duration_ms = self.cost.step_ms(prefill_tokens, decode_seqs, decode_context, prefill_pairs)
        end = now + duration_ms / 1000.0
        self._plan = _Plan(
            now,
            end,
            steps,
            0,
            entries,
            decode_seqs,
            prefill_tokens,
            decode_context,
            base_computed,
            run_base,
            run_growth,
        )
        if steps > 1:
            self._set_bump(self._plan)
        return end

    @property
    def plan_end(self) -> float | None:
        return self._plan.end if self._plan is not None else None

    def finish_plan(self) -> list[SimOutput]:
        """Commit the planned step(s); return the requests that produced tokens."""
        plan = self._plan
        assert plan is not None, "no plan to finish"
        rule = self.config.adaptive_budget
        if rule is not None:  # a truncated run keeps decode_seqs per step; steps is what actually ran
            self.budget_share, self.budget_second, self.budget_seen, self.budget_pressed = rule.update(
                self.budget_share,
                self.budget_second,
                self.budget_seen,
                self.budget_pressed,
                plan.decode_seqs * plan.steps,
                plan.prefill_tokens,
            )
        outputs = self._commit_single(plan) if plan.steps == 1 else self._commit_run(plan, plan.steps)
        self.num_steps += plan.steps
        self.busy_time += plan.end - plan.start
        self._plan = None
        if self._pending_removal:
            for request_id, keep in list(self._pending_removal.items()):
                request = self.requests.get(request_id)
                if request is not None and request.state == RUNNING:
                    self._detach(request, keep_blocks=keep)
            self._pending_removal.clear()
        return outputs

    def advance_to(self, t: float) -> None:
        """Materialise the whole steps of a multi-step run that have ended by ``t`` (loads stay exact)."""
        plan = self._plan
        if plan is None or plan.steps == 1 or t <= plan.start:
            return
        elapsed_ms = (t - plan.start) * 1000.0
        done = self.cost.steps_within(plan.run_base, plan.run_growth, elapsed_ms, plan.steps)
        done = min(done, plan.steps - 1)  # the last step's outputs are committed by finish_plan
        if done > plan.done:
            self._materialise(plan, done)

    def advance_blocks_to(self, t: float) -> bool:
        """:meth:`advance_to` when a step that adds a KV block has ended by ``t``; otherwise nothing.

        Block-level state (free blocks, :attr:`version`) is then exactly what :meth:`advance_to` would leave;
        only the requests' token counts may lag, until the next :meth:`advance_to`, :meth:`truncate` or
        :meth:`finish_plan` catches them up (each applies the steps not yet applied). For a caller that
        reads only block-level state, e.g. to decide whether a heartbeat changed, at a fraction of the cost.
        Returns True when it did :meth:`advance_to` (the token counts are exact too).
        """
        plan = self._plan
        if plan is not None and (t - plan.start) * 1000.0 >= plan.bump_ms:
            self.advance_to(t)
            return True
        return False

    def next_block_time(self) -> float | None:
        """About when (virtual seconds) :meth:`advance_blocks_to` will next change block-level state; None:
        not during this plan. Rounded like any float sum: callers poll a little early and let
        :meth:`advance_blocks_to` decide exactly."""
        plan = self._plan
        if plan is None or plan.bump_ms == math.inf:
            return None
        return plan.start + plan.bump_ms / 1000.0

    def truncate(self, t: float) -> float | None:
        """End a multi-step run at the first step boundary at or after ``t``; return the (new) end time."""
        plan = self._plan
        if plan is None:
            return None
        if plan.steps == 1:
            return plan.end
        self.advance_to(t)
        elapsed_ms = (t - plan.start) * 1000.0
        done_by_t = self.cost.steps_within(plan.run_base, plan.run_growth, elapsed_ms, plan.steps)
        new_steps = min(plan.steps, done_by_t + 1)
        if new_steps < plan.steps:
            plan.steps = new_steps
            plan.end = plan.start + self.cost.run_ms(plan.run_base, plan.run_growth, new_steps) / 1000
        return plan.end

    # ------------------------------------------------------------------------------------------ reporting
    @property
    def budget_state(self) -> BudgetState:
        """The adaptive step budget's state (``control/adaptive_budget.py``)."""
        return BudgetState(self.budget_share, self.budget_pressed, self.budget_seen, self.budget_second)

    def head_waiting_blocks(self) -> int:
        return self.waiting[0]._waiting_need if self.waiting else 0

    def running_requests(self) -> Iterable[SimRequest]:
        return self.running

    # ------------------------------------------------------------------------------------------ internals
    def _in_plan(self, request: SimRequest) -> bool:
        plan = self._plan
        return plan is not None and any(r is request for r, _ in plan.entries)

    def _push_waiting(self, request: SimRequest, *, front: bool) -> None:
        request.state = WAITING
        request._waiting_need = self.blocks_for(request.context_len)
        self.waiting_blocks += request._waiting_need
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)
        self.version += 1

    def _pop_waiting(self) -> SimRequest:
        request = self.waiting.popleft()
        self.waiting_blocks -= request._waiting_need
        return request

    def _detach(self, request: SimRequest, *, keep_blocks: bool) -> None:
        if request.state == RUNNING:
            self.running.remove(request)
            self.allocated_blocks -= request.num_blocks
            if keep_blocks and request.num_blocks:
                self.outgoing_blocks += request.num_blocks
                self._outgoing[request.request_id] = request.num_blocks
            elif self.prefix_cache is not None:  # prefix-cache hook: its blocks are free (still cached)
                self.prefix_cache.release(request.request_id)
        elif request.state == WAITING:
            self.waiting.remove(request)
            self.waiting_blocks -= request._waiting_need
        request.state = REMOVED
        request.num_blocks = 0
        self.requests.pop(request.request_id, None)
        self.version += 1

    def _admit_waiting(self, now: float, budget: int, entries: list[tuple[SimRequest, int]]) -> tuple[int, int, float]:
        """Admit waiting requests in order while seats, budget and blocks allow (appends to ``entries``).

        Returns the budget left and the prefill tokens and attention pairs added.
        """
        prefill_tokens = 0
        prefill_pairs = 0.0
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            if self.prefix_cache is not None:  # prefix-cache hook: a hit starts the prefill past it
                request.num_computed = self.prefix_cache.lookup(request, self.num_free_blocks)
            need = request.context_len - request.num_computed
            if not self.config.chunked_prefill and need > budget and entries:
                break
            n = need if not self.config.chunked_prefill else min(need, budget)
            new_blocks = self.blocks_for(request.num_computed + n) - request.num_blocks
            free = self.num_free_blocks - self.config.watermark_blocks
            if new_blocks > free:
                break
            if self.config.reserve_full_prompt and request._waiting_need - request.num_blocks > free:
                break
            self._pop_waiting()
            request.state = RUNNING
            if request.admitted_time < 0:
                request.admitted_time = now
            request.num_blocks += new_blocks
            self.allocated_blocks += new_blocks
            self.running.append(request)
            entries.append((request, n))
            if self.prefix_cache is not None:  # prefix-cache hook: hold the hit, cache the new blocks
                self.prefix_cache.schedule(request, n)
            budget -= n
            prefill_tokens += n
            prefill_pairs += n * (request.num_computed + (n + 1) / 2)
            self.version += 1
        return budget, prefill_tokens, prefill_pairs

    def _allocate_or_preempt(self, request: SimRequest, n: int, now: float) -> tuple[bool, bool]:
        """Give ``request`` the blocks for ``n`` more tokens, preempting the newest running requests.

        Returns (it got them, something was preempted).
        """
        needed = self.blocks_for(request.num_computed + n) - request.num_blocks
        preempted_any = False
        while needed > self.num_free_blocks:
            victim = self.running[-1]
            self._preempt(victim, now)
            preempted_any = True
            if victim is request:
                return False, True
        if needed > 0:
            request.num_blocks += needed
            self.allocated_blocks += needed
            self.version += 1
        return True, preempted_any

    def _preempt(self, request: SimRequest, now: float) -> None:
        self.running.pop()
        self.allocated_blocks -= request.num_blocks
        if self.prefix_cache is not None:  # prefix-cache hook: its blocks are free (still cached)
            self.prefix_cache.release(request.request_id)
        request.recomputed_tokens += request.num_computed
        request.num_blocks = 0
        request.num_computed = 0
        request.num_preemptions += 1
        if request.preempted_at < 0:
            request.preempted_at = now
        self.num_preemptions += 1
        self._push_waiting(request, front=True)

    def _decode_run_length(self, entries: list[tuple[SimRequest, int]], max_steps: int) -> int:
        """Longest run of identical decode steps that changes nothing but token counts and blocks."""
        # A waiting head was tried this step and did not fit (seats, budget or blocks); in a decode run the
        # seats and budget stay the same and free blocks only shrink, so it stays blocked until the run ends.
        k = max_steps
        for request, _ in entries:
            k = min(k, request.target_output - request.num_output)
        k = max(1, k)
        if k == 1:
            return 1
        free = self.num_free_blocks
        bs = self.config.block_size

        def extra_blocks(steps: int) -> int:
            # blocks beyond the first step's allocation needed to run ``steps`` steps
            return sum(-(-(r.num_computed + steps) // bs) - r.num_blocks for r, _ in entries)

        if extra_blocks(k) <= free:
            return k
        lo, hi = 1, k  # extra_blocks(lo) == 0 <= free; extra_blocks(hi) > free
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if extra_blocks(mid) <= free:
                lo = mid
            else:
                hi = mid
        return lo

    def _commit_single(self, plan: _Plan) -> list[SimOutput]:
        outputs: list[SimOutput] = []
        end = plan.end
        for request, n in plan.entries:
            if request.state != RUNNING:
                continue
            request.num_computed += n
            if request.num_computed >= request.context_len:
                outputs.append(self._emit(request, 1, end))
        return outputs

    def _materialise(self, plan: _Plan, done: int) -> None:
        """Apply steps [plan.done, done) of a multi-step run without emitting outputs."""
        delta = done - plan.done
        bs = self.config.block_size
        added = 0
        bump = plan.steps  # see _set_bump (computed in this same pass)
        for (request, _), base in zip(plan.entries, plan.base_computed, strict=True):
            request.num_computed += delta
            request.num_output += delta
            blocks = -(-(base + done + 1) // bs)
            added += blocks - request.num_blocks
            request.num_blocks = blocks
            if blocks * bs - base < bump:
                bump = blocks * bs - base
        if added:
            self.allocated_blocks += added
            self.version += 1
        plan.done = done
        plan.bump_ms = self.cost.run_ms(plan.run_base, plan.run_growth, bump) if bump < plan.steps else math.inf

    def _set_bump(self, plan: _Plan) -> None:
        """When the run's next block is added: the first step (counted from the run's start) after which
        some request's context passes the end of its last block (see :meth:`advance_blocks_to`)."""
        bs = self.config.block_size
        # a request holding nb blocks after step d (context base + d + 1) needs one more after step
        # nb * bs - base; materialise stops one step short of the end, so later bumps never happen here
        bump = min((r.num_blocks * bs - base for (r, _), base in zip(plan.entries, plan.base_computed, strict=True)))
        plan.bump_ms = self.cost.run_ms(plan.run_base, plan.run_growth, bump) if bump < plan.steps else math.inf

    def _commit_run(self, plan: _Plan, steps: int) -> list[SimOutput]:
        delta = steps - plan.done
        outputs: list[SimOutput] = []
        bs = self.config.block_size
        added = 0
        for (request, _), base in zip(plan.entries, plan.base_computed, strict=True):
            request.num_computed += delta
            blocks = -(-(base + steps) // bs)
            added += blocks - request.num_blocks
            request.num_blocks = blocks
            outputs.append(self._emit(request, delta, plan.end))
        self.allocated_blocks += added
        if added:
            self.version += 1
        return outputs

    def _emit(self, request: SimRequest, new_tokens: int, now: float) -> SimOutput:
        """Count the tokens sampled since the last output; finish the request at its target."""
        request.num_output += new_tokens
        first = request.first_token_time < 0
        if first:
            request.first_token_time = now
        if request.preempted_at >= 0:
            request.preemption_loss += now - request.preempted_at
            request.preempted_at = -1.0
        finished = request.num_output >= request.target_output
        if finished:
            request.finish_time = now
            self.running.remove(request)
            self.allocated_blocks -= request.num_blocks
            if self.prefix_cache is not None:  # prefix-cache hook: its blocks are free (still cached)
                self.prefix_cache.release(request.request_id)
            request.num_blocks = 0
            request.state = FINISHED
            self.requests.pop(request.request_id, None)
            self.version += 1
        return SimOutput(request, new_tokens, finished, first)
