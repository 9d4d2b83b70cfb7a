"""The unit of every HF <-> megamod tensor mapping: a Rule says which HF tensors make one Megatron tensor and how to
split it back, so that conversion streams one tensor at a time in both directions. A leaf module."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Rule:
    """One Megatron tensor <- these HF tensors."""

    hf_names: list[str]
    to_megatron: Callable[..., torch.Tensor]  # HF tensors (in hf_names order) -> Megatron tensor
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]  # Megatron tensor -> HF tensors (in hf_names order)


def same(name: str) -> Rule:
    return Rule([name], lambda t: t, lambda t: [t])


def padded_rows(name: str, cfg) -> Rule:
    """Embedding / LM head: zero rows pad the vocabulary; they are dropped again on export."""

    def to_megatron(t):
        if t.shape[0] != cfg.vocab_size:
            raise ValueError(f"{name}: {t.shape[0]} rows, config vocab_size is {cfg.vocab_size}")
        out = t.new_zeros((cfg.padded_vocab_size, t.shape[1]))
        out[: cfg.vocab_size] = t
        return out

    return Rule([name], to_megatron, lambda t: [t[: cfg.vocab_size]])


def qkv_rule(prefix: str, kind: str, groups: int, q_per_group: int, head_dim: int) -> Rule:
    """Megatron keeps q, k, v interleaved per key/value group: [q heads of group g, k_g, v_g] for each g."""
    d = head_dim

    def to_megatron(q, k, v):
        tail = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, q_per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
            dim=1,
        ).reshape(-1, *tail)

    def to_hf(qkv):
        tail = qkv.shape[1:]
        per_group = qkv.reshape(groups, (q_per_group + 2) * d, *tail)
        q, k, v = per_group.split([q_per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]

    names = [f"{prefix}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    return Rule(names, to_megatron, to_hf)
