"""The local autoscaler of one instance (Chiron's lower level), enforced in the EngineActor's admission.

vLLM cannot change ``max_num_seqs`` at run time, so the batch size is enforced one level up: the EngineActor
admits at most ``batch_limit`` requests into the engine and holds the rest here (interactive ones first, then
by arrival). Every ``[autoscaling.local] period_s`` the heartbeat thread feeds a window of observations (ITL
from the token stream, output tokens per second, KV use) to the same pure :func:`local_batch_limit` the
simulator runs, and the heartbeat carries the decision upward (:class:`LocalReport`: limit, SLO-safe capacity,
backpressure). Held requests count as waiting in the reported load, so dispatch sees them.

Thread-safe: the actor thread admits, the bus loop observes tokens, the heartbeat thread ticks and reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import msgspec

from control.core.record import DecisionLog
from control.core.scaling import LocalSizer, engine_local_params
from control.policy.autoscaling import ROLES, AutoscaleParams, InstanceRole, LocalDecision, LocalObservation
from transport.messages import EngineAdd, InstanceLoad, LocalReport, RequestClass

Held = tuple[EngineAdd, dict[str, str]]


class LocalAutoscaler:
    def __init__(
        self,
        role: InstanceRole,
        params: AutoscaleParams,
        engine_max_seqs: int,
        *,
        log: DecisionLog | None = None,
        key: str = "",
    ) -> None:
        """``log``: each decision with its observation, under ``key`` (the instance id), for replay parity."""
        self.role = role
        # the limit and the rule's memory: the control core's (the elastic simulator holds the same per instance)
        self.sizer = LocalSizer(params, engine_max_seqs, log=log, key=key)
        self.params = self.sizer.params
        self.wake: Callable[[], None] = lambda: None
        """Called (from the heartbeat thread) when the limit grew: the actor admits held requests."""
        self._lock = threading.Lock()
        self._admitted: dict[str, RequestClass] = {}
        self._held: list[Held] = []
        self._window_start = time.monotonic()
        self._tokens = 0
        self._gap_sum = 0.0
        self._gaps = 0
        self._report = LocalReport(batch_limit=self.limit, capacity=self.limit, backpressure=0.0, reason="initial")

    @property
    def limit(self) -> int:
        """Requests the engine may run at once now (the sizer's limit)."""
        return self.sizer.limit

    def set_role(self, role: str) -> bool:
        """A relabel by the global autoscaler; False (and no change) for an unknown role."""
        if role not in ROLES:
            return False
        self.role = role
        return True

    # ------------------------------------------------------------------------------------------- admission
    def offer(self, add: EngineAdd, headers: dict[str, str]) -> bool:
        """True: run it now. False: held until a slot frees. Migrated-in requests (KV already reserved here)
        and failover resumes are never held."""
        with self._lock:
            if add.kv_transfer is not None or add.output_token_ids or len(self._admitted) < self.limit:
                self._admitted[add.request_id] = add.request_class
                return True
            self._held.append((add, headers))
            return False

    def is_held(self, request_id: str) -> bool:
        with self._lock:
            return any(add.request_id == request_id for add, _ in self._held)

    def remove_held(self, request_id: str) -> EngineAdd | None:
        with self._lock:
            for index, (add, _) in enumerate(self._held):
                if add.request_id == request_id:
                    del self._held[index]
                    return add
        return None

    def ended(self, request_id: str) -> None:
        with self._lock:
            self._admitted.pop(request_id, None)

    def take_admittable(self) -> list[Held]:
        """Held requests that fit under the limit now: interactive first, then in arrival order."""
        with self._lock:
            room = self.limit - len(self._admitted)
            if room <= 0 or not self._held:
                return []
            order = sorted(
                range(len(self._held)),
                key=lambda i: (self._held[i][0].request_class != RequestClass.INTERACTIVE, i),
            )
            chosen = set(order[:room])
            taken = [self._held[i] for i in sorted(chosen, key=order.index)]
            self._held = [h for i, h in enumerate(self._held) if i not in chosen]
            for add, _ in taken:
                self._admitted[add.request_id] = add.request_class
            return taken

    # ------------------------------------------------------------------------------------------- observation
    def observe_tokens(self, count: int, gap_s: float | None) -> None:
        """``count`` tokens left for a client; ``gap_s`` the per-token gap since that request's last chunk."""
        with self._lock:
            self._tokens += count
            if gap_s is not None:
                self._gap_sum += gap_s * count
                self._gaps += count

    def tick(self, load: InstanceLoad) -> LocalDecision | None:
        """Run one local decision when a window has passed (call often; the heartbeat thread does)."""
        now = time.monotonic()
        with self._lock:
            window = now - self._window_start
            if window < self.params.local.period_s:
                return None
            held = len(self._held)
            obs = LocalObservation(
                role=self.role,
                batch_limit=self.limit,
                num_running=len(self._admitted),
                num_waiting=held + load.num_waiting,
                itl_s=self._gap_sum / self._gaps if self._gaps else 0.0,
                tokens_per_s=self._tokens / window,
                num_total_blocks=load.num_total_blocks,
                num_used_blocks=load.num_total_blocks - load.num_free_blocks,
                num_preempted=load.num_preempted,
            )
            before = self.limit
            decision = self.sizer.decide(obs)
            grew = decision.batch_limit > before
            self._window_start, self._tokens, self._gap_sum, self._gaps = now, 0, 0.0, 0
            self._report = self._make_report(decision.capacity, decision.backpressure, obs, decision.reason)
        if grew:
            self.wake()
        return decision

    def _make_report(self, capacity: int, backpressure: float, obs: LocalObservation, reason: str) -> LocalReport:
        interactive = sum(1 for c in self._admitted.values() if c == RequestClass.INTERACTIVE)
        interactive += sum(1 for add, _ in self._held if add.request_class == RequestClass.INTERACTIVE)
        everything = len(self._admitted) + len(self._held)
        return LocalReport(
            batch_limit=self.limit,
            capacity=capacity,
            backpressure=backpressure,
            held=len(self._held),
            num_interactive=interactive,
            num_batch=everything - interactive,
            itl_s=obs.itl_s,
            tokens_per_s=obs.tokens_per_s,
            reason=reason,
        )

    def report(self) -> LocalReport:
        """The last decision with the current request counts."""
        with self._lock:
            last = self._report
            interactive = sum(1 for c in self._admitted.values() if c == RequestClass.INTERACTIVE)
            interactive += sum(1 for add, _ in self._held if add.request_class == RequestClass.INTERACTIVE)
            everything = len(self._admitted) + len(self._held)
            return msgspec.structs.replace(
                last,
                batch_limit=self.limit,
                held=len(self._held),
                num_interactive=interactive,
                num_batch=everything - interactive,
            )

    def adjust_load(self, load: InstanceLoad, block_size: int) -> InstanceLoad:
        """The engine's load with held requests counted as waiting (dispatch and migration see them)."""
        with self._lock:
            held = len(self._held)
            held_blocks = sum(-(-len(add.prompt_token_ids) // max(1, block_size)) for add, _ in self._held)
            limit = self.limit
        return msgspec.structs.replace(
            load,
            num_waiting=load.num_waiting + held,
            waiting_blocks=load.waiting_blocks + held_blocks,
            batch_limit=limit,
        )


__all__ = ["LocalAutoscaler", "engine_local_params"]
