"""The scheduler's tables as the control core's dispatch loop reads them.

``control/core/dispatch.py`` decides which waiting request goes where; it reads the shell's state through a
:class:`control.core.dispatch.FleetView`. :class:`SchedulerView` is the live shell's: the SchedulerActor's
instance registry and request table, and its request-class bookkeeping (``actors/request_classes.py``). It is
built for one event (with that event's ``now``) on the scheduler's thread and only reads: the scheduler carries
out each placement before the core reads again, so every decision sees the tables as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from actors.request_classes import RequestClasses
from control.core.dispatch import Waiting
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.autoscaling import FleetInstance, RunningBatch
from control.policy.snapshots import RequestDemand
from transport import subjects
from transport.messages import RequestClass


class SchedulerView:
    """A read-only :class:`control.core.dispatch.FleetView` over the scheduler's state."""

    def __init__(
        self,
        instances: Mapping[str, InstanceRecord],
        requests: Mapping[str, RequestRecord],
        classes: RequestClasses,
        demand: Callable[[RequestRecord], RequestDemand],
        now: float,
    ) -> None:
        """Thread: the scheduler actor's thread."""
        self.instances = instances
        self.requests = requests
        self.classes = classes
        self.demand = demand
        self.now = now

    def waiting(self, request_id: str) -> Waiting | None:
        """Thread: the scheduler actor's thread."""
        record = self.requests.get(request_id)
        if record is None:
            return None
        submit = record.submit
        cost = len(record.prompt_token_ids) + submit.sampling.max_tokens
        deadline = 0.0
        if submit.request_class == RequestClass.BATCH:
            deadline, cost = self.classes.deadline_of(request_id, self.now, cost)
        return Waiting(
            demand=self.demand(record),
            request_class=str(submit.request_class),
            client=submit.client_id or subjects.ANONYMOUS,
            cost=cost,
            deadline=deadline,
            queued=record.state == "queued" and record.instance_id is None,
        )

    def __contains__(self, request_id: object) -> bool:
        """Thread: the scheduler actor's thread."""
        return request_id in self.requests

    def class_loads(self) -> Sequence[FleetInstance]:
        """Thread: the scheduler actor's thread."""
        return self.classes.loads(self.instances, self.requests)

    def evictable(self, instance_id: str) -> Sequence[RunningBatch]:
        """Thread: the scheduler actor's thread."""
        return self.classes.evictable(instance_id, self.instances, self.requests)

    def serving_waiting(self) -> Iterable[tuple[str, int]]:
        """Thread: the scheduler actor's thread."""
        return [(i, r.load.num_waiting) for i, r in self.instances.items() if r.state == "serving"]
