"""KD against a cached teacher: its top-k log-probs per position plus one bucket for the remaining mass.

The teacher side (`teacher_topk_BSK`) runs once, when the cache is written; the student side (`topk_kd_loss_BS`)
runs in training. Both work on tensor-parallel vocabulary shards without gathering the vocabulary, with kd.py's
gradient rule: the loss depends only on TP all-reduced sums of local terms (identity backward), so each rank's
backward gives exactly its shard of the full-vocabulary gradient.

The loss (docs/TEACHER_CACHE.md): with T the teacher's top-k ids at a position, q the teacher distribution, p the
student's, and the K + 1 buckets (the ids of T, and "the rest" R = V \\ T),

    q'_i = q_i / Z',  q'_R = q_R / Z',  Z' = sum_{i in T} q_i + q_R   (renormalised: stored values are rounded)
    p_R  = sum_{j not in T} p_j                                          (the student's own tail mass)
    L    = sum_{i in T} q'_i (log q'_i - log p_i) + q'_R (log q'_R - log p_R),   the R term 0 when q_R = 0.

This is KL(q || p) with the tail ids merged into one bucket. With K = V it is the full forward KL; for K < V it is
never larger (log-sum inequality), short by q_R * KL(q(.|R) || p(.|R)). Its gradient w.r.t. the student's logits
equals the full KL's on the top-k ids; on the tail ids it is p_j - q_R p_j / p_R instead of p_j - q_j, so the two
gradients differ by at most 2 q_R in L1 norm per position.
"""
from __future__ import annotations

import torch

from megamod.losses.kd import _local_max_BS, _valid_columns


def _shard_start(shard_width: int) -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() * shard_width


def _topk_mask_BSv(ids_BSK: torch.Tensor, start: int, width: int, shape) -> torch.Tensor:
    """True at the columns of this shard [start, start + width) that are among ids_BSK."""
    local_BSK = ids_BSK - start
    inside_BSK = (local_BSK >= 0) & (local_BSK < width)
    mask_BSv = torch.zeros(*shape[:-1], width + 1, dtype=torch.bool, device=ids_BSK.device)
    # ids outside the shard go to a spare last column, dropped below
    mask_BSv.scatter_(-1, torch.where(inside_BSK, local_BSK, width), True)
    return mask_BSv[..., :width]


def teacher_topk_BSK(logits_BSv: torch.Tensor, vocab_size: int, k: int):
    """The teacher's top-k at every position, from its vocab-parallel logits [B, S, V/tp].

    Returns (ids_BSK int64, logprobs_BSK fp32, log_tail_BS fp32): the k most likely token ids (padding ids
    excluded, most likely first), their log-probs, and log of the probability of every other id (-inf when k
    covers the vocabulary). Every TP rank of the group gets the same result."""
    from megatron.core import parallel_state as ps

    if not 0 < k <= vocab_size:
        raise ValueError(f"teacher_topk_BSK: k = {k} must be in [1, vocab_size = {vocab_size}]")
    tp = ps.get_tensor_model_parallel_world_size()
    shard = logits_BSv.shape[-1]
    x_BSv = _valid_columns(logits_BSv, vocab_size).detach().float()
    width, start = x_BSv.shape[-1], _shard_start(shard)
    group = ps.get_tensor_model_parallel_group() if tp > 1 else None
    m_BS = _local_max_BS(x_BSv)
    if tp > 1:
        torch.distributed.all_reduce(m_BS, op=torch.distributed.ReduceOp.MAX, group=group)
    e_BSv = (x_BSv - m_BS.unsqueeze(-1)).exp()

    # Local candidates, padded to k with -inf so that every rank sends the same shape.
    kk = min(k, width)
    values_BSk, local_BSk = x_BSv.topk(kk, dim=-1) if kk else (x_BSv[..., :0], x_BSv[..., :0].long())
    pad = k - kk
    values_BSK = torch.cat([values_BSk, values_BSk.new_full((*values_BSk.shape[:-1], pad), float("-inf"))], -1)
    ids_BSK = torch.cat([local_BSk + start, local_BSk.new_full((*local_BSk.shape[:-1], pad), -1)], -1)
    if tp > 1:
        all_values = [torch.empty_like(values_BSK) for _ in range(tp)]
        all_ids = [torch.empty_like(ids_BSK) for _ in range(tp)]
        torch.distributed.all_gather(all_values, values_BSK.contiguous(), group=group)
        torch.distributed.all_gather(all_ids, ids_BSK.contiguous(), group=group)
        values_BSC, ids_BSC = torch.cat(all_values, -1), torch.cat(all_ids, -1)
        values_BSK, pick_BSK = values_BSC.topk(k, dim=-1)
        ids_BSK = ids_BSC.gather(-1, pick_BSK)

    in_topk_BSv = _topk_mask_BSv(ids_BSK, start, width, x_BSv.shape)
    sums_2BS = torch.stack([e_BSv.sum(-1), (e_BSv * ~in_topk_BSv).sum(-1)])
    if tp > 1:
        torch.distributed.all_reduce(sums_2BS, group=group)
    log_z_BS = sums_2BS[0].log() + m_BS
    logprobs_BSK = values_BSK - log_z_BS.unsqueeze(-1)
    # The tail summed directly (not 1 - sum of top-k), so a tiny tail keeps its digits.
    log_tail_BS = sums_2BS[1].log() - sums_2BS[0].log()
    return ids_BSK, logprobs_BSK, log_tail_BS


