"""Preference distillation: DPO and KTO-pair on sequence log-probs, with the teacher as the reference model."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megamod.losses.ce import cross_entropy_BS

PREFERENCE_LOSSES = ("dpo", "kto_pair")


def sequence_logprobs_B(logits_BSv: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """Sum over masked positions of log p(label) [B], from vocab-parallel logits [B, S, V/tp]."""
    x_BSv = logits_BSv.float()
    if x_BSv is logits_BSv:
        # megatron's vocab-parallel CE overwrites its fp32 input in place (logits -> softmax); keep the caller's.
        x_BSv = x_BSv.clone()
    mask_BS = loss_mask_BS.to(torch.bool)
    labels_BS = torch.where(mask_BS, labels_BS, torch.zeros_like(labels_BS))  # e.g. -100 at masked positions
    logp_BS = -cross_entropy_BS(x_BSv, labels_BS, vocab_size)
    return (logp_BS * mask_BS.to(logp_BS.dtype)).sum(-1)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rewards(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B):
    r_chosen_B = _at_least_fp32(policy_chosen_B) - _at_least_fp32(reference_chosen_B)
    r_rejected_B = _at_least_fp32(policy_rejected_B) - _at_least_fp32(reference_rejected_B)
    return r_chosen_B, r_rejected_B


def _metrics(r_chosen_B: torch.Tensor, r_rejected_B: torch.Tensor, beta: float) -> dict:
    rc_B, rr_B = r_chosen_B.detach(), r_rejected_B.detach()
    return {
        "reward_chosen": (beta * rc_B).mean(),
        "reward_rejected": (beta * rr_B).mean(),
        "reward_margin": (beta * (rc_B - rr_B)).mean(),
        "reward_accuracy": (rc_B > rr_B).to(rc_B.dtype).mean(),
    }


def dpo_loss(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B,
             beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Per-pair DPO loss [B]: -log sigmoid(beta ((pc - rc) - (pr - rr)))."""
    r_chosen_B, r_rejected_B = _rewards(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B)
    loss_B = -F.logsigmoid(beta * (r_chosen_B - r_rejected_B))
    return loss_B, _metrics(r_chosen_B, r_rejected_B, beta)


def kto_pair_loss(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B,
                  beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """KTO-pair loss values [2B] (as TRL's kto_pair; the caller takes the mean):
    cat[1 - sigmoid(beta (r+ - z-)), 1 - sigmoid(beta (z+ - r-))], z± = max(0, batch mean r±), not detached."""
    r_chosen_B, r_rejected_B = _rewards(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B)
    z_chosen = r_chosen_B.mean().clamp(min=0)
    z_rejected = r_rejected_B.mean().clamp(min=0)
    loss_2B = torch.cat([1 - torch.sigmoid(beta * (r_chosen_B - z_rejected)),
                         1 - torch.sigmoid(beta * (z_chosen - r_rejected_B))])
    return loss_2B, _metrics(r_chosen_B, r_rejected_B, beta)


def preference_loss(name: str, policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B,
                    beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Dispatch to dpo_loss ("dpo") or kto_pair_loss ("kto_pair")."""
    fns = {"dpo": dpo_loss, "kto_pair": kto_pair_loss}
    if name not in fns:
        raise ValueError(f"unknown preference loss {name!r}; expected one of {PREFERENCE_LOSSES}")
    return fns[name](policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B, beta=beta)
