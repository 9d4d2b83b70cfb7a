"""Structured pruning of a language model, as Minitron makes small models from large ones (prune, then distil).

Depth: the new model is a subset of the source's decoder layers; kept layer i is layer keep[i] of the source, with its
MoE setting. Width (dense models): every layer's SwiGLU MLP keeps its `ffn_hidden_size` most important neurons,
ranked by ||gate_j|| * ||up_j|| * ||down_j|| (the norms of the neuron's rows in fc1 and its column in fc2; a neuron
with any of them zero contributes nothing). Everything else (embeddings, attention, norms, output layer, vision tower,
projector) is copied unchanged. megamod's demo prunes its trained teacher into the student, which then starts with
a language model that already reads the image tokens, as the paper's student starts from a pre-trained LLM.
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


def pruned_config(cfg: LanguageModelConfig, keep: list[int], ffn_hidden_size: int | None = None
                  ) -> LanguageModelConfig:
    pattern = [cfg.moe_layer_pattern[i] for i in keep] if cfg.moe_layer_pattern else cfg.moe_layer_pattern
    if ffn_hidden_size is not None:
        if cfg.num_experts is not None:
            raise ValueError("MLP width pruning works on dense models; prune before upcycling")
        if not 1 <= ffn_hidden_size <= cfg.ffn_hidden_size:
            raise ValueError(f"--ffn-hidden-size {ffn_hidden_size}: expected 1..{cfg.ffn_hidden_size} (the source's)")
    return dataclasses.replace(cfg, num_layers=len(keep), moe_layer_pattern=pattern,
                               ffn_hidden_size=ffn_hidden_size or cfg.ffn_hidden_size)


def important_neurons(fc1_2FH: torch.Tensor, fc2_HF: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the `keep` SwiGLU neurons with the largest ||gate_j|| * ||up_j|| * ||down_j||."""
    ffn = fc2_HF.shape[1]
    score_F = fc1_2FH[:ffn].float().norm(dim=1) * fc1_2FH[ffn:].float().norm(dim=1) * fc2_HF.float().norm(dim=0)
    return score_F.topk(keep).indices.sort().values


def source_name(pruned_name: str, keep: list[int]) -> str:
    """The source tensor a pruned model's tensor is copied from (one pipeline stage holding every layer)."""
    m = _LAYER.match(pruned_name)
    if m is None:
        return pruned_name
    return f"{m.group(1)}{keep[int(m.group(2))]}{m.group(3)}"


def _narrowed(name: str, src: dict, origin: str, ffn: int) -> torch.Tensor:
    """The source tensor of a width-pruned MLP weight: its most important neurons' rows (fc1) or columns (fc2)."""
    mlp = origin.rsplit(".linear_fc", 1)[0]
    idx = important_neurons(src[f"{mlp}.linear_fc1.weight"], src[f"{mlp}.linear_fc2.weight"], ffn)
    full = src[origin]
    if name.endswith("linear_fc1.weight"):
        return torch.cat([full[idx], full[full.shape[0] // 2 + idx]])  # [gate; up] halves
    return full[:, idx]


@torch.no_grad()
def prune_into(source_model, pruned_model, keep: list[int], ffn_hidden_size: int | None = None) -> int:
    """Copies `source_model`'s kept layers (their most important MLP neurons with `ffn_hidden_size`) and everything
    else into `pruned_model` (same TP/EP layout, PP = 1; TP = 1 for width pruning); returns the number of tensors
    copied. Every tensor of the pruned model must have a source of its shape."""
    src = source_model.state_dict()
    copied = 0
    for name, tensor in pruned_model.state_dict().items():
        if not torch.is_tensor(tensor) or name.endswith("._extra_state"):
            continue
        origin = source_name(name, keep)
        if origin not in src:
            raise KeyError(f"pruning: {name} has no source tensor {origin}")
        value = src[origin]
        if ffn_hidden_size is not None and _LAYER.match(name) and re.search(r"\.mlp\.linear_fc[12]\.weight$", name):
            value = _narrowed(name, src, origin, ffn_hidden_size)
        if value.shape != tensor.shape:
            raise ValueError(f"pruning: {name} {tuple(tensor.shape)} vs source {origin} {tuple(value.shape)}")
        tensor.copy_(value)
        copied += 1
    return copied
