"""megamod._C's permute kernels as torch.library custom ops (megamod/ops/permute_ops.py): opcheck, results against
megatron-core's torch path, torch.compile and meta tensors, on CPU."""
import collections
import contextlib
import importlib

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from megamod import ops
from megamod.ops import permute_ops
from tests.unit.test_permute import DOT_FP32, MEGATRON, assert_match, leaf, make_routing

pytestmark = pytest.mark.skipif(not ops.extension_available(),
                                reason="megamod._C did not import: run `pip install --no-build-isolation -e .`")

T, E, H = 13, 5, 8
PERMUTE = importlib.import_module("megamod.ops.permute")  # the module (megamod.ops.permute is also the function)
OPS = ("build_row_id_map", "permute_fwd", "permute_bwd", "unpermute_fwd", "unpermute_bwd")
DTYPES = [pytest.param(torch.float32, dict(rtol=0, atol=0), id="fp32"),
          pytest.param(torch.bfloat16, dict(rtol=2e-2, atol=1e-5), id="bf16")]
WITH_PROBS = pytest.mark.parametrize("with_probs", [True, False], ids=["probs", "no_probs"])


def inputs(dtype, seed=0):
    routing_map_TE, probs_TE = make_routing("random", T, E, 2, dtype, seed=seed)
    tokens_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return tokens_TH, routing_map_TE, probs_TE


def test_ops_are_registered():
    for name in OPS:
        assert getattr(torch.ops.megamod, name).default is getattr(permute_ops, name)._opoverload


@WITH_PROBS
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_opcheck(dtype, tol, with_probs):
    tokens_TH, routing_map_TE, probs_TE = inputs(dtype)
    P = int(routing_map_TE.sum())
    row_id_map_TE, _ = permute_ops.build_row_id_map(routing_map_TE, P)
    gen = torch.Generator().manual_seed(2)
    grad_PH, grad_P, grad_TH, permuted_PH = (torch.randn(*shape, generator=gen).to(dtype)
                                             for shape in ((P, H), (P,), (T, H), (P, H)))
    p_TE = leaf(probs_TE) if with_probs else None
    cases = [
        ("build_row_id_map", (routing_map_TE, P)),
        ("build_row_id_map", (routing_map_TE, None)),
        ("permute_fwd", (leaf(tokens_TH), row_id_map_TE, p_TE, P)),
        ("permute_bwd", (grad_PH, grad_P if with_probs else None, row_id_map_TE)),
        ("unpermute_fwd", (leaf(permuted_PH), row_id_map_TE, p_TE)),
    ]
    if with_probs:
        cases.append(("unpermute_bwd", (grad_TH, permuted_PH, row_id_map_TE, probs_TE)))
    for name, args in cases:
        torch.library.opcheck(getattr(torch.ops.megamod, name).default, args)


@WITH_PROBS
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_ops_match_megatron(dtype, tol, with_probs):
    """permute -> unpermute -> backward through torch.ops.megamod.* against megatron-core's torch path."""
    tokens_TH, routing_map_TE, probs_TE = inputs(dtype)
    grad_TH = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    megamod = torch.ops.megamod

    def via_ops(x_TH, p_TE):
        row_id_map_TE, P = megamod.build_row_id_map(routing_map_TE, None)
        permuted_PH, permuted_probs_P = megamod.permute_fwd(x_TH, row_id_map_TE, p_TE, P)
        return permuted_PH, permuted_probs_P, megamod.unpermute_fwd(permuted_PH * 2, row_id_map_TE, p_TE)

    def via_megatron(x_TH, p_TE):
        permuted_PH, permuted_probs_P, sorted_indices = MEGATRON.permute(x_TH, routing_map_TE, probs=p_TE)
        out_TH = MEGATRON.unpermute(permuted_PH * 2, sorted_indices, (T, H), probs=p_TE, routing_map=routing_map_TE)
        return permuted_PH, permuted_probs_P, out_TH

    runs = []
    for impl in (via_ops, via_megatron):
        x_TH, p_TE = leaf(tokens_TH), leaf(probs_TE)
        permuted_PH, permuted_probs_P, out_TH = impl(x_TH, p_TE if with_probs else None)
        grads = [grad_TH] + ([torch.ones_like(permuted_probs_P)] if with_probs else [])
        torch.autograd.backward([out_TH] + ([permuted_probs_P] if with_probs else []), grads)
        runs.append((permuted_PH, out_TH, x_TH.grad) + ((permuted_probs_P, p_TE.grad) if with_probs else ()))
    for i, (ours, ref) in enumerate(zip(*runs)):
        assert_match(ours, ref, DOT_FP32 if i == 4 and tol["rtol"] == 0 else tol)  # i == 4: the probs' dot products


class CountingKernels:
    """Stands in for megamod._C, counting the kernel calls."""

    def __init__(self, real):
        self.real, self.calls = real, collections.Counter()

    def __getattr__(self, name):
        def counted(*args):
            self.calls[name] += 1
            return getattr(self.real, name)(*args)
        return counted


def permute_unpermute(tokens_TH, routing_map_TE, probs_TE, num_out_tokens):
    permuted_PH, permuted_probs_P, row_id_map_TE = ops.permute(tokens_TH, routing_map_TE, probs=probs_TE,
                                                               num_out_tokens=num_out_tokens)
    out_TH = ops.unpermute(permuted_PH * 2, row_id_map_TE, tokens_TH.shape, probs=probs_TE,
                           routing_map=routing_map_TE)
    return out_TH, permuted_probs_P * 3


