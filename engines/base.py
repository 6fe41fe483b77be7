"""The ``Engine`` protocol every instance implementation fits: vLLM (CPU/GPU), the simulated engine,
and a layer-range torch engine.

An engine is asyncio-native: it lives on the process's event loop thread (the EngineActor hands work to
that loop) and streams outputs of each request through an async iterator. Engines receive token ids,
never text: the control plane tokenizes, the EngineActor detokenizes for the client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from control.errors import DroverError
from transport.messages import EngineInfo, InstanceLoad, SamplingParams


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request as an engine sees it.

    ``output_token_ids`` is non-empty when the request resumes (migration or failover): the engine treats
    ``prompt_token_ids + output_token_ids`` as context, and generates at most
    ``sampling.max_tokens - len(output_token_ids)`` further tokens. ``kv_transfer`` is an engine-specific
    handle that lets the engine load migrated KV for that context instead of recomputing it.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    priority: int = 0
    arrival_time: float = 0.0
    kv_transfer: dict[str, Any] | None = None

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.sampling.max_tokens - len(self.output_token_ids))


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """New tokens of one request since its last output. ``finish_reason`` is set on the last one."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineError(DroverError):
    """An engine refused or failed a request; the message is for the user."""

    default_code = "engine_failed"


@runtime_checkable
class Engine(Protocol):
    """What Drover needs from an inference engine."""

    @property
    def info(self) -> EngineInfo:
        """Identity and shape (model, dtype, block size, KV layout) for dispatch and migration pairing."""
        ...

    async def start(self) -> None:
        """Load the model and allocate KV memory. Called once on the event loop before any request."""
        ...

    async def shutdown(self) -> None:
        """Abort every request and release the engine's resources."""
        ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run a request; yield its outputs until one has ``finish_reason`` set.

        Raises :class:`EngineError` (before the first output) if the request cannot run here.
        Cancelling the consuming task aborts the request in the engine.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; its iterator ends with ``finish_reason="abort"``. Unknown ids are ignored.

        Once a request's iterator has ended, the same id may be generated again (a failover or a migration
        back onto this instance): an engine that lets go of an aborted request later (at the end of the step
        under way) keeps the two copies apart, so nothing of the old one reaches the new one's iterator."""
        ...

    def load(self) -> InstanceLoad:
        """Current KV usage, running and waiting requests. Cheap: called for every heartbeat."""
        ...
