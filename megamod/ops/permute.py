"""MoE token permute / unpermute on the megamod._C kernels, a drop-in for megatron-core's dropless
`moe_utils.permute` / `moe_utils.unpermute`, which stay the reference (and the fallback when the extension is
missing).

Shapes: T tokens, H hidden, E experts, P permuted rows (routed (token, expert) pairs). Where megatron returns
`sorted_indices` [P] int64, permute returns its own index map, `row_id_map_TE` (int32 [T, E], the permuted row of each
(token, expert) pair or -1), which unpermute takes back: every kernel then walks tokens and owns its output rows.
Under torch.compile and on meta tensors the kernels run as torch.library custom ops (permute_ops.py); eager calls
reach them directly.
"""
import functools
import importlib
import logging
from types import SimpleNamespace
from typing import Optional, Tuple, Union

import torch
from megatron.core.transformer.moe import moe_utils
from torch.autograd.function import once_differentiable

from megamod.ops import permute_ops

logger = logging.getLogger(__name__)


@functools.cache
def _extension():
    try:
        return importlib.import_module("megamod._C")
    except ImportError as error:
        logger.warning("megamod._C is unavailable (%s): permute/unpermute use megatron-core's torch path", error)
        return None


@torch.compiler.assume_constant_result  # torch.compile takes it as a constant rather than tracing the import
def extension_available() -> bool:
    return _extension() is not None


def _through_custom_ops(x: torch.Tensor) -> bool:
    """torch.compile and meta tensors take the custom ops (permute_ops.py); eager calls take the kernels directly
    through the autograd Functions below: the same kernels with the same arguments, without the custom-op dispatch
    (about 10-20 us a call in Python, several calls per MoE layer and step)."""
    return torch.compiler.is_compiling() or x.is_meta


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens_TH, probs_TE, row_id_map_TE, num_rows):
        permuted_PH, permuted_probs_P = _extension().permute_fwd(tokens_TH, row_id_map_TE, probs_TE, num_rows)
        ctx.save_for_backward(row_id_map_TE)
        ctx.has_probs = probs_TE is not None
        return permuted_PH, permuted_probs_P

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_permuted_PH, grad_permuted_probs_P):
        (row_id_map_TE,) = ctx.saved_tensors
        grad_P = grad_permuted_probs_P.contiguous() if ctx.has_probs else None
        grad_tokens_TH, grad_probs_TE = _extension().permute_bwd(grad_permuted_PH.contiguous(), grad_P, row_id_map_TE)
        return grad_tokens_TH, grad_probs_TE, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted_PH, probs_TE, row_id_map_TE):
        # The permuted rows are kept for backward only when probs need their dot products, as in megatron's path.
        ctx.save_for_backward(row_id_map_TE, *(() if probs_TE is None else (permuted_PH, probs_TE)))
        ctx.num_rows = permuted_PH.shape[0]
        return _extension().unpermute_fwd(permuted_PH, row_id_map_TE, probs_TE)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out_TH):
        row_id_map_TE, *with_probs = ctx.saved_tensors
        grad_out_TH = grad_out_TH.contiguous()
        if not with_probs:
            grad_permuted_PH, _ = _extension().permute_fwd(grad_out_TH, row_id_map_TE, None, ctx.num_rows)
            return grad_permuted_PH, None, None
        permuted_PH, probs_TE = with_probs
        grad_permuted_PH, grad_probs_TE = _extension().unpermute_bwd(grad_out_TH, permuted_PH, row_id_map_TE, probs_TE)
        return grad_permuted_PH, grad_probs_TE, None


