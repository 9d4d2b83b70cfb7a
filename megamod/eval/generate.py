"""Greedy generation with a KV cache, on megatron-core's static inference path, under TP/PP/EP.

Prompts of one batch have the same length (rows are grouped by expanded prompt length), so nothing is padded: the
first forward (prefill) writes every layer's keys and values into megatron's StaticInferenceContext and each later
forward feeds one token per row. Logits are read at the last position only (the context materialises just those).
The image placeholder id is never generated: a decode step has no image to put there.

Every data-parallel replica runs the same number of forwards, and every forward of a batch runs until all rows of
all replicas have stopped, because expert-parallel all-to-alls span replicas. The next tokens, known on the last
pipeline stage, reach the other stages by a broadcast in the pipeline group.

Sequence parallelism (MoE at TP > 1) splits positions over TP ranks, which a one-token decode step cannot do:
generation asks for such models to be loaded at TP=1 (any EP).
"""
from __future__ import annotations

import torch


def _batches(rows: list, batch_size: int, dp: int, dp_rank: int) -> list[list[int]]:
    """This replica's batches (row indices), rows of one batch sharing a prompt length; every replica gets the
    same count (the shortest lists repeat their last batch, whose outputs are then written twice, identically)."""
    by_length: dict[int, list[int]] = {}
    for i, (_, ids, _) in enumerate(rows):
        by_length.setdefault(len(ids), []).append(i)
    batches = [group[s:s + batch_size] for _, group in sorted(by_length.items())
               for s in range(0, len(group), batch_size)]
    mine = batches[dp_rank::dp]
    per_replica = -(-len(batches) // dp)
    return mine + [mine[-1] if mine else batches[0]] * (per_replica - len(mine))


def _step(model, ctx, tokens_BS, images_NCHW, vocab_size: int, forbidden: int) -> torch.Tensor | None:
    """One forward through the pipeline; the greedy next token [B] on the last stage, None elsewhere."""
    from megamod.inference import forward_only

    B, S = tokens_BS.shape
    start = ctx.sequence_len_offset
    position_ids_BS = torch.arange(start, start + S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
    logits_BV = forward_only(model, lambda m: m(tokens_BS, position_ids_BS, images_NCHW, inference_context=ctx),
                             lambda logits_BSV: logits_BSV[:, -1, :vocab_size].float(), S, B)
    ctx.sequence_len_offset += S
    if logits_BV is None:
        return None
    logits_BV[:, forbidden] = float("-inf")
    return logits_BV.argmax(dim=-1)


def greedy_generate(loaded, rows: list, *, max_new_tokens: int, stop_ids: list[int], batch_size: int = 8,
                    progress: bool = False, vocab_size: int | None = None) -> dict:
    """rows: (key, prompt ids with one <image> id per image, the item whose `.image` goes with it, or None). Returns {key: generated ids
    (the stop token excluded)} on every rank. Ids are chosen below `vocab_size`, the tokenizer's size (default: the
    model's rows), so that a padding row is never generated."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts import StaticInferenceContext
    from tqdm import tqdm

    from megamod.data.images import ImageProcessor
    from megamod.eval.formats import open_image
    from megamod.models.llava import expand_image_tokens

    model = loaded.model
    if model.config.sequence_parallel:
        raise ValueError("greedy generation cannot split one decode token over sequence-parallel TP ranks (this MoE "
                         "model runs sequence parallel at TP > 1): evaluate it with tp=1 (ep may stay)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    cfg = loaded.cfg
    processor = ImageProcessor(size=cfg.vision.image_size, mode="pad", mean=cfg.vision.image_mean,
                               std=cfg.vision.image_std)
    expanded = [(key, expand_image_tokens(ids, loaded.image_token_id, cfg.vision.num_image_tokens), src)
                for key, ids, src in rows]
    device = next(model.parameters()).device
    stop_K = torch.tensor(sorted(set(stop_ids)), device=device)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    last_rank, pp_group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
    vocab_size = vocab_size or loaded.language.vocab_size
    found = {}
    batches = _batches(expanded, batch_size, dp, dp_rank)
    show = progress and torch.distributed.get_rank() == 0
    for batch in tqdm(batches, desc="generate", disable=not show):
        tokens_BS = torch.tensor([expanded[i][1] for i in batch], device=device)
        images = [processor(open_image(expanded[i][2])) for i in batch if expanded[i][2] is not None]
        images_NCHW = torch.stack(images).to(device) if images else None
        B, P = tokens_BS.shape
        ctx = StaticInferenceContext(B, P + max_new_tokens)
        out_BN = torch.zeros((B, max_new_tokens), dtype=torch.int64, device=device)
        done_B = torch.zeros(B, dtype=torch.bool, device=device)
        lengths_B = torch.full((B,), max_new_tokens, dtype=torch.int64, device=device)
        inputs_BS, images_step = tokens_BS, images_NCHW
        for n in range(max_new_tokens):
            next_B = _step(model, ctx, inputs_BS, images_step, vocab_size, loaded.image_token_id)
            if next_B is None:
                next_B = torch.empty(B, dtype=torch.int64, device=device)
            torch.distributed.broadcast(next_B, src=last_rank, group=pp_group)
            stopped_B = ~done_B & torch.isin(next_B, stop_K)
            lengths_B[stopped_B] = n
            done_B |= stopped_B
            out_BN[:, n] = next_B
            pending = (~done_B).any().to(torch.int64)
            torch.distributed.all_reduce(pending)  # the whole world steps together (EP all-to-alls)
            if not pending.item():
                break
            ctx.enable_decode_mode()
            inputs_BS, images_step = next_B.unsqueeze(1), None
        for b, i in enumerate(batch):
            found[expanded[i][0]] = out_BN[b, :lengths_B[b]].tolist()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, found)
    result = {}
    for part in gathered:
        result.update(part)
    return result