def _run_both(compiled, kernels, tokens_TH, routing_map_TE, probs_TE, num_out_tokens, runs):
    for fn in (compiled, permute_unpermute):
        kernels.calls.clear()
        x_TH, p_TE = leaf(tokens_TH), leaf(probs_TE)
        out_TH, scaled_probs_P = fn(x_TH, routing_map_TE, p_TE, num_out_tokens)
        (out_TH.square().sum() + scaled_probs_P.sum()).backward()
        runs.append((out_TH, scaled_probs_P, x_TH.grad, p_TE.grad))
        assert kernels.calls == {name: 1 for name in OPS}, kernels.calls  # the compiled function ran the kernels


@pytest.mark.filterwarnings("ignore:Your compiler for AOTAutograd:UserWarning")  # from AotEagerAndRecordGraphs
@pytest.mark.parametrize("backend, given_count", [("eager", True), ("aot_eager", True), ("aot_eager", False),
                                                  ("inductor", True)])
def test_compile_matches_eager(backend, given_count, monkeypatch):
    tokens_TH, routing_map_TE, probs_TE = inputs(torch.float32)
    num_out_tokens = int(routing_map_TE.sum()) if given_count else None
    kernels = CountingKernels(permute_ops._C())
    monkeypatch.setattr(permute_ops, "_C", lambda: kernels)  # the custom ops' kernels (compiled)
    monkeypatch.setattr(PERMUTE, "_extension", lambda: kernels)  # eager calls reach the kernels directly
    recorder = AotEagerAndRecordGraphs() if backend == "aot_eager" else backend
    torch._dynamo.reset()
    compiled = torch.compile(permute_unpermute, backend=recorder, fullgraph=True)
    runs = []
    # inductor: no pool of compile workers to start. config.patch restores the option; monkeypatch's undo would
    # delete it and break every later torch.compile in the process (megatron-core 0.19's jit_fuser among them).
    with torch._inductor.config.patch(compile_threads=1) if backend == "inductor" else contextlib.nullcontext():
        _run_both(compiled, kernels, tokens_TH, routing_map_TE, probs_TE, num_out_tokens, runs)
    for compiled_result, eager_result in zip(*runs):
        assert torch.equal(compiled_result, eager_result)
    if backend == "aot_eager":  # the custom ops are single nodes of the traced graphs
        def targets(graphs):
            return {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
        forward_ops = {f"megamod.{name}.default" for name in ("build_row_id_map", "permute_fwd", "unpermute_fwd")}
        assert forward_ops <= targets(recorder.fw_graphs)
        assert {"megamod.permute_bwd.default", "megamod.unpermute_bwd.default"} <= targets(recorder.bw_graphs)
    assert torch._inductor.config.compile_threads >= 1  # the option is back for the rest of the process


def test_meta_tensors_do_not_touch_the_kernels(monkeypatch):
    def no_kernels():
        raise AssertionError("a kernel ran on meta tensors")

    monkeypatch.setattr(permute_ops, "_C", no_kernels)
    P = 26
    with torch.device("meta"):
        tokens_TH = torch.empty(T, H, dtype=torch.bfloat16, requires_grad=True)
        probs_TE = torch.empty(T, E, dtype=torch.float32, requires_grad=True)
        routing_map_TE = torch.empty(T, E, dtype=torch.bool)
    permuted_PH, permuted_probs_P, row_id_map_TE = ops.permute(tokens_TH, routing_map_TE, probs=probs_TE,
                                                               num_out_tokens=P)
    out_TH = ops.unpermute(permuted_PH, row_id_map_TE, (T, H), probs=probs_TE, routing_map=routing_map_TE)
    (out_TH.float().sum() + permuted_probs_P.sum()).backward()
    for x, shape, dtype in [(permuted_PH, (P, H), torch.bfloat16), (permuted_probs_P, (P,), torch.float32),
                            (row_id_map_TE, (T, E), torch.int32), (out_TH, (T, H), torch.bfloat16),
                            (tokens_TH.grad, (T, H), torch.bfloat16), (probs_TE.grad, (T, E), torch.float32)]:
        assert x.is_meta and x.shape == shape and x.dtype == dtype
    _, no_probs_P, _ = ops.permute(tokens_TH, routing_map_TE, num_out_tokens=P)
    assert no_probs_P is None
    with pytest.raises(ValueError, match="needs num_out_tokens"):
        ops.permute(tokens_TH, routing_map_TE)


def test_eager_calls_reach_the_kernels_without_the_custom_ops(monkeypatch):
    """Eager permute/unpermute skip the custom-op dispatch (its Python overhead) and run the same kernels."""
    tokens_TH, routing_map_TE, probs_TE = inputs(torch.float32)
    x_TH, p_TE = leaf(tokens_TH), leaf(probs_TE)
    expected = permute_unpermute(x_TH, routing_map_TE, p_TE, None)
    (expected[0].square().sum() + expected[1].sum()).backward()

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom ops")

    for name in OPS:
        monkeypatch.setattr(permute_ops, name, refuse)
    y_TH, q_TE = leaf(tokens_TH), leaf(probs_TE)
    found = permute_unpermute(y_TH, routing_map_TE, q_TE, None)
    (found[0].square().sum() + found[1].sum()).backward()
    for a, b in zip((*found, y_TH.grad, q_TE.grad), (*expected, x_TH.grad, p_TE.grad)):
        assert torch.equal(a, b)
