"""The scheduler hands the migrator each request's largest possible size (actors/scheduler_migration.py), which
caps the destination's reservation (control/core/migration.py): the heartbeat's size may lag the engine's."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from actors.migrator import StartMigration
from actors.scheduler_migration import SchedulerMigrations
from control.core.requests import InstanceRecord, RequestRecord
from control.policy.params import PolicyParams
from transport.messages import EngineInfo, InstanceLoad, RunningRequest, SamplingParams, SubmitRequest


class _Migrator:
    def __init__(self) -> None:
        self.told: list[Any] = []

    def tell(self, message: Any) -> None:
        self.told.append(message)


def _instance(name: str, running: list[RunningRequest]) -> InstanceRecord:
    info = EngineInfo(
        instance_id=name, engine_kind="vllm", model="m", dtype="f32", block_size=32, num_blocks=1023, max_model_len=2048
    )
    load = InstanceLoad(
        num_total_blocks=1023, num_free_blocks=900, num_running=len(running), num_waiting=0, running=running
    )
    return InstanceRecord(info=info, load=load, last_seen=0.0, can_migrate=True)


def test_a_migration_carries_the_requests_maximum_blocks() -> None:
    """272 prompt tokens and 1,500 to generate, blocks of 32 within 2,048 tokens: at most 56 blocks, whatever
    the source's heartbeat said the request holds now (9 blocks here)."""
    migrator = _Migrator()
    submit = SubmitRequest(reply_to="_INBOX.c", sampling=SamplingParams(max_tokens=1500))
    record = RequestRecord(
        submit=submit, request_id="r1", cancel_token="t", prompt_token_ids=[5] * 272, arrival=0.0, instance_id="a"
    )
    records = {
        "a": _instance("a", [RunningRequest(request_id="r1", num_tokens=281, num_blocks=9)]),
        "b": _instance("b", []),
    }
    moves = SchedulerMigrations(
        bus=None,  # type: ignore[arg-type]  # no error reply is sent on this path
        peers={"migrator": migrator},
        registry=SimpleNamespace(records=records),  # type: ignore[arg-type]
        requests={"r1": record},
        dispatch=None,  # type: ignore[arg-type]
        pd=None,  # type: ignore[arg-type]
        state=None,  # type: ignore[arg-type]
        params=PolicyParams,
    )
    assert moves.start("r1", "a", "b", 9, "operator")
    (start,) = migrator.told
    assert isinstance(start, StartMigration)
    assert (start.num_blocks, start.max_blocks) == (9, 56)
