"""Drover's vLLM KV connector: live migration of running requests through vLLM's public KV-connector API.

vLLM instantiates this class twice, in two processes: the *scheduler side* in the EngineCore process (it
sees requests, their blocks and their exact token state) and the *worker side* in the worker process (it
holds the KV tensors). :mod:`engines.vllm.scheduler_side` and :mod:`engines.vllm.worker_side` implement
the halves; they talk to each other only through the per-step metadata below (scheduler -> worker) and
``get_finished`` (worker -> scheduler), and each talks to the owning :class:`~engines.vllm.engine.VllmEngine`
over the control channel (:mod:`engines.vllm.side_channel`).

No vLLM patch: stopping a request is an abort whose block free the connector delays (``request_finished``
returns True) until the last blocks are sent; resuming is a new request whose prefix the connector reports
as externally cached (``get_num_new_matched_tokens``) and loads in ``start_load_kv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks, KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from engines.vllm.scheduler_side import SchedulerSide
    from engines.vllm.worker_side import WorkerSide

PARAMS_KEY = "drover"
"""Key of Drover's entry in a request's ``kv_transfer_params``: ``rid`` (Drover's request id); for a request
that loads migrated KV also ``load`` (migration id), ``kv_tokens`` (tokens whose KV is staged) and
``preload`` (True for a destination-side warm-up that leaves staging in place)."""


@dataclass
class SendJob:
    """Send ``blocks`` ((logical index, block id) pairs) of a migrating request as one stage."""

    migration_id: str
    request_id: str  # vLLM's internal id
    stage: int
    destination: str
    blocks: list[tuple[int, int]]
    final: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoadJob:
    """Scatter staged blocks of ``migration_id`` into a resumed request's blocks before this step's forward."""

    migration_id: str
    request_id: str
    blocks: list[tuple[int, int]]
    release: bool = True  # free the migration's staging afterwards (False for a preload)


@dataclass
class MigrationMetadata(KVConnectorMetadata):
    sends: list[SendJob] = field(default_factory=list)
    loads: list[LoadJob] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # migration ids whose streams should close
    releases: list[str] = field(default_factory=list)  # finished requests whose blocks we hold until sent


class DroverMigrationConnector(KVConnectorBase_V1):
    """Dispatches vLLM's connector calls to the half that runs in this process."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            from engines.vllm.scheduler_side import SchedulerSide

            self._scheduler = SchedulerSide(vllm_config, extra)
        else:
            from engines.vllm.worker_side import WorkerSide

            self._worker = WorkerSide(vllm_config, extra, kv_cache_config.num_blocks)

    @property
    def requires_kv_delivery(self) -> bool:
        # Our sends are of running or stopped requests whose blocks we hold ourselves; a preempted request's
        # migration is aborted, never completed from freed blocks.
        return False

    # Worker side ------------------------------------------------------------------------------------------

    @property
    def worker(self) -> WorkerSide:
        assert self._worker is not None, "worker-side call on the scheduler side"
        return self._worker

    @property
    def scheduler(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side call on the worker side"
        return self._scheduler

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, MigrationMetadata)
        # Sends start here, before this step's forward: their blocks were complete after the last step.
        self.worker.on_step_metadata(connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, MigrationMetadata)
        self.worker.load(metadata.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return

    def wait_for_save(self) -> None:
        self.worker.after_forward()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.finished_sending(finished_req_ids), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # Scheduler side ---------------------------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: KVCacheManager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.bind(kv_cache_manager)

    def on_new_request(self, request: Request) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.num_loadable_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler.after_alloc(request, blocks.get_block_ids()[0], num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_metadata(scheduler_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids), None