def renormalise(logprobs_NK: torch.Tensor, log_tail_N: torch.Tensor):
    """fp32 teacher buckets that sum to one: stored log-probs are rounded (bf16/fp16), so their K + 1 bucket
    masses need not add up to exactly 1."""
    lq_NK, lq_tail_N = logprobs_NK.float(), log_tail_N.float()
    log_z_N = torch.logsumexp(torch.cat([lq_NK, lq_tail_N.unsqueeze(-1)], -1), dim=-1)
    return lq_NK - log_z_N.unsqueeze(-1), lq_tail_N - log_z_N


def topk_kd_loss_BS(student_logits_BSv: torch.Tensor, ids_BSK: torch.Tensor, logprobs_BSK: torch.Tensor,
                    log_tail_BS: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-position bucketed forward KL [B, S] in fp32 (formula in the module docstring).

    `student_logits_BSv`: this TP rank's shard of the student's logits; `ids_BSK`, `logprobs_BSK`, `log_tail_BS`:
    the cached teacher (positions outside the loss mask may hold anything valid, e.g. zeros: the caller masks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if ids_BSK.shape != logprobs_BSK.shape or ids_BSK.shape[:-1] != student_logits_BSv.shape[:-1] \
            or log_tail_BS.shape != ids_BSK.shape[:-1]:
        raise ValueError(f"topk_kd_loss_BS: shapes do not line up: student {tuple(student_logits_BSv.shape)}, ids "
                         f"{tuple(ids_BSK.shape)}, logprobs {tuple(logprobs_BSK.shape)}, tail {tuple(log_tail_BS.shape)}")
    tp = ps.get_tensor_model_parallel_world_size()
    shard = student_logits_BSv.shape[-1]
    x_BSv = _valid_columns(student_logits_BSv, vocab_size).float()
    width, start = x_BSv.shape[-1], _shard_start(shard)

    m_BS = _local_max_BS(x_BSv)
    if tp > 1:
        torch.distributed.all_reduce(m_BS, op=torch.distributed.ReduceOp.MAX,
                                     group=ps.get_tensor_model_parallel_group())
    d_BSv = x_BSv - m_BS.unsqueeze(-1)
    e_BSv = d_BSv.exp()
    in_topk_BSv = _topk_mask_BSv(ids_BSK, start, width, x_BSv.shape)
    # The student's (shifted) logit at each top-k id: only the owning rank contributes a non-zero term.
    local_BSK = ids_BSK - start
    inside_BSK = (local_BSK >= 0) & (local_BSK < width)
    picked_BSK = d_BSv.gather(-1, local_BSK.clamp(0, max(width - 1, 0))) if width else d_BSv.new_zeros(ids_BSK.shape)
    picked_BSK = torch.where(inside_BSK, picked_BSK, torch.zeros_like(picked_BSK))
    local_BSn = torch.cat([picked_BSK, e_BSv.sum(-1, keepdim=True), (e_BSv * ~in_topk_BSv).sum(-1, keepdim=True)], -1)
    total_BSn = reduce_from_tensor_model_parallel_region(local_BSn)
    d_BSK, z_BS, tail_BS = total_BSn[..., :-2], total_BSn[..., -2], total_BSn[..., -1]

    lq_BSK, lq_tail_BS = renormalise(logprobs_BSK, log_tail_BS)
    log_z_BS = z_BS.log()
    lp_BSK = d_BSK - log_z_BS.unsqueeze(-1)
    kl_BS = (lq_BSK.exp() * (lq_BSK - lp_BSK)).sum(-1)
    # q_R = 0 (k covers the vocabulary): the R term is 0 * finite, never 0 * inf = nan, in forward and backward;
    # the clamp keeps a tail the student rounds to 0 finite too.
    has_tail_BS = lq_tail_BS > float("-inf")
    lq_tail_BS = torch.where(has_tail_BS, lq_tail_BS, torch.zeros_like(lq_tail_BS))
    q_tail_BS = torch.where(has_tail_BS, lq_tail_BS.exp(), torch.zeros_like(lq_tail_BS))
    lp_tail_BS = tail_BS.clamp(min=torch.finfo(torch.float32).tiny).log() - log_z_BS
    return kl_BS + q_tail_BS * (lq_tail_BS - lp_tail_BS)