def permute(
    tokens: torch.Tensor,
    routing_map: torch.Tensor,
    probs: Optional[torch.Tensor] = None,
    num_out_tokens: Optional[Union[int, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Groups token rows by expert, as megatron-core's `moe_utils.permute` (dropless).

    Args:
        tokens: [T, H] rows to permute.
        routing_map: bool [T, E], True where a token goes to an expert.
        probs: [T, E] or None; the routed entries are permuted alongside the rows.
        num_out_tokens: None or routing_map.sum() (int or 0-d tensor). On CPU it is checked against the count; on
            CUDA it is trusted, so that an int sizes the output without a device-to-host sync.

    Returns:
        permuted_PH ([P, H], rows of expert 0 in token order, then expert 1, ...), permuted_probs_P ([P] or None),
        and the index map to pass to `unpermute`.
    """
    if not extension_available():
        return megatron_permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens)
    if num_out_tokens is not None:
        num_out_tokens = int(num_out_tokens)
    probs_TE = None if probs is None else probs.contiguous()
    if not _through_custom_ops(tokens):
        row_id_map_TE, num_rows = _extension().build_row_id_map(routing_map.contiguous(), num_out_tokens)
        permuted_PH, permuted_probs_P = _Permute.apply(tokens.contiguous(), probs_TE, row_id_map_TE, num_rows)
        return permuted_PH, permuted_probs_P, row_id_map_TE
    row_id_map_TE, num_rows = permute_ops.build_row_id_map(routing_map.contiguous(), num_out_tokens)
    permuted_PH, permuted_probs_P = permute_ops.permute_fwd(tokens.contiguous(), row_id_map_TE, probs_TE, num_rows)
    return permuted_PH, None if probs is None else permuted_probs_P, row_id_map_TE


def megatron_permute(tokens, routing_map, probs=None, num_out_tokens=None):
    """megatron-core's torch `moe_utils.permute` (the oracle and the fallback) with `permute`'s signature and three
    results, on 0.16 and 0.19 alike: 0.19 requires num_out_tokens and returns two more results (pad offsets and padded
    counts, for its fused kernels; None and the input counts on the torch path)."""
    if num_out_tokens is None:
        num_out_tokens = int(routing_map.sum())
    return tuple(moe_utils.permute(tokens, routing_map, probs=probs, num_out_tokens=int(num_out_tokens))[:3])


# megatron-core's torch path with this module's interface: the oracle of the tests and the benchmark's reference.
MEGATRON_TORCH_PATH = SimpleNamespace(permute=megatron_permute, unpermute=moe_utils.unpermute)


def unpermute(
    permuted_tokens: torch.Tensor,
    index_map: torch.Tensor,
    restore_shape: Tuple[int, int],
    probs: Optional[torch.Tensor] = None,
    routing_map: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sums permuted rows back into [T, H] token order, as megatron-core's `moe_utils.unpermute` (dropless).

    Args:
        permuted_tokens: [P, H], in the order `permute` produced.
        index_map: the third result of this module's `permute` (not megatron's sorted_indices).
        restore_shape: (T, H) of the result.
        probs: [T, E] or None, in the dtype of permuted_tokens or float32; each row is scaled by its
            (token, expert) prob before the sum.
        routing_map: bool [T, E]; required with probs, as megatron requires it (the index map already encodes it).

    Returns:
        [T, H] in the dtype of permuted_tokens; the products with probs are computed in the promoted dtype.
    """
    if not extension_available():
        return moe_utils.unpermute(permuted_tokens, index_map, restore_shape, probs=probs, routing_map=routing_map)
    if probs is not None and routing_map is None:
        raise ValueError("unpermute: routing_map must be given with probs")
    if probs is not None and routing_map.shape != probs.shape:
        raise ValueError(f"unpermute: routing_map {tuple(routing_map.shape)} and probs {tuple(probs.shape)} differ")
    if tuple(restore_shape) != (index_map.shape[0], permuted_tokens.shape[-1]):
        raise ValueError(
            f"unpermute: restore_shape {tuple(restore_shape)} must be (tokens, hidden) = "
            f"({index_map.shape[0]}, {permuted_tokens.shape[-1]})"
        )
    probs_TE = None if probs is None else probs.contiguous()
    if not _through_custom_ops(permuted_tokens):
        return _Unpermute.apply(permuted_tokens.contiguous(), probs_TE, index_map)
    return permute_ops.unpermute_fwd(permuted_tokens.contiguous(), index_map, probs_TE)
