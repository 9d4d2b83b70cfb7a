"""Sparse upcycling (METHOD.md section 2): a dense student becomes a Mixture of Experts.

The FFN of every layer in the MoE pattern is copied into each of N experts, unchanged (no noise); the router is a
fresh bias-free Linear(H -> N) with torch.nn.Linear's default initialisation, in fp32, identical on every rank.
With identical experts and top-k weights renormalised to sum to one, the sparse model computes exactly the dense
model's function at initialisation.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from megamod.models.language import LanguageModelConfig


def moe_layer_pattern(spec: str, num_layers: int) -> list[int]:
    """'even' (0, 2, 4, ... as LLaVA-MoD), 'odd', 'all', or explicit layer indices '0,3,5' -> a 0/1 list."""
    if spec == "even":
        return [1 - i % 2 for i in range(num_layers)]
    if spec == "odd":
        return [i % 2 for i in range(num_layers)]
    if spec == "all":
        return [1] * num_layers
    try:
        layers = {int(t) for t in spec.split(",") if t.strip()}
    except ValueError:
        raise ValueError(f"--moe-layers {spec!r}: expected 'even', 'odd', 'all' or comma-separated layer indices")
    bad = sorted(i for i in layers if not 0 <= i < num_layers)
    if bad or not layers:
        raise ValueError(f"--moe-layers {spec!r}: layers {bad or 'none'} are not in [0, {num_layers})")
    return [int(i in layers) for i in range(num_layers)]


def sparse_config(dense: LanguageModelConfig, num_experts: int, topk: int, pattern: list[int],
                  aux_loss_coeff: float = 0.01) -> LanguageModelConfig:
    if dense.num_experts is not None:
        raise ValueError("the model is already sparse")
    if not 1 <= topk <= num_experts:
        raise ValueError(f"topk {topk} must be in [1, num_experts={num_experts}]")
    return dataclasses.replace(dense, num_experts=num_experts, moe_router_topk=topk, moe_layer_pattern=list(pattern),
                               moe_aux_loss_coeff=aux_loss_coeff, moe_ffn_hidden_size=dense.ffn_hidden_size)


_EXPERT = re.compile(r"^(.*decoder\.layers\.\d+\.mlp)\.experts\.local_experts\.\d+\.(linear_fc[12]\.weight)$")
_ROUTER = re.compile(r"^.*decoder\.layers\.\d+\.mlp\.router\.weight$")


def dense_source(sparse_name: str) -> str | None:
    """Which dense parameter a sparse parameter is copied from (None for routers, which are new)."""
    if _ROUTER.match(sparse_name):
        return None
    m = _EXPERT.match(sparse_name)
    return f"{m.group(1)}.{m.group(2)}" if m else sparse_name


@torch.no_grad()
def upcycle_into(dense_model, sparse_model, seed: int = 1234) -> dict:
    """Copy a dense model (this rank's shards) into a sparse one built at the same TP/PP layout.

    Expert linears are sharded over expert-TP exactly as the dense FFN over TP (megatron's default etp = tp), so
    each rank copies its own shard. Returns counts for the log."""
    dense = dict(dense_model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    copied = routers = 0
    used = set()
    for name, param in sparse_model.named_parameters():
        source = dense_source(name)
        if source is None:
            # Same draw on every rank (the router is replicated); nn.Linear's default: kaiming_uniform(a=sqrt 5).
            bound = 1 / math.sqrt(param.shape[1])
            weight = torch.empty(param.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            param.copy_(weight)
            routers += 1
            continue
        if source not in dense:
            raise ValueError(f"upcycling: {name} has no dense counterpart {source}")
        if dense[source].shape != param.shape:
            raise ValueError(f"upcycling: {name} {tuple(param.shape)} vs dense {source} {tuple(dense[source].shape)}")
        param.copy_(dense[source])
        used.add(source)
        copied += 1
    unused = sorted(set(dense) - used)
    if unused:
        raise ValueError(f"upcycling: dense parameters with no place in the sparse model: {unused}")
    return {"copied": copied, "routers": routers}
