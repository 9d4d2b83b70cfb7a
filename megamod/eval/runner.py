"""Batched forwards for scoring under any TP/PP/EP layout, and the choice read from the last prompt position.

Data-parallel replicas split the rows; every replica runs the same number of forwards (the last shard is padded with
repeats, dropped afterwards), because expert-parallel all-to-alls span replicas. Rows are right-padded (to a multiple
of TP under sequence parallelism): causal attention and dropless routing leave the real positions unchanged. The
scores, known on the last pipeline stage, reach every rank by one all-gather.
"""
from __future__ import annotations

import torch


def last_logits(model, tokens_BS: torch.Tensor, last_B: torch.Tensor, vocab_size: int,
                images_NCHW: torch.Tensor | None = None, padding_BS: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 logits [B, vocab_size] at position last_B[b] of each row on the last pipeline stage, None elsewhere.

    Like inference.forward_logits, but the positions are picked before the vocabulary shards are gathered, so a
    batch never holds [B, S, V] full-vocabulary logits."""
    from megatron.core import tensor_parallel

    from megamod.inference import forward_only
    from megamod.models.common import routing_padding_mask

    B, S = tokens_BS.shape
    position_ids_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
    padding_BS = None if padding_BS is None else routing_padding_mask(model.config, padding_BS)
    rows_B = torch.arange(B)
    logits_Bv = forward_only(
        model, lambda m: m(tokens_BS, position_ids_BS, images_NCHW, padding_mask=padding_BS),
        lambda logits_BSv: logits_BSv[rows_B.to(logits_BSv.device), last_B.to(logits_BSv.device)], S, B)
    if logits_Bv is None:
        return None
    logits_BV = tensor_parallel.gather_from_tensor_model_parallel_region(logits_Bv)
    return logits_BV[:, :vocab_size].float()


def is_writer() -> bool:
    """The one rank that reports: last pipeline stage, tensor-parallel rank 0, data-parallel rank 0."""
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and \
        ps.get_data_parallel_rank() == 0


def _batch(loaded, pad_id: int, rows: list, processor):
    from megatron.core import parallel_state as ps

    from megamod.eval.formats import open_image
    from megamod.models.llava import expand_image_tokens

    num_image_tokens = loaded.cfg.vision.num_image_tokens
    ids = [expand_image_tokens(prompt, loaded.image_token_id, num_image_tokens) for _, prompt, _, _ in rows]
    S = max(len(i) for i in ids)
    if loaded.model.config.sequence_parallel:  # (MoE at TP > 1) splits S over the TP ranks
        tp = ps.get_tensor_model_parallel_world_size()
        S = -(-S // tp) * tp
    tokens_BS = torch.full((len(rows), S), pad_id, dtype=torch.int64)
    padding_BS = torch.ones((len(rows), S), dtype=torch.bool)
    for b, row_ids in enumerate(ids):
        tokens_BS[b, :len(row_ids)] = torch.tensor(row_ids)
        padding_BS[b, :len(row_ids)] = False
    last_B = torch.tensor([len(i) - 1 for i in ids])
    images = [processor(open_image(src)) for _, _, src, _ in rows if src is not None]
    images_NCHW = torch.stack(images) if images else None  # row-major, one per <image>, as the model scatters them
    return tokens_BS, last_B, images_NCHW, padding_BS


def choose(loaded, tokenizer, rows: list, *, batch_size: int = 8, progress: bool = False) -> dict:
    """rows: (key, prompt ids ending where the choice is read, image source or None, candidate ids per class).
    Returns {key: [score per class]} on every rank, a class's score its best candidate's logit."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from megamod.data.images import ImageProcessor

    vision = loaded.cfg.vision
    processor = ImageProcessor(size=vision.image_size, mode="pad", mean=vision.image_mean, std=vision.image_std)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_replica = -(-len(rows) // dp)
    mine = list(range(dp_rank, len(rows), dp))
    mine += [mine[-1] if mine else 0] * (per_replica - len(mine))  # repeats only rewrite their own row's scores
    device = next(loaded.model.parameters()).device
    found = {}
    rank0 = torch.distributed.get_rank() == 0
    for start in tqdm(range(0, per_replica, batch_size), desc="eval", disable=not (progress and rank0)):
        positions = mine[start:start + batch_size]
        batch_rows = [rows[i] for i in positions]
        tokens_BS, last_B, images_NCHW, padding_BS = _batch(loaded, tokenizer.pad_id, batch_rows, processor)
        if images_NCHW is not None:
            images_NCHW = images_NCHW.to(device)
        logits_BV = last_logits(loaded.model, tokens_BS.to(device), last_B, tokenizer.vocab_size,
                                images_NCHW, padding_BS.to(device))
        if logits_BV is None:
            continue
        for b, (key, _, _, ids) in enumerate(batch_rows):
            found[key] = [logits_BV[b, cand].max().item() for cand in ids]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, found if ps.is_pipeline_last_stage() and
                                        ps.get_tensor_model_parallel_rank() == 0 else None)
    scores = {}
    for part in gathered:
        scores.update(part or {})
    return scores
