"""One optimizer step over micro-batches: megatron DDP + optimizer + the pipeline schedule.

The trainer builds on this; tests use it directly to compare parallel layouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class StepResult:
    losses: list[dict]  # one dict per micro-batch, on the last pipeline stage (empty elsewhere)
    grad_norm: float | None
    update_successful: bool


def wrap_ddp(model, use_distributed_optimizer: bool = False):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megamod import performance

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=performance.enabled("overlap_grad_reduce", model.config.params_dtype),
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(ddp_models: list, lr: float, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    use_distributed_optimizer: bool = False, adam_betas=(0.9, 0.999), min_lr: float = 0.0,
                    initial_loss_scale: float = 2.0 ** 32):
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = ddp_models[0].config
    opt_config = OptimizerConfig(
        optimizer="adam", lr=lr, min_lr=min_lr, weight_decay=weight_decay, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1],
        clip_grad=clip_grad, bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer, initial_loss_scale=initial_loss_scale,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_models)
    # The schedule reads these from the model config: gradient sync across DP / tied embeddings, loss scaling
    # (also of the MoE aux loss), and no_sync across micro-batches.
    # Always the student's DDP models, also when the schedule runs a DistillPair around them.
    config.finalize_model_grads_func = lambda _scheduled, *args, **kwargs: finalize_model_grads(
        ddp_models, *args, **kwargs)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = [m.no_sync for m in ddp_models] if len(ddp_models) > 1 else ddp_models[0].no_sync
    return optimizer


def forward_backward(ddp_models: list, forward_step: Callable, micro_batches: list, seq_length: int,
                     micro_batch_size: int, forward_only: bool = False, schedule_model=None,
                     adjust_tensor_shapes_fn: Callable | None = None) -> list[dict]:
    """`schedule_model`: what the pipeline schedule runs instead of the DDP models (a DistillPair carrying a
    teacher); `adjust_tensor_shapes_fn`: its activation shapes between pipeline stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for m in ddp_models:
            m.zero_grad_buffer()
    model = schedule_model if schedule_model is not None else (ddp_models if len(ddp_models) > 1 else ddp_models[0])
    extra = {"adjust_tensor_shapes_fn": adjust_tensor_shapes_fn} if adjust_tensor_shapes_fn is not None else {}
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=model,
        num_microbatches=len(micro_batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only, **extra,
    )


def train_step(ddp_models: list, optimizer, forward_step: Callable, micro_batches: list, seq_length: int,
               micro_batch_size: int, before_optimizer_step: Callable[[], None] | None = None,
               schedule_model=None, adjust_tensor_shapes_fn: Callable | None = None) -> StepResult:
    """Gradients are complete (reduced across DP, tied embeddings synced) when `before_optimizer_step` runs;
    the optimizer then clips them in place."""
    optimizer.zero_grad()
    losses = forward_backward(ddp_models, forward_step, micro_batches, seq_length, micro_batch_size,
                              schedule_model=schedule_model, adjust_tensor_shapes_fn=adjust_tensor_shapes_fn)
    if before_optimizer_step is not None:
        before_optimizer_step()
    update_successful, grad_norm, _ = optimizer.step()
    return StepResult(losses=losses, grad_norm=grad_norm, update_successful=update_successful)


def lm_forward_step(vocab_size: int):
    """Forward step for plain language-model training on batches of tokens/labels/loss_mask [B, S]."""
    from megamod.losses.ce import cross_entropy_BS, masked_mean

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens_BS = batch["tokens"]
        B, S = tokens_BS.shape
        position_ids_BS = torch.arange(S).unsqueeze(0).expand(B, S)
        logits_BSv = model(tokens_BS, position_ids_BS, None)

        def loss_func(logits_BSv):
            loss = masked_mean(cross_entropy_BS(logits_BSv, batch["labels"], vocab_size), batch["loss_mask"])
            return loss, {"lm loss": loss.detach().clone()}

        return logits_BSv, loss_func

    return forward_step
