"""megamod.ops.permute / unpermute against megatron-core's moe_utils (the oracle), forward and backward.

ops falls back to the oracle itself when megamod._C is missing, so every comparison counts the calls to the kernels
and to megatron's torch path (tests.helpers.PermuteCalls): ops must have run the kernels, the oracle must not have;
test_the_comparison_catches_a_broken_kernel shows that a wrong kernel result fails the comparison."""
import importlib
import logging
import sys

import pytest
import torch

from megamod import ops
from tests.helpers import PermuteCalls

try:
    import megamod._C as EXTENSION  # kept for the spies while a test hides it from imports
except ImportError:
    EXTENSION = None

permute_module = importlib.import_module("megamod.ops.permute")  # `megamod.ops.permute` is also the function
MEGATRON = permute_module.MEGATRON_TORCH_PATH  # megatron-core's oracle, called as ops is on 0.16 and 0.19

H = 40

# (name, T, E, k): k experts per token; k=None routes each (token, expert) pair with probability 1/2, so some
# tokens go nowhere and the number of experts per token varies.
CASES = [
    ("random", 37, 6, 2),
    ("k1", 50, 4, 1),
    ("variable_k", 45, 5, None),
    ("empty_expert", 40, 5, 2),
    ("no_tokens", 0, 4, 2),
    ("one_expert", 20, 4, 1),
    ("one_token", 1, 8, 3),
    ("zero_probs", 30, 6, 2),
    ("many_experts", 33, 64, 8),
    ("many_tokens", 9000, 8, 2),  # several parallel tasks and row-map chunks
]

