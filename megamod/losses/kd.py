"""Knowledge-distillation KL on tensor-parallel vocabulary shards, never gathering the vocabulary.

Gradient rule: the loss is a function only of TP all-reduced sums of purely local terms, through an all-reduce whose
backward is the identity. Then each rank's backward differentiates its own local terms and gets exactly its shard of
the full-vocabulary gradient, with no extra communication.
"""
from __future__ import annotations

import torch

KD_MODES = ("forward", "reverse")


def _valid_columns(logits_BSv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's shard without padding ids (>= vocab_size); may have zero columns on the last ranks."""
    from megatron.core import parallel_state as ps

    shard = logits_BSv.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    return logits_BSv[..., : max(0, min(shard, vocab_size - start))]


def _local_max_BS(x_BSv: torch.Tensor) -> torch.Tensor:
    if x_BSv.shape[-1] == 0:  # amax of an empty dim raises; -inf is MAX's identity
        return x_BSv.new_full(x_BSv.shape[:-1], float("-inf"))
    return x_BSv.detach().amax(dim=-1)


def kd_loss_BS(student_logits_BSv: torch.Tensor, teacher_logits_BSv: torch.Tensor, vocab_size: int,
               mode: str = "forward", temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL [B, S] in fp32 between teacher and student distributions over the first vocab_size ids.

    Inputs are this TP rank's shards [B, S, V/tp] of a padded vocabulary; padding ids are excluded. mode "forward"
    is KL(p_T || p_S) (the paper's mimic loss), "reverse" is KL(p_S || p_T). Both logits are divided by
    `temperature` and the KL is multiplied by temperature**2 (Hinton scaling, so gradient magnitudes do not shrink
    as the temperature grows). The teacher is a constant (detached). The caller masks and averages (masked_mean).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if student_logits_BSv.shape != teacher_logits_BSv.shape:
        raise ValueError(f"kd_loss_BS: student and teacher logit shards differ in shape: "
                         f"{tuple(student_logits_BSv.shape)} vs {tuple(teacher_logits_BSv.shape)}")
    if mode not in KD_MODES:
        raise ValueError(f"kd_loss_BS: unknown mode {mode!r}; expected one of {KD_MODES}")
    if not temperature > 0:
        raise ValueError(f"kd_loss_BS: temperature must be > 0, got {temperature}")
    tp = ps.get_tensor_model_parallel_world_size()
    if not 0 < vocab_size <= tp * student_logits_BSv.shape[-1]:
        raise ValueError(f"kd_loss_BS: vocab_size {vocab_size} not in (0, tp * shard width = "
                         f"{tp} * {student_logits_BSv.shape[-1]}]")

    xS_BSv = _valid_columns(student_logits_BSv, vocab_size).float() / temperature
    xT_BSv = _valid_columns(teacher_logits_BSv, vocab_size).detach().float() / temperature

    # Global maxima for stability (detached constants: the KL below is invariant to them).
    m_2BS = torch.stack([_local_max_BS(xS_BSv), _local_max_BS(xT_BSv)])
    if tp > 1:
        group = ps.get_tensor_model_parallel_group()
        torch.distributed.all_reduce(m_2BS, op=torch.distributed.ReduceOp.MAX, group=group)
    dS_BSv = xS_BSv - m_2BS[0].unsqueeze(-1)
    dT_BSv = xT_BSv - m_2BS[1].unsqueeze(-1)
    eS_BSv, eT_BSv = dS_BSv.exp(), dT_BSv.exp()

    # With Z = sum e (global), forward KL = sum pT (log pT - log pS) = U / Z_T + log(Z_S / Z_T),
    #   U = sum e_T (d_T - d_S);
    # reverse KL = sum pS (log pS - log pT) = V / Z_S + log(Z_T / Z_S),  V = sum e_S (d_S - d_T).
    if mode == "forward":
        w_BSv = eT_BSv * (dT_BSv - dS_BSv)
    else:
        w_BSv = eS_BSv * (dS_BSv - dT_BSv)
    local_3BS = torch.stack([eS_BSv.sum(-1), eT_BSv.sum(-1), w_BSv.sum(-1)])
    zS_BS, zT_BS, w_BS = reduce_from_tensor_model_parallel_region(local_3BS)
    # log of the ratio, not a difference of logs: each log Z is ~log V and the difference would cost fp32 digits.
    if mode == "forward":
        kl_BS = w_BS / zT_BS + (zS_BS / zT_BS).log()
    else:
        kl_BS = w_BS / zS_BS + (zT_BS / zS_BS).log()
    return kl_BS * temperature**2
