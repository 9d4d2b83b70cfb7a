"""Depth pruning: a model made of a subset of another's decoder layers (Minitron's depth pruning, ShortGPT).

Everything outside the decoder layers (embeddings, final norm, output layer, vision tower, projector) is copied
unchanged; kept layer i of the new model is layer keep[i] of the source, with its MoE setting. Pruned, then
distilled from the unpruned model, is how Minitron makes small models from large ones; megamod's demo uses it to give
its student a language model that already reads images, as the paper's student starts from a pre-trained one.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from megamod.models.language import LanguageModelConfig

# The language model's layers only: a LLaVA model's vision tower has decoder layers too.
_LAYER = re.compile(r"^((?:language_model\.)?decoder\.layers\.)(\d+)(\..*)$")


def keep_layers(spec: str, num_layers: int) -> list[int]:
    """'0,3' (layer indices) or 'every:K' (layers 0, K, 2K, ... and always the last) -> sorted kept layers."""
    if spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"--keep-layers {spec!r}: expected every:K with K >= 1")
        return sorted(set(range(0, num_layers, k)) | {num_layers - 1})
    try:
        layers = sorted({int(t) for t in spec.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--keep-layers {spec!r}: expected comma-separated layer indices or every:K") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or not layers:
        raise ValueError(f"--keep-layers {spec!r}: layers {bad or 'none'} are not in [0, {num_layers})")
    return layers


def pruned_config(cfg: LanguageModelConfig, keep: list[int]) -> LanguageModelConfig:
    pattern = [cfg.moe_layer_pattern[i] for i in keep] if cfg.moe_layer_pattern else cfg.moe_layer_pattern
    return dataclasses.replace(cfg, num_layers=len(keep), moe_layer_pattern=pattern)


def source_name(pruned_name: str, keep: list[int]) -> str:
    """The source tensor a pruned model's tensor is copied from (one pipeline stage holding every layer)."""
    m = _LAYER.match(pruned_name)
    if m is None:
        return pruned_name
    return f"{m.group(1)}{keep[int(m.group(2))]}{m.group(3)}"


@torch.no_grad()
def prune_into(source_model, pruned_model, keep: list[int]) -> int:
    """Copies `source_model`'s kept layers and everything else into `pruned_model` (same TP/EP layout, PP = 1);
    returns the number of tensors copied. Every tensor of the pruned model must have a source of its shape."""
    src = source_model.state_dict()
    copied = 0
    for name, tensor in pruned_model.state_dict().items():
        if not torch.is_tensor(tensor) or name.endswith("._extra_state"):
            continue
        origin = source_name(name, keep)
        if origin not in src:
            raise KeyError(f"pruning: {name} has no source tensor {origin}")
        if src[origin].shape != tensor.shape:
            raise ValueError(f"pruning: {name} {tuple(tensor.shape)} vs source {origin} {tuple(src[origin].shape)}")
        tensor.copy_(src[origin])
        copied += 1
    return copied
