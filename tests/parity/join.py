"""Parity (b) for a KunServe join: the memory simulator's shell run through the command sequence that
``tests/integration/test_kunserve_live.py`` gives the live engines: one request decoding on each of two
instances, then "form a group, instance 0 leads". :func:`simulated_join` says what became of each request,
in the terms the live test reads off its engines, so the two shells' outcomes compare as equal values.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.simulator.memory import MemorySimulator, MemSimConfig, Unit
from control.simulator.workload import RequestSpec

JoinOutcome = dict[str, tuple[str, bool]]
"""By role ("leader": the request of the instance that leads, "member": the joining instance's): (where it
runs after the join: "group" or "elsewhere", whether it kept its KV: nothing recomputed)."""


@dataclass(slots=True)
class _Seen:
    request_id: str
    recomputed_before: int


class _ForcedJoin(MemorySimulator):
    """Forms the group (0 leads, 1 joins) once both requests decode, as the live test's operator command does;
    the memory policy itself decides nothing (it would drop only under memory pressure)."""

    def __init__(self, config: MemSimConfig, workload: list[RequestSpec], after_tokens: int) -> None:
        super().__init__(config, workload)
        self.after_tokens = after_tokens
        self.ordered = False
        self.roles: dict[str, _Seen] = {}
        self.outcome: JoinOutcome = {}

    def _memory_poll(self, now: float) -> None:
        if self.ordered:
            return
        units = sorted(self.units.values(), key=lambda u: u.members)
        decoding = [u.core.running[0] for u in units if u.core.running]
        if len(decoding) < 2 or any(r.num_output < self.after_tokens for r in decoding):
            return
        self.ordered = True
        self.roles = {
            "leader": _Seen(decoding[0].request_id, decoding[0].recomputed_tokens),
            "member": _Seen(decoding[1].request_id, decoding[1].recomputed_tokens),
        }
        self._pending_forms.append(([u.unit_id for u in units], (0, 1)))
        for unit in units:
            unit.hold = True
            self._interrupt(unit, now)
        self._try_forms(now)

    def _form(self, unit_ids: list[int], members: tuple[int, ...], now: float) -> None:
        super()._form(unit_ids, members, now)
        group = next(u for u in self.units.values() if u.members == members)
        for role, seen in self.roles.items():
            request = self.requests[seen.request_id]
            self.outcome[role] = (
                "group" if _holds(group, seen.request_id) else "elsewhere",
                request.recomputed_tokens == seen.recomputed_before,
            )


def _holds(unit: Unit, request_id: str) -> bool:
    return any(r.request_id == request_id for r in (*unit.core.running, *unit.core.waiting))


def simulated_join(prompt_len: int = 88, output_len: int = 200, after_tokens: int = 10) -> JoinOutcome:
    """What the memory simulator does with each instance's decoding request when they form a group."""
    workload = [RequestSpec(f"join-{i}", 0.001 * i, prompt_len, output_len) for i in range(2)]
    sim = _ForcedJoin(MemSimConfig(mode="kunserve", num_instances=2), workload, after_tokens)
    result = sim.run()
    assert sim.ordered and set(sim.outcome) == {"leader", "member"}, "the join was never ordered"
    assert result.completed == 2, "a request did not finish after the join"
    return sim.outcome
