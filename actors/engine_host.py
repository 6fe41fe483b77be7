"""An engine-host process: one engine instance, its EngineActor and its heartbeat, joined to the bus."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pykka

from actors.engine_actor import EngineActor, Heartbeater
from actors.local_autoscaler import LocalAutoscaler
from control.adaptive_budget import AdaptiveStepBudget
from control.core.record import DecisionLog
from control.policy.step_budget import slo_step_token_budget
from control.settings import Settings
from engines.base import Engine
from engines.sim.cost_model import DEFAULT_COST_MODEL, TINY_CPU
from engines.tokenizer import Tokenizer, load_tokenizer
from transport import subjects
from transport.bus import Bus

log = logging.getLogger(__name__)


def resolve_model_dir(settings: Settings) -> Path:
    """The configured model directory, or Drover's generated tiny model (built once, cached)."""
    if settings.model.path:
        return Path(settings.model.path)
    from engines.tiny_model import TINY, ensure_model

    return ensure_model(Path(settings.model.cache_dir), TINY)


def step_token_budget(settings: Settings) -> int:
    """The engine's token budget per step: ``[engine] max_num_batched_tokens``, or with ``step_budget_slo_share``
    set the SLO-sized budget under it (``control/policy/step_budget.py``), from the ITL SLO and the engine's step
    profile. vLLM fixes its budget when it starts (its EngineCore runs in its own process), so this is a
    start-up decision, as in the simulator."""
    eng = settings.engine
    if eng.step_budget_slo_share <= 0:
        return eng.max_num_batched_tokens
    # the sim engine steps by its cost model; vLLM-CPU and torch serve the tiny model, whose CPU fit this is
    profile = DEFAULT_COST_MODEL if eng.kind == "sim" else TINY_CPU
    return slo_step_token_budget(
        profile.prompt_step_ms,
        settings.autoscaling.slo.itl_s,
        share=eng.step_budget_slo_share,
        ceiling=eng.max_num_batched_tokens,
        quantum=eng.block_size,
    )


def adaptive_step_budget(settings: Settings) -> AdaptiveStepBudget | None:
    """With ``[engine] step_budget_adaptive`` (and a share set): the per-step rule choosing between
    ``max_num_batched_tokens`` and the SLO-sized budget (``control/adaptive_budget.py``); None otherwise."""
    eng = settings.engine
    if not eng.step_budget_adaptive or eng.step_budget_slo_share <= 0:
        return None
    return AdaptiveStepBudget(floor=step_token_budget(settings), ceiling=eng.max_num_batched_tokens)


