"""One forward pass through a (possibly tensor- and pipeline-parallel) model, returning full-vocabulary logits."""
from __future__ import annotations

import torch


def forward_only(model, run, keep, seq_length: int, micro_batch_size: int):
    """One micro-batch through megatron's pipeline schedule, in eval mode and without gradients.

    `run(m)` returns the model's output for the batch; `keep(logits_BSv)` picks what the last stage holds on to
    (before any gather, so callers choose what size they keep; a tensor or a tuple of them). Returns that on the
    last stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    kept: list[torch.Tensor] = []

    def loss_func(logits_BSv):
        out = keep(logits_BSv)
        kept.append(out.detach() if isinstance(out, torch.Tensor) else tuple(t.detach() for t in out))
        return logits_BSv.new_zeros(()), {}

    def forward_step(data_iterator, m):
        return run(m), loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=seq_length, micro_batch_size=micro_batch_size, forward_only=True,
        )
    model.train(was_training)
    return kept[0] if ps.is_pipeline_last_stage() else None


def forward_logits(model, input_ids_BS: torch.Tensor, vocab_size: int,
                   images_NCHW: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 logits [B, S, vocab_size] on the last pipeline stage (every TP rank), None on other stages.

    `images_NCHW` is for LLaVA models, whose input ids hold the expanded image positions.

    The vocabulary shards are gathered here because this is a debugging/comparison tool; losses never do this.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    B, S = input_ids_BS.shape
    tp = ps.get_tensor_model_parallel_world_size()
    if model.config.sequence_parallel and S % tp:
        # Sequence parallelism splits S over TP ranks: pad at the end (causal attention and dropless routing
        # leave the real positions unchanged) and drop the padding's logits below.
        pad = tp - S % tp
        input_ids_BS = torch.cat([input_ids_BS, input_ids_BS.new_zeros((B, pad))], dim=1)
    S_padded = input_ids_BS.shape[1]
    position_ids_BS = torch.arange(S_padded, device=input_ids_BS.device).unsqueeze(0).expand(B, S_padded)
    logits_BSv = forward_only(model, lambda m: m(input_ids_BS, position_ids_BS, images_NCHW),
                              lambda logits_BSv: logits_BSv, S_padded, B)
    if logits_BSv is None:
        return None
    logits_BSV = tensor_parallel.gather_from_tensor_model_parallel_region(logits_BSv)
    return logits_BSV[:, :S, :vocab_size].float()
