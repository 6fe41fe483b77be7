"""The control core's admission (control/core/admission.py): the stateless checks the live scheduler and the
simulator both apply, and the load limits over the scheduler's table and the dispatcher's queues."""

from __future__ import annotations

from control.core.admission import decide, max_prompt_tokens, validate
from control.core.dispatch import Dispatcher, Waiting
from control.core.requests import RequestRecord, RequestTable
from control.policy.admission import Decision, Verdict
from control.policy.autoscaling import FleetInstance, RunningBatch
from control.policy.dispatch import make_dispatch_policy
from control.policy.snapshots import InstanceSnapshot, RequestDemand
from control.settings import load_settings
from control.simulator import ClusterConfig, ClusterSimulator
from control.simulator.workload import RequestSpec
from transport.messages import SamplingParams, SubmitRequest

INBOX = "drover.v1.inbox.a.r"


def test_malformed_submissions_get_a_reason() -> None:
    assert validate(SubmitRequest(reply_to=INBOX, prompt="hi")) is None
    assert validate(SubmitRequest(reply_to=INBOX)) == "give exactly one of prompt or prompt_token_ids"
    assert validate(SubmitRequest(reply_to=INBOX, prompt="")) == "prompt is empty"
    assert validate(SubmitRequest(reply_to=INBOX, prompt_token_ids=[1, -1])) == "prompt_token_ids must be non-negative"
    hot = SubmitRequest(reply_to=INBOX, prompt="x", sampling=SamplingParams(temperature=float("nan")))
    assert validate(hot) == "temperature must be >= 0"
    assert validate(SubmitRequest(reply_to=INBOX, prompt="x", request_id="a.b")) is not None


def test_the_longest_prompt_leaves_one_token_of_the_shortest_context() -> None:
    assert max_prompt_tokens(0, [4096, 2048], 8192) == 2047
    assert max_prompt_tokens(0, [], 8192) == 8191
    assert max_prompt_tokens(100, [4096], 8192) == 100


def test_the_simulator_refuses_what_the_live_scheduler_refuses() -> None:
    config = ClusterConfig(num_instances=1)
    limit = max_prompt_tokens(0, [config.engine.max_model_len], config.engine.max_model_len)
    requests = [RequestSpec("fits", 0.0, limit, 1), RequestSpec("too-long", 0.0, limit + 1, 1)]
    result = ClusterSimulator(config, requests).run()
    assert result.rejected == 1 and result.completed == 1


def test_a_full_queue_refuses_only_what_could_not_start_now() -> None:
    settings = load_settings(overrides={"limits": {"max_queued_interactive": 2, "max_queued_batch": 2}})
    table: RequestTable[RequestRecord] = RequestTable(settings.lifecycle, clock=lambda: 0.0)
    for rid in ("q1", "q2"):
        table[rid] = RequestRecord(
            submit=SubmitRequest(reply_to=INBOX, prompt="x"),
            request_id=rid,
            cancel_token="t",
            prompt_token_ids=[1],
            arrival=0.0,
            headers={},
        )
    asked: list[str] = []

    def no_room() -> bool:
        asked.append("asked")
        return True

    submit = SubmitRequest(reply_to=INBOX, prompt="x")
    kwargs = {"max_prompt_tokens": 100, "no_room": no_room}
    assert decide(settings, table, ["q1"], submit, INBOX, 1, **kwargs).admitted  # type: ignore[arg-type]
    assert asked == []  # the dispatch index is asked only when a queue could be at its limit
    full = decide(settings, table, ["q1", "q2"], submit, INBOX, 1, **kwargs)  # type: ignore[arg-type]
    assert full.verdict is Verdict.OVERLOADED and "2 interactive requests queued" in full.reason and asked
    room = decide(settings, table, ["q1", "q2"], submit, INBOX, 1, max_prompt_tokens=100, no_room=lambda: False)
    assert room.admitted  # it would start at once: the queue's limit does not apply


class _Fleet:
    """The FleetView of a fleet whose engines' queues are full: the fair queue keeps every request."""

    def __init__(self, table: RequestTable[RequestRecord]) -> None:
        self.table = table

    def waiting(self, request_id: str) -> Waiting | None:
        record = self.table.get(request_id)
        if record is None:
            return None
        demand = RequestDemand(request_id, len(record.prompt_token_ids), 1)
        return Waiting(demand, client=record.submit.client_id, cost=1 + record.submit.sampling.max_tokens)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.table

    def class_loads(self) -> list[FleetInstance]:
        return []

    def evictable(self, instance_id: str) -> list[RunningBatch]:
        return []

    def serving_waiting(self) -> list[tuple[str, int]]:
        return [("a", 1)]  # at fairness_max_waiting: no room


def test_the_fair_queue_counts_towards_the_queue_limits_and_each_client_has_a_share() -> None:
    """Before: the queue limits counted only the waiting queue, so with fairness on (where the backlog waits)
    they bounded nothing, and one client could fill the queue. Now the fair queue counts, and a client's
    queued requests stop at limits.max_queued_per_client while another client's are still admitted."""
    settings = load_settings(
        overrides={
            "scheduler": {"fairness": True, "max_queued_requests": 5},
            "limits": {"max_queued_per_client": 3},
        }
    )
    table: RequestTable[RequestRecord] = RequestTable(settings.lifecycle, clock=lambda: 0.0)
    index = make_dispatch_policy("least_loaded")
    index.upsert(InstanceSnapshot("a", num_total_blocks=100, num_free_blocks=100, num_running=0, num_waiting=1))
    core = Dispatcher(index, fair_quantum_tokens=16, fair_max_waiting=1)
    fleet = _Fleet(table)

    def submit(client: str, n: int) -> Decision:
        request_id = f"{client}-{n}"
        sub = SubmitRequest(reply_to=f"drover.v1.inbox.{client}.{n}", prompt="x", client_id=client)
        demand = RequestDemand(request_id, 1, 1)
        decision = decide(
            settings,
            table,
            core.queued,
            sub,
            sub.reply_to,
            1,
            max_prompt_tokens=100,
            no_room=lambda: not core.fits_now(demand),
        )
        if decision.admitted:
            table[request_id] = RequestRecord(
                submit=sub, request_id=request_id, cancel_token="t", prompt_token_ids=[1], arrival=0.0, headers={}
            )
            assert list(core.submit(request_id, fleet, 0.0)) == []  # no room: it waits in the fair queue
        return decision

    assert all(submit("flood", n).admitted for n in range(3))
    assert not core.pending and core.num_queued == 3 and set(core.queued) == {"flood-0", "flood-1", "flood-2"}
    assert not core.fits_now(RequestDemand("probe", 1, 1))  # the index has room, but the fair queue waits first
    refused = submit("flood", 3)
    assert refused.verdict is Verdict.OVERLOADED and "this client has 3 requests queued" in refused.reason
    assert submit("polite", 0).admitted and submit("polite", 1).admitted  # another client's share is its own
    full = submit("third", 0)
    assert full.verdict is Verdict.OVERLOADED and "request queue is full (5)" in full.reason