def build_engine(settings: Settings, instance_id: str) -> tuple[Engine, Tokenizer]:
    """Construct (not start) the configured engine kind for ``instance_id``."""
    eng = settings.engine
    budget = step_token_budget(settings)
    adaptive = adaptive_step_budget(settings)
    if eng.kind == "sim":
        from engines.sim.live_migration import MigratableSimEngine

        sim = MigratableSimEngine(
            instance_id,
            model_name=settings.model.name,
            block_size=eng.block_size,
            num_blocks=eng.sim_num_blocks,
            max_num_seqs=eng.max_num_seqs,
            max_num_batched_tokens=budget if adaptive is None else adaptive.ceiling,
            max_model_len=settings.model.max_model_len,
            time_scale=eng.sim_time_scale,
            adaptive_budget=adaptive,
            seed=eng.seed,
            prefix_caching=eng.sim_prefix_caching,
        )
        return sim, load_tokenizer(None)
    model_dir = resolve_model_dir(settings)
    if eng.kind == "torch":
        from engines.torch.config import LlamaConfig
        from engines.torch.migration import MigratableTorchEngine

        config = LlamaConfig.from_model_dir(model_dir)
        dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[settings.model.dtype]
        block_bytes = config.kv_block_bytes(config.num_layers, eng.block_size, dtype_bytes)
        torch_engine = MigratableTorchEngine(
            instance_id,
            model_dir,
            model_name=settings.model.name,
            block_size=eng.block_size,
            num_blocks=max(1, int(eng.kv_cache_gib * 2**30) // block_bytes),
            max_num_seqs=eng.max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=settings.model.max_model_len,
            dtype=settings.model.dtype,
            seed=eng.seed,
            threads=eng.cpu_threads,
            device=eng.device,
        )
        return torch_engine, load_tokenizer(model_dir)
    from engines.vllm.engine import VllmEngine

    vllm_engine = VllmEngine(
        instance_id,
        model_dir,
        model_name=settings.model.name,
        block_size=eng.block_size,
        max_model_len=settings.model.max_model_len,
        max_num_seqs=eng.max_num_seqs,
        max_num_batched_tokens=budget if adaptive is None else adaptive.ceiling,
        adaptive_budget=adaptive,
        kv_cache_gib=eng.kv_cache_gib,
        dtype=settings.model.dtype,
        cpu_threads=eng.cpu_threads,
        seed=eng.seed,
    )
    return vllm_engine, load_tokenizer(model_dir)


class EngineHost:
    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        engine: Engine,
        tokenizer: Tokenizer,
        decision_log: DecisionLog | None = None,
    ) -> None:
        """``decision_log``: the local autoscaler's decisions with their observations (replay parity tests)."""
        self.settings = settings
        self.bus = bus
        self.engine = engine
        self.tokenizer = tokenizer
        self.actor: pykka.ActorRef[Any] | None = None
        eng = settings.engine
        self.local = (
            LocalAutoscaler(
                eng.role, settings.autoscaling, eng.max_num_seqs, log=decision_log, key=engine.info.instance_id
            )
            if eng.local_autoscaler
            else None
        )
        self.heartbeater = Heartbeater(
            bus, engine, eng.heartbeat_interval_s, role=eng.role, local=self.local, phase=eng.phase
        )

    @property
    def instance_id(self) -> str:
        return self.engine.info.instance_id

    def start(self, timeout_s: float = 600.0) -> EngineHost:
        self.bus.run(self.engine.start()).result(timeout=timeout_s)
        self.actor = EngineActor.start(
            self.bus,
            self.engine,
            self.tokenizer,
            self.local,
            resend_window_s=self.settings.reliability.resend_window_s,
        )
        actor = self.actor
        self.bus.subscribe(subjects.engine(self.instance_id), actor.tell)
        self.heartbeater.start()
        log.info("engine %s serving (%s)", self.instance_id, self.engine.info.engine_kind)
        return self

    async def astart(self, *, engine_started: bool = False) -> EngineHost:
        """Start from inside the bus's event loop (a bus created with ``loop=``)."""
        if not engine_started:
            await self.engine.start()
        self.actor = EngineActor.start(
            self.bus,
            self.engine,
            self.tokenizer,
            self.local,
            resend_window_s=self.settings.reliability.resend_window_s,
        )
        await self.bus.asubscribe(subjects.engine(self.instance_id), self.actor.tell)
        self.heartbeater.start()
        return self

    async def astop(self, *, stop_engine: bool = False) -> None:
        """Leave the cluster from inside the bus's loop; the engine keeps running unless ``stop_engine``."""
        self.heartbeater.state = "stopping"
        self.heartbeater.beat()
        self.heartbeater.stop()
        if self.actor is not None and self.actor.is_alive():
            self.actor.stop(block=False)
        if stop_engine:
            await self.engine.shutdown()

    def drain(self, timeout_s: float) -> bool:
        """Announce draining (no new dispatches; the scheduler migrates running requests away) and wait
        until nothing runs here or ``timeout_s`` passes. True when the instance emptied in time."""
        self.heartbeater.state = "draining"
        self.heartbeater.beat()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            load = self.engine.load()
            if self.local is not None:  # requests held by the admission limit count too
                load = self.local.adjust_load(load, self.engine.info.block_size)
            if load.num_running == 0 and load.num_waiting == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.heartbeater.state = "stopping"
        try:
            self.heartbeater.beat()
        except Exception:
            log.debug("final heartbeat failed", exc_info=True)
        self.heartbeater.stop()
        if self.actor is not None and self.actor.is_alive():
            self.actor.stop(timeout=10)
        try:
            self.bus.run(self.engine.shutdown()).result(timeout=30)
        except Exception:
            log.warning("engine %s shutdown failed", self.instance_id, exc_info=True)
