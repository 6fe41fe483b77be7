"""The control core's stateless admission checks (control/core/admission.py), which the live scheduler and
the simulator both apply."""

from __future__ import annotations

from control.core.admission import max_prompt_tokens, validate
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