# (tokens dtype, probs dtype, tolerance): fp32 must be exact; bf16/fp16 within their rounding.
DTYPES = [
    pytest.param(torch.float32, torch.float32, dict(rtol=0, atol=0), id="fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, dict(rtol=2e-2, atol=1e-5), id="bf16"),
    pytest.param(torch.bfloat16, torch.float32, dict(rtol=2e-2, atol=1e-5), id="bf16-fp32probs"),
    pytest.param(torch.float16, torch.float16, dict(rtol=1e-3, atol=1e-5), id="fp16"),
]
# The prob gradient of unpermute is a dot product over H that torch.sum adds in another order: fp32 results differ by
# a few ulps of sum |g * x| (about 30 here), not of the (possibly cancelled) result, hence an absolute tolerance.
DOT_FP32 = dict(rtol=1e-5, atol=1e-5)


def make_routing(name, T, E, k, probs_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if k is None:
        routing_map_TE = torch.rand(T, E, generator=gen) < 0.5
    else:
        scores_TE = torch.rand(T, E, generator=gen)
        if name == "empty_expert":
            scores_TE[:, 3] = -1.0
        if name == "one_expert":
            scores_TE[:, 2] = 2.0
        top_TK = scores_TE.topk(k, dim=-1).indices
        routing_map_TE = torch.zeros(T, E, dtype=torch.bool).scatter_(1, top_TK, True)
    probs_TE = torch.rand(T, E, generator=gen) * routing_map_TE
    if name == "zero_probs":
        probs_TE[::2] = 0.0
    return routing_map_TE, probs_TE.to(probs_dtype)


def leaf(x):
    return x.detach().clone().requires_grad_()


def assert_match(ours, ref, tol):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    if tol["rtol"] == 0 and tol["atol"] == 0:
        assert torch.equal(ours, ref), (ours - ref).abs().max()
    else:
        torch.testing.assert_close(ours, ref, **tol)


def test_extension_is_built():
    assert ops.extension_available(), "megamod._C did not import: run `pip install --no-build-isolation -e .`"


def assert_paths(calls_ops, calls_ref, kernels):
    """ops ran these kernels (name: count) and nothing of megatron's; the oracle ran megatron's path only."""
    assert dict(calls_ops.counts) == kernels, dict(calls_ops.counts)
    assert calls_ref.kernels() == 0 and calls_ref.megatron() > 0, dict(calls_ref.counts)


def permute_runs(name, T, E, k, dtype, probs_dtype):
    """(ops' results, the oracle's results): permuted rows and probs, and the gradients of tokens and probs."""
    routing_map_TE, probs_TE = make_routing(name, T, E, k, probs_dtype)
    tokens_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    runs, calls = [], []
    for impl in (ops, MEGATRON):
        with PermuteCalls() as counted:
            x_TH, p_TE = leaf(tokens_TH), leaf(probs_TE)
            permuted_PH, permuted_probs_P, _ = impl.permute(x_TH, routing_map_TE, probs=p_TE,
                                                            num_out_tokens=int(routing_map_TE.sum()))
            gen = torch.Generator().manual_seed(2)
            grad_PH = torch.randn(permuted_PH.shape, generator=gen).to(dtype)
            grad_P = torch.randn(permuted_probs_P.shape, generator=gen).to(probs_dtype)
            torch.autograd.backward([permuted_PH, permuted_probs_P], [grad_PH, grad_P])
        runs.append((permuted_PH, permuted_probs_P, x_TH.grad, p_TE.grad))
        calls.append(counted)
    assert_paths(*calls, {"build_row_id_map": 1, "permute_fwd": 1, "permute_bwd": 1})
    return runs


@pytest.mark.parametrize("dtype, probs_dtype, tol", DTYPES)
@pytest.mark.parametrize("name, T, E, k", CASES, ids=[c[0] for c in CASES])
def test_permute_matches_megatron(name, T, E, k, dtype, probs_dtype, tol):
    for ours, ref in zip(*permute_runs(name, T, E, k, dtype, probs_dtype)):
        assert_match(ours, ref, tol)


def unpermute_runs(name, T, E, k, dtype, probs_dtype, with_probs):
    """(ops' results, the oracle's results): the unpermuted rows and the gradients of the permuted rows and probs."""
    routing_map_TE, probs_TE = make_routing(name, T, E, k, probs_dtype)
    P = int(routing_map_TE.sum())
    permuted_PH = torch.randn(P, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    grad_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(dtype)
    runs, calls = [], []
    for impl in (ops, MEGATRON):
        _, _, index_map = impl.permute(torch.zeros(T, H, dtype=dtype), routing_map_TE)
        with PermuteCalls() as counted:
            y_PH, p_TE = leaf(permuted_PH), leaf(probs_TE)
            out_TH = impl.unpermute(y_PH, index_map, (T, H), probs=p_TE if with_probs else None,
                                    routing_map=routing_map_TE)
            out_TH.backward(grad_TH)
        runs.append((out_TH, y_PH.grad, p_TE.grad))
        calls.append(counted)
    # backward: with probs its own kernel, without them a permute of the output gradient
    assert_paths(*calls, {"unpermute_fwd": 1, "unpermute_bwd" if with_probs else "permute_fwd": 1})
    return runs


@pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "no_probs"])
@pytest.mark.parametrize("dtype, probs_dtype, tol", DTYPES)
@pytest.mark.parametrize("name, T, E, k", CASES, ids=[c[0] for c in CASES])
def test_unpermute_matches_megatron(name, T, E, k, dtype, probs_dtype, tol, with_probs):
    (out, grad_y, grad_p), (ref_out, ref_grad_y, ref_grad_p) = unpermute_runs(name, T, E, k, dtype, probs_dtype,
                                                                              with_probs)
    assert_match(out, ref_out, tol)
    assert_match(grad_y, ref_grad_y, tol)
    if with_probs:
        assert_match(grad_p, ref_grad_p, DOT_FP32 if tol["rtol"] == 0 else tol)
    else:
        assert grad_p is None and ref_grad_p is None


def _swap_first_rows(result):
    """Rows 0 and 1 of a kernel's first result exchanged."""
    first, *rest = result if isinstance(result, tuple) else (result,)
    first = first.clone()
    first[[0, 1]] = first[[1, 0]]
    return (first, *rest) if rest else first


def _nudge_second(result):
    """The second result (a probs gradient) with one entry off by 1e-3."""
    first, second = result
    second = second.clone()
    second.view(-1)[second.view(-1).nonzero()[0]] += 1e-3
    return first, second


BROKEN_KERNELS = {  # kernel: (what goes wrong in its results, the index of the compared result that shows it)
    "permute_fwd": (_swap_first_rows, 0),  # the permuted rows
    "permute_bwd": (_swap_first_rows, 2),  # the tokens' gradient
    "unpermute_fwd": (_swap_first_rows, 0),  # the unpermuted rows
    "unpermute_bwd": (_nudge_second, 2),  # the probs' gradient
}


@pytest.mark.parametrize("kernel", list(BROKEN_KERNELS))
def test_the_comparison_catches_a_broken_kernel(monkeypatch, kernel):
    """One kernel's results slightly wrong fail the comparisons above (fp32, the random case) where they should."""
    breakage, shows_in = BROKEN_KERNELS[kernel]
    real = getattr(EXTENSION, kernel)
    monkeypatch.setattr(EXTENSION, kernel, lambda *args: breakage(real(*args)))
    if kernel.startswith("permute"):
        runs = permute_runs("random", 37, 6, 2, torch.float32, torch.float32)
    else:
        runs = unpermute_runs("random", 37, 6, 2, torch.float32, torch.float32, with_probs=True)
    mismatched = []
    for i, (ours, ref) in enumerate(zip(*runs)):
        try:
            # as in test_unpermute_matches_megatron, the probs' gradient of unpermute within DOT_FP32
            assert_match(ours, ref, DOT_FP32 if i == 2 and kernel.startswith("unpermute") else dict(rtol=0, atol=0))
        except AssertionError:
            mismatched.append(i)
    assert mismatched == [shows_in]


def test_results_do_not_depend_on_threads():
    routing_map_TE, probs_TE = make_routing("random", 3000, 8, 2, torch.float32)
    tokens_TH = torch.randn(3000, 64)
    runs = []
    threads = torch.get_num_threads()
    for num_threads in (1, 2):
        torch.set_num_threads(num_threads)
        try:
            with PermuteCalls() as calls:
                x_TH, p_TE = leaf(tokens_TH), leaf(probs_TE)
                permuted_PH, permuted_probs_P, index_map = ops.permute(x_TH, routing_map_TE, probs=p_TE)
                out_TH = ops.unpermute(permuted_PH * permuted_probs_P[:, None], index_map, x_TH.shape, probs=p_TE,
                                       routing_map=routing_map_TE)
                out_TH.square().sum().backward()
            runs.append((out_TH, x_TH.grad, p_TE.grad))
        finally:
            torch.set_num_threads(threads)
        assert calls.kernels() == 5 and calls.megatron() == 0, dict(calls.counts)  # each kernel once
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_float64():
    routing_map_TE, probs_TE = make_routing("variable_k", 7, 4, None, torch.float64)
    tokens_TH = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    probs_TE.requires_grad_()
    _, _, index_map = ops.permute(tokens_TH, routing_map_TE)
    P = int(routing_map_TE.sum())
    permuted_PH = torch.randn(P, 5, dtype=torch.float64, requires_grad=True)

    def permute(x, p):
        return ops.permute(x, routing_map_TE, probs=p)[:2]

    def unpermute(y, p):
        return ops.unpermute(y, index_map, (7, 5), probs=p, routing_map=routing_map_TE)

    with PermuteCalls() as calls:
        assert torch.autograd.gradcheck(permute, (tokens_TH, probs_TE))
        assert torch.autograd.gradcheck(unpermute, (permuted_PH, probs_TE))
        assert torch.autograd.gradcheck(lambda y: ops.unpermute(y, index_map, (7, 5)), (permuted_PH,))
    # the kernels' backward, not megatron's, was checked against finite differences
    assert calls.megatron() == 0 and calls.counts["permute_bwd"] > 0 and calls.counts["unpermute_bwd"] > 0


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, "megamod._C", None)  # makes `import megamod._C` raise ImportError
    permute_module._extension.cache_clear()
    yield
    permute_module._extension.cache_clear()


