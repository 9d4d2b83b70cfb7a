"""One forward pass through a (possibly tensor- and pipeline-parallel) model, returning full-vocabulary logits."""
from __future__ import annotations

import torch


def forward_logits(model, input_ids_BS: torch.Tensor, vocab_size: int,
                   images_NCHW: torch.Tensor | None = None) -> torch.Tensor | None:
    """fp32 logits [B, S, vocab_size] on the last pipeline stage (every TP rank), None on other stages.

    `images_NCHW` is for LLaVA models, whose input ids hold the expanded image positions.

    The vocabulary shards are gathered here because this is a debugging/comparison tool; losses never do this.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = input_ids_BS.shape
    tp = ps.get_tensor_model_parallel_world_size()
    if model.config.sequence_parallel and S % tp:
        # Sequence parallelism splits S over TP ranks: pad at the end (causal attention and dropless routing
        # leave the real positions unchanged) and drop the padding's logits below.
        pad = tp - S % tp
        input_ids_BS = torch.cat([input_ids_BS, input_ids_BS.new_zeros((B, pad))], dim=1)
    S_padded = input_ids_BS.shape[1]
    position_ids_BS = torch.arange(S_padded, device=input_ids_BS.device).unsqueeze(0).expand(B, S_padded)
    kept: list[torch.Tensor] = []

    def loss_func(logits_BSV):
        kept.append(logits_BSV.detach())
        return logits_BSV.new_zeros(()), {}

    def forward_step(data_iterator, m):
        if images_NCHW is not None:
            return m(input_ids_BS, position_ids_BS, images_NCHW), loss_func
        return m(input_ids_BS, position_ids_BS, None), loss_func

    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
            seq_length=S_padded, micro_batch_size=B, forward_only=True,
        )
    model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    logits_BSV = tensor_parallel.gather_from_tensor_model_parallel_region(kept[0])
    return logits_BSV[:, :S, :vocab_size].float()
