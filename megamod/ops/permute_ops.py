"""megamod._C's permute kernels as torch.library custom ops (torch.ops.megamod.*), each with a fake (meta) kernel and
the forward ops with autograd, so that torch.compile keeps them as single graph nodes and meta-device builds get
shaped outputs without running a kernel. megamod.ops.permute / unpermute call them when compiling or on meta tensors
(eager calls go to the kernels directly); their docstrings give the shapes.

Custom ops cannot return None: where probs are absent, the probs result is an empty [0] tensor in the dtype of the
rows. The number of permuted rows P is data dependent: build_row_id_map returns it; its fake kernel returns
num_out_tokens when given and otherwise a new unbacked size (ctx.new_dynamic_size(), which torch.compile traces
through, fullgraph), which meta tensors cannot have: on meta, pass num_out_tokens.
A call through them pays the Python custom-op dispatch (about 10 us a call, 20-30 us with autograd, on this repo's
CPU), which is why eager calls do not go through them.
"""
import functools
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor


@functools.cache
def _C():
    return importlib.import_module("megamod._C")


def _no_probs(rows: Tensor) -> Tensor:
    return rows.new_empty(0)


def _check_rows(x: Tensor, name: str) -> None:
    torch._check(x.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(x.shape)}")
    torch._check(x.is_floating_point(), lambda: f"{name} must be floating point, got {x.dtype}")


@torch.library.custom_op("megamod::build_row_id_map", mutates_args=())
def build_row_id_map(routing_map_TE: Tensor, num_out_tokens: Optional[int]) -> Tuple[Tensor, int]:
    """(row_id_map_TE int32 [T, E], P) from a bool [T, E] routing map."""
    row_id_map_TE, num_rows = _C().build_row_id_map(routing_map_TE, num_out_tokens)
    return row_id_map_TE, num_rows


@build_row_id_map.register_fake
def _(routing_map_TE, num_out_tokens):
    torch._check(routing_map_TE.dtype == torch.bool and routing_map_TE.dim() == 2,
                 lambda: f"routing_map must be bool [tokens, experts], got {routing_map_TE.dtype} "
                         f"{tuple(routing_map_TE.shape)}")
    num_rows = num_out_tokens
    if num_rows is None:
        if routing_map_TE.device.type == "meta":
            raise ValueError("permute on meta tensors needs num_out_tokens: the routed-row count is data dependent")
        num_rows = torch.library.get_ctx().new_dynamic_size()
    return torch.empty_like(routing_map_TE, dtype=torch.int32), num_rows


@torch.library.custom_op("megamod::permute_fwd", mutates_args=())
def permute_fwd(tokens_TH: Tensor, row_id_map_TE: Tensor, probs_TE: Optional[Tensor],
                num_rows: int) -> Tuple[Tensor, Tensor]:
    """(permuted_PH, permuted_probs_P or an empty [0] tensor without probs)."""
    permuted_PH, permuted_probs_P = _C().permute_fwd(tokens_TH, row_id_map_TE, probs_TE, num_rows)
    return permuted_PH, _no_probs(tokens_TH) if permuted_probs_P is None else permuted_probs_P


@permute_fwd.register_fake
def _(tokens_TH, row_id_map_TE, probs_TE, num_rows):
    _check_rows(tokens_TH, "tokens")
    T = row_id_map_TE.shape[0]
    torch._check(tokens_TH.shape[0] == T, lambda: f"tokens must have {T} rows, got shape {tuple(tokens_TH.shape)}")
    permuted_probs_P = _no_probs(tokens_TH) if probs_TE is None else probs_TE.new_empty(num_rows)
    return tokens_TH.new_empty(num_rows, tokens_TH.shape[1]), permuted_probs_P


