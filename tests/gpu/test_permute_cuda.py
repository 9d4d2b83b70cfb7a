"""The CUDA kernels of megamod._C against its CPU kernels (and megatron-core's path), forward and backward."""
import importlib

import pytest
import torch

from megamod import ops
from megamod.ops.permute import MEGATRON_TORCH_PATH as MEGATRON
from tests.helpers import PermuteCalls

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

T, E, K = 1000, 8, 2


def run(impl, tokens_TH, routing_map_TE, probs_TE, grad_TH):
    """permute -> unpermute with probs -> backward; returns every output and gradient."""
    x_TH = tokens_TH.detach().clone().requires_grad_()
    p_TE = probs_TE.detach().clone().requires_grad_()
    permuted_PH, permuted_probs_P, index_map = impl.permute(x_TH, routing_map_TE, probs=p_TE,
                                                            num_out_tokens=int(routing_map_TE.sum()))
    scaled_PH = permuted_PH * permuted_probs_P[:, None].to(permuted_PH.dtype)
    out_TH = impl.unpermute(scaled_PH, index_map, x_TH.shape, probs=p_TE, routing_map=routing_map_TE)
    out_TH.backward(grad_TH)
    return dict(permuted=permuted_PH, permuted_probs=permuted_probs_P, out=out_TH, grad_tokens=x_TH.grad,
                grad_probs=p_TE.grad)


def run_path(impl, *args):
    """`run`, proving which path ran: megamod._C's kernels for `ops` (never megatron's permute), megatron's torch
    permute for the reference (never a kernel), so that neither comparison can be a path compared with itself."""
    with PermuteCalls() as calls:
        result = run(impl, *args)
    if impl is ops:
        assert calls.kernels() >= 4 and calls.megatron() == 0, dict(calls.counts)
    else:
        assert calls.kernels() == 0 and calls.megatron() == 2, dict(calls.counts)
    return result


def inputs(H, dtype, probs_dtype, device):
    gen = torch.Generator().manual_seed(0)
    top_TK = torch.rand(T, E, generator=gen).topk(K, dim=-1).indices
    routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top_TK, True)
    probs_TE = (torch.rand(T, E, generator=gen) * routing_map_TE).to(probs_dtype)
    tokens_TH = torch.randn(T, H, generator=gen).to(dtype)
    grad_TH = torch.randn(T, H, generator=gen).to(dtype)
    return [t.to(device) for t in (tokens_TH, routing_map_TE, probs_TE, grad_TH)]


def dot_tolerance(expected, rows_dtype):
    """Prob gradients are dot products over H, summed in another order on each side. With 16-bit rows, part of the
    gradient is a 16-bit sum (the test scales rows by probs cast to the rows' dtype, and autograd sums that product's
    gradient in that dtype), whose last bit may differ: a 16-bit tolerance even where the result is stored in fp32.
    With 32- or 64-bit rows, the sums differ by about sqrt(H) ulps (~1e-4 at H=1024 in fp32)."""
    if rows_dtype.itemsize == 2:
        eps = torch.finfo(rows_dtype).eps
        return dict(rtol=2 * eps, atol=2 * eps * expected.abs().max().item())
    return dict(rtol=1e-5, atol=1e-3)


def test_extension_has_cuda():
    assert ops.extension_available() and importlib.import_module("megamod._C").with_cuda


# Rows go in 16-byte packs when H is a multiple of 16 bytes / element size: H=1024 always; H=100 in fp32 and fp64
# (400 and 800 bytes) but not in 16-bit dtypes (200 bytes), which take the scalar path; H=99 takes it in every dtype.
@pytest.mark.parametrize("H", [1024, 100, 99])
@pytest.mark.parametrize(
    "dtype, probs_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
     (torch.float16, torch.float16), (torch.float64, torch.float64)],
)
def test_cuda_equals_cpu_kernels(H, dtype, probs_dtype):
    cpu = run_path(ops, *inputs(H, dtype, probs_dtype, "cpu"))
    cuda = run_path(ops, *inputs(H, dtype, probs_dtype, "cuda"))
    for name, value in cpu.items():
        if name == "grad_probs":
            torch.testing.assert_close(cuda[name].cpu(), value, **dot_tolerance(value, dtype))
        else:
            assert torch.equal(cuda[name].cpu(), value), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_megatron(dtype):
    args = inputs(1024, dtype, dtype, "cuda")
    ours, ref = run_path(ops, *args), run_path(MEGATRON, *args)
    for name in ours:
        tol = dot_tolerance(ref[name], dtype) if name == "grad_probs" else dict(rtol=0, atol=0)
        torch.testing.assert_close(ours[name], ref[name], **tol)


def test_cuda_no_tokens():
    tokens_TH, routing_map_TE, probs_TE, grad_TH = (t[:0] for t in inputs(64, torch.float32, torch.float32, "cuda"))
    result = run_path(ops, tokens_TH, routing_map_TE, probs_TE, grad_TH)
    assert result["out"].shape == (0, 64) and result["grad_probs"].shape == (0, E)
