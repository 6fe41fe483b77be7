"""Reads only the tensors a layer range needs from a Hugging Face safetensors checkpoint.

A stage that holds layers [first, last) must not pay for the others: ``safe_open`` memory-maps the file and
``get_tensor`` copies out one tensor at a time, so dropping and restoring layers reloads exactly those
layers' bytes from disk. Sharded checkpoints (``model.safetensors.index.json``) are supported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

_LAYER_PARAMS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def layer_param_names(layer: int) -> list[str]:
    return [f"model.layers.{layer}.{name}" for name in _LAYER_PARAMS]


class WeightFiles:
    """Where each tensor of a checkpoint lives, and a loader for named subsets of them."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        self._file_of: dict[str, Path] = {}
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            single = self.model_dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"no model.safetensors (or index) in {self.model_dir}")
            with safe_open(str(single), framework="pt") as handle:
                self._file_of = dict.fromkeys(handle.keys(), single)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def load(
        self, names: Iterable[str], dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The named tensors, cast to ``dtype``, on ``device`` and contiguous (each an independent allocation)."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            if name not in self._file_of:
                raise KeyError(f"tensor {name} not found in {self.model_dir}")
            by_file[self._file_of[name]].append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name).to(device=device, dtype=dtype).contiguous()
        return tensors
