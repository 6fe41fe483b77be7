"""The control core's admission (control/core/admission.py): the stateless checks the live scheduler and the
simulator both apply, and the load limits over the scheduler's table and waiting queue."""

from __future__ import annotations

from control.core.admission import decide, max_prompt_tokens, validate
from control.core.requests import RequestRecord, RequestTable
from control.policy.admission import Verdict
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