def test_fallback_equals_oracle_and_logs_once(no_extension, caplog):
    routing_map_TE, probs_TE = make_routing("random", 37, 6, 2, torch.float32)
    tokens_TH = torch.randn(37, H)
    with caplog.at_level(logging.WARNING, logger=permute_module.__name__):
        assert not ops.extension_available()
        runs = []
        for impl in (ops, MEGATRON):
            with PermuteCalls(extension=EXTENSION) as calls:
                permuted_PH, permuted_probs_P, index_map = impl.permute(tokens_TH, routing_map_TE, probs=probs_TE)
                out_TH = impl.unpermute(permuted_PH, index_map, tokens_TH.shape, probs=probs_TE,
                                        routing_map=routing_map_TE)
            runs.append((permuted_PH, permuted_probs_P, index_map, out_TH))
            # without the extension, ops is megatron's path: no kernel, one megatron permute and unpermute
            assert dict(calls.counts) == {"megatron.permute": 1, "megatron.unpermute": 1}, dict(calls.counts)
    for ours, ref in zip(*runs):
        assert torch.equal(ours, ref)
    records = [r for r in caplog.records if r.name == permute_module.__name__]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "megatron-core" in records[0].getMessage()


def small_inputs():
    routing_map_TE, probs_TE = make_routing("random", 5, 4, 2, torch.float32)
    return torch.randn(5, 8), routing_map_TE, probs_TE


