"""The torch engine's device plumbing, checked on the CPU: the GPU migration path's host gather sends the
same bytes as the CPU path's zero-copy views, step inputs move to the stage's device, and a bfloat16 engine
runs a request end to end. (The GPU itself is exercised by scripts/gpu_check.py; see docs/gpu.md.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engines.base import EngineRequest
from engines.tiny_model import TINY, ensure_model
from engines.torch import TorchEngine
from engines.torch.batch import StageBatch
from engines.torch.kv_cache import PagedKvCache
from engines.torch.migration import gathered_blocks, pool_views
from transport.messages import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = os.environ.get("DROVER_TEST_MODEL_CACHE")
    return ensure_model(Path(cache) if cache else tmp_path_factory.getbasetemp() / "torch-models", TINY)


def test_gathered_blocks_carry_the_bytes_of_the_pool_views() -> None:
    kv = PagedKvCache(range(3), 8, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16, device="cpu")
    generator = torch.Generator().manual_seed(0)
    for pool in kv.pools.values():
        pool.copy_(torch.randn(pool.shape, generator=generator).to(torch.bfloat16))
    blocks = [5, 0, 3]
    views = pool_views(kv.pools, blocks)
    gathered = gathered_blocks(kv.pools, blocks)
    assert len(views) == len(gathered) == 3
    for segments, single in zip(views, gathered, strict=True):
        assert len(single) == 1 and b"".join(bytes(s) for s in segments) == bytes(single[0])
    assert gathered_blocks(kv.pools, []) == []


def test_stage_batch_moves_to_a_device_and_stays_when_there() -> None:
    batch = StageBatch(
        positions=torch.arange(3),
        query_start=torch.tensor([0, 3]),
        context_lens=torch.tensor([3]),
        block_tables=torch.tensor([[0]]),
        logits_indices=torch.tensor([2]),
        token_ids=torch.tensor([1, 5, 6]),
    )
    assert batch.to(torch.device("cpu")) is batch
    moved = batch.to(torch.device("meta"))  # any other device: every tensor goes there
    assert moved.positions.device.type == "meta" and moved.token_ids is not None
    assert moved.token_ids.device.type == "meta" and moved.hidden is None


async def test_bfloat16_engine_on_an_explicit_device_streams_a_request(model_dir: Path) -> None:
    engine = TorchEngine("dev", model_dir, model_name="drover-tiny", num_blocks=32, dtype="bfloat16", device="cpu")
    await engine.start()
    try:
        assert engine.stage.device == torch.device("cpu")
        assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in engine.stage.kv.pools.values())
        tokens: list[int] = []
        request = EngineRequest("r", [1, 72, 105], SamplingParams(max_tokens=8, ignore_eos=True))
        async for out in engine.generate(request):
            tokens += out.new_token_ids
        assert len(tokens) == 8
    finally:
        await engine.shutdown()