@torch.library.custom_op("megamod::permute_bwd", mutates_args=())
def permute_bwd(grad_permuted_PH: Tensor, grad_permuted_probs_P: Optional[Tensor],
                row_id_map_TE: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_tokens_TH, grad_probs_TE or an empty [0] tensor without probs)."""
    grad_tokens_TH, grad_probs_TE = _C().permute_bwd(grad_permuted_PH, grad_permuted_probs_P, row_id_map_TE)
    return grad_tokens_TH, _no_probs(grad_permuted_PH) if grad_probs_TE is None else grad_probs_TE


@permute_bwd.register_fake
def _(grad_permuted_PH, grad_permuted_probs_P, row_id_map_TE):
    _check_rows(grad_permuted_PH, "grad_permuted")
    T, E = row_id_map_TE.shape
    grad_probs_TE = (_no_probs(grad_permuted_PH) if grad_permuted_probs_P is None
                     else grad_permuted_probs_P.new_empty(T, E))
    return grad_permuted_PH.new_empty(T, grad_permuted_PH.shape[1]), grad_probs_TE


@torch.library.custom_op("megamod::unpermute_fwd", mutates_args=())
def unpermute_fwd(permuted_PH: Tensor, row_id_map_TE: Tensor, probs_TE: Optional[Tensor]) -> Tensor:
    """out_TH, in the dtype of permuted_PH."""
    return _C().unpermute_fwd(permuted_PH, row_id_map_TE, probs_TE)


@unpermute_fwd.register_fake
def _(permuted_PH, row_id_map_TE, probs_TE):
    _check_rows(permuted_PH, "permuted_tokens")
    return permuted_PH.new_empty(row_id_map_TE.shape[0], permuted_PH.shape[1])


@torch.library.custom_op("megamod::unpermute_bwd", mutates_args=())
def unpermute_bwd(grad_out_TH: Tensor, permuted_PH: Tensor, row_id_map_TE: Tensor,
                  probs_TE: Tensor) -> Tuple[Tensor, Tensor]:
    """(grad_permuted_PH, grad_probs_TE) of unpermute with probs (without them it is permute_fwd of grad_out)."""
    return _C().unpermute_bwd(grad_out_TH, permuted_PH, row_id_map_TE, probs_TE)


@unpermute_bwd.register_fake
def _(grad_out_TH, permuted_PH, row_id_map_TE, probs_TE):
    _check_rows(grad_out_TH, "grad_out")
    return torch.empty_like(permuted_PH), torch.empty_like(probs_TE)


def _permute_setup_context(ctx, inputs, output):
    _, row_id_map_TE, probs_TE, _ = inputs
    ctx.save_for_backward(row_id_map_TE)
    ctx.has_probs = probs_TE is not None


def _permute_backward(ctx, grad_permuted_PH, grad_permuted_probs_P):
    (row_id_map_TE,) = ctx.saved_tensors
    grad_P = grad_permuted_probs_P.contiguous() if ctx.has_probs else None
    grad_tokens_TH, grad_probs_TE = permute_bwd(grad_permuted_PH.contiguous(), grad_P, row_id_map_TE)
    return grad_tokens_TH, None, grad_probs_TE if ctx.has_probs else None, None


def _unpermute_setup_context(ctx, inputs, output):
    permuted_PH, row_id_map_TE, probs_TE = inputs
    # The permuted rows are kept for backward only when probs need their dot products, as in megatron's path.
    ctx.save_for_backward(row_id_map_TE, *(() if probs_TE is None else (permuted_PH, probs_TE)))
    ctx.num_rows = permuted_PH.shape[0]


def _unpermute_backward(ctx, grad_out_TH):
    row_id_map_TE, *with_probs = ctx.saved_tensors
    grad_out_TH = grad_out_TH.contiguous()
    if not with_probs:
        grad_permuted_PH, _ = permute_fwd(grad_out_TH, row_id_map_TE, None, ctx.num_rows)
        return grad_permuted_PH, None, None
    permuted_PH, probs_TE = with_probs
    grad_permuted_PH, grad_probs_TE = unpermute_bwd(grad_out_TH, permuted_PH, row_id_map_TE, probs_TE)
    return grad_permuted_PH, None, grad_probs_TE


permute_fwd.register_autograd(_permute_backward, setup_context=_permute_setup_context)
unpermute_fwd.register_autograd(_unpermute_backward, setup_context=_unpermute_setup_context)