def test_bad_routing_map_dtype():
    tokens_TH, routing_map_TE, _ = small_inputs()
    with pytest.raises(TypeError, match="routing_map must be bool"):
        ops.permute(tokens_TH, routing_map_TE.int())


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda x, r, p: (x[:4], r, p), ValueError, "tokens must have 5 rows"),
        (lambda x, r, p: (x, r, p[:, :3]), ValueError, r"probs must be \[tokens, experts\]"),
        (lambda x, r, p: (x.int(), r, p), TypeError, "tokens must be float32, float64, bfloat16 or float16"),
        (lambda x, r, p: (x[None], r, p), ValueError, "tokens must be 2-D"),
    ],
    ids=["tokens_rows", "probs_shape", "tokens_dtype", "tokens_dim"],
)
def test_bad_permute_inputs(change, error, match):
    tokens_TH, routing_map_TE, probs_TE = change(*small_inputs())
    with pytest.raises(error, match=match):
        ops.permute(tokens_TH, routing_map_TE, probs=probs_TE)


def test_num_out_tokens_must_match_the_routing():
    tokens_TH, routing_map_TE, _ = small_inputs()
    with pytest.raises(ValueError, match="num_out_tokens=3 but routing_map routes 10"):
        ops.permute(tokens_TH, routing_map_TE, num_out_tokens=3)


def test_bad_unpermute_inputs():
    tokens_TH, routing_map_TE, probs_TE = small_inputs()
    permuted_PH, _, index_map = ops.permute(tokens_TH, routing_map_TE)
    with pytest.raises(ValueError, match="restore_shape"):
        ops.unpermute(permuted_PH, index_map, (6, 8))
    with pytest.raises(ValueError, match="routing_map must be given with probs"):
        ops.unpermute(permuted_PH, index_map, (5, 8), probs=probs_TE)
    with pytest.raises(TypeError, match="probs must have the tokens' dtype"):
        ops.unpermute(permuted_PH, index_map, (5, 8), probs=probs_TE.double(), routing_map=routing_map_TE)
    with pytest.raises(TypeError, match="row_id_map must be int32"):
        _, _, sorted_indices = MEGATRON.permute(tokens_TH, routing_map_TE)  # megatron's index map is not ours
        ops.unpermute(permuted_PH, sorted_indices[:, None], (10, 8))
    with pytest.raises(ValueError, match="permuted_tokens must have 10 rows"):
        ops.unpermute(permuted_PH[:9], index_map, (5, 8))


def test_binding_rejects_non_contiguous():
    tokens_TH, routing_map_TE, _ = small_inputs()
    row_id_map_TE, num_rows = permute_module._extension().build_row_id_map(routing_map_TE)
    with pytest.raises(RuntimeError, match="tokens must be contiguous"):
        permute_module._extension().permute_fwd(tokens_TH.t().contiguous().t(), row_id_map_TE, None, num_rows)
