"""vLLM engine (CPU or GPU) with Drover's live-migration KV connector.

``from engines.vllm import VllmEngine`` imports vLLM (seconds); the connector modules are imported by vLLM's
own processes by path (``engines.vllm.connector``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engines.vllm.engine import VllmEngine

__all__ = ["VllmEngine"]


def __getattr__(name: str) -> Any:
    if name == "VllmEngine":
        from engines.vllm.engine import VllmEngine

        return VllmEngine
    raise AttributeError(name)
