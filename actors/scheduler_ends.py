"""The ends of requests in the scheduler: one place drops a request that is over.

A request is over when it finishes or fails at its engine, is cancelled while it waits, or its failover finds
it finished or failed it; each of those paths forgets it here, in the request table, the state store and the
migration planner, so none of them can leave one of the three behind.
"""

from __future__ import annotations

from actors.control_state import ControlState
from actors.scheduler_migration import SchedulerMigrations
from control.core.requests import RequestRecord, RequestTable


class RequestEnds:
    """Requests that are over (see the module docstring).

    Collaborators: the request table (``requests``), the state store (``state``) and the ``migrations`` (the
    planner's move record of a request)."""

    def __init__(
        self, requests: RequestTable[RequestRecord], state: ControlState, migrations: SchedulerMigrations
    ) -> None:
        """Thread: the one that builds the scheduler (before its thread starts)."""
        self.requests = requests
        self.state = state
        self.migrations = migrations

    def forget(self, request_id: str) -> None:
        """Drop a request that is over from the request table, the state store and the planner's moves.

        Thread: the scheduler actor's thread."""
        self.requests.pop(request_id, None)
        self.state.drop_request(request_id)
        self.migrations.forget(request_id)  # the planner's move record of it is moot now
