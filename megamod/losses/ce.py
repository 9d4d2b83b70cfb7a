"""Language-model cross-entropy on tensor-parallel vocabulary shards, with padding rows excluded."""
from __future__ import annotations

import torch


def mask_padded_vocab(logits_BSv: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padding columns (ids >= vocab_size) of this rank's shard to -inf.

    Padding rows exist only so the vocabulary splits evenly across TP ranks; left in, they would add exp(logit)
    terms to every softmax and the loss would differ from the unpadded model's.
    """
    from megatron.core import parallel_state as ps

    shard = logits_BSv.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return logits_BSv
    padded_v = torch.arange(start, start + shard, device=logits_BSv.device) >= vocab_size
    return logits_BSv.masked_fill(padded_v, float("-inf"))


def cross_entropy_BS(logits_BSv: torch.Tensor, labels_BS: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token loss [B, S] from vocab-parallel logits [B, S, V/tp]; never gathers the vocabulary."""
    from megatron.core import tensor_parallel

    masked_BSv = mask_padded_vocab(logits_BSv.float(), vocab_size)
    if masked_BSv.data_ptr() == logits_BSv.data_ptr():
        # megatron's vocab-parallel CE works in place: the caller's logits (also the KD loss's input) stay intact.
        masked_BSv = masked_BSv.clone()
    return tensor_parallel.vocab_parallel_cross_entropy(masked_BSv, labels_BS)


def masked_mean(loss_BS: torch.Tensor, loss_mask_BS: torch.Tensor) -> torch.Tensor:
    mask_BS = loss_mask_BS.to(loss_BS.dtype)
    return (loss_BS * mask_BS).sum() / mask_BS.sum().clamp(min=1)
