"""What the teacher sends for one micro-batch, shaped the same on both sides.

Only the answer positions (loss_mask) travel, in row-major (sample, position) order; the student scatters them back
into [B, S, ...] with its own mask, as the teacher-cache reader does. Every micro-batch's rows follow a header of
int64 [step, student dp, micro-batch, answer positions, crc32 of each sample id]: a student never trains on rows of
another sample or step.

  conversations, send=topk: ids [N, K] int32, log-probs [N, K] (teacher.dtype), log tail mass [N] fp32
  conversations, send=full: logits [N, C] in the run's dtype, C = the receiving rank's vocabulary columns below the
                            tokenizer's size (its tensor-parallel shard of the padded vocabulary)
  pairs:                    the reference log-probs [2B] fp64 (chosen rows, then rejected)
"""
from __future__ import annotations

import torch

from megamod.training.teacher_ranks import wire


def header(step: int, student_dp: int, micro: int, mb, ids: list) -> torch.Tensor:
    n = int(mb.loss_mask.bool().sum())
    return torch.tensor([step, student_dp, micro, n, *wire.ids_crc(ids)], dtype=torch.int64)


def columns(tp_rank: int, tp_size: int, padded_vocab: int, vocab_size: int) -> tuple[int, int]:
    """[lo, hi): the ids of a student tensor-parallel rank's logit shard that are tokenizer ids."""
    width = padded_vocab // tp_size
    lo = tp_rank * width
    return lo, max(lo, min(lo + width, vocab_size))


def specs(kind: str, send: str, n: int, pairs: int, topk: int, topk_dtype, logits_dtype, cols: int) -> list:
    """(shape, dtype) of each tensor after the header."""
    if kind == "pairs":
        return [((2 * pairs,), torch.float64)]
    if send == "topk":
        return [((n, topk), torch.int32), ((n, topk), topk_dtype), ((n,), torch.float32)]
    return [((n, cols), logits_dtype)]


def scatter(kind: str, send: str, tensors: list, mb, width: int):
    """The received tensors as the micro-batch's CachedTeacher (on the CPU)."""
    from megamod.teacher_cache.reader import CachedTeacher

    if kind == "pairs":
        return CachedTeacher(reference_2B=tensors[0].to(torch.float32))
    mask_BS = mb.loss_mask.bool()
    B, S = mask_BS.shape
    if send == "topk":
        ids_NK, logprobs_NK, log_tail_N = tensors
        K = ids_NK.shape[1]
        ids_BSK = torch.zeros(B, S, K, dtype=torch.int64)
        logprobs_BSK = torch.zeros(B, S, K, dtype=logprobs_NK.dtype)
        log_tail_BS = torch.zeros(B, S)
        ids_BSK[mask_BS], logprobs_BSK[mask_BS], log_tail_BS[mask_BS] = ids_NK.long(), logprobs_NK, log_tail_N
        return CachedTeacher(ids_BSK=ids_BSK, logprobs_BSK=logprobs_BSK, log_tail_BS=log_tail_BS)
    logits_NC = tensors[0]
    logits_BSv = torch.zeros(B, S, width, dtype=logits_NC.dtype)
    logits_BSv[..., :logits_NC.shape[1]][mask_BS] = logits_NC
    return CachedTeacher(logits_BSv=logits_BSv)
