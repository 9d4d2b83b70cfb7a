"""Grouped experts (performance.grouped_experts) against megatron-core's SequentialMLP with the same weights, fp32
on CPU: the experts alone with uneven and empty experts, and a whole sparse model; plus how the option resolves on
devices a test cannot have (a mocked probe)."""
import pytest
import torch

from megamod import performance
from megamod.performance import PerformanceConfig, Probe

CFG = dict(vocab_size=251, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
           ffn_hidden_size=96, num_experts=4, moe_router_topk=2)


@pytest.fixture
def grouped_setting():
    """performance.configure for one test, restored after it."""
    def configure(value):
        performance.configure(PerformanceConfig(grouped_experts=value))

    yield configure
    performance.configure(PerformanceConfig())


def _build(**overrides):
    from megamod.models.language import LanguageModelConfig, build_language_model

    torch.manual_seed(0)
    return build_language_model(LanguageModelConfig(**{**CFG, **overrides}))


def test_experts_equal_megatrons_loop_with_uneven_and_empty_experts(world1, grouped_setting):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megamod.models import grouped_experts
    from megamod.models.grouped_experts import GroupedExperts

    grouped_setting(False)
    loop = _build().decoder.layers[0].mlp.experts
    grouped_setting(True)
    fast = _build().decoder.layers[0].mlp.experts
    assert type(loop) is SequentialMLP and type(fast) is GroupedExperts
    fast.load_state_dict(loop.state_dict())
    counts = torch.tensor([5, 0, 9, 3])  # uneven, one empty
    gen = torch.Generator().manual_seed(1)
    x_PH = torch.randn(int(counts.sum()), 64, generator=gen)
    probs_P = torch.rand(int(counts.sum()), generator=gen)
    grad_PH = torch.randn(int(counts.sum()), 64, generator=gen)
    results = {}
    for name, experts in (("loop", loop), ("grouped", fast)):
        x = x_PH.clone().requires_grad_()
        p = probs_P.clone().requires_grad_()
        before = grouped_experts.CALLS["grouped"]
        out_PH, bias = experts(x, counts, p)
        assert bias is None
        assert grouped_experts.CALLS["grouped"] - before == (name == "grouped")  # the grouped GEMMs ran
        out_PH.backward(grad_PH)
        results[name] = (out_PH, x.grad, p.grad, {n: w.grad for n, w in experts.named_parameters()})
    (out, gx, gp, gw), (out_ref, gx_ref, gp_ref, gw_ref) = results["grouped"], results["loop"]
    torch.testing.assert_close(out, out_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gp, gp_ref, rtol=1e-6, atol=1e-6)
    assert gw.keys() == gw_ref.keys() and len(gw) == 8
    for name in gw:
        torch.testing.assert_close(gw[name], gw_ref[name], rtol=1e-6, atol=1e-6, msg=name)
    assert torch.count_nonzero(gw["local_experts.1.linear_fc1.weight"]) == 0  # the empty expert


def test_sparse_model_with_grouped_experts_equals_the_loop(world1, grouped_setting):
    from megamod.models import grouped_experts

    grouped_setting(False)
    loop = _build()
    grouped_setting(True)
    fast = _build()
    fast.load_state_dict(loop.state_dict())
    assert fast.state_dict().keys() == loop.state_dict().keys()  # the same checkpoint layout
    ids_BS = torch.randint(0, 251, (2, 24), generator=torch.Generator().manual_seed(2))
    position_BS = torch.arange(24).expand(2, 24)
    before = grouped_experts.CALLS["grouped"]
    logits = [m(ids_BS, position_BS, attention_mask=None) for m in (loop, fast)]
    assert grouped_experts.CALLS["grouped"] - before == 2  # both MoE layers of the grouped model
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for logit in logits:
        logit.float().square().mean().backward()
    for (name, p), (_, q) in zip(loop.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_a_layout_the_grouped_path_does_not_cover_is_refused_by_name(world1):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.moe_layer import get_default_pg_collection

    from megamod.models.grouped_experts import GroupedExperts
    from megamod.models.language import LanguageModelConfig, transformer_config

    config = transformer_config(LanguageModelConfig(**CFG), add_bias_linear=True)
    with pytest.raises(ValueError, match="grouped experts: biases not covered; use megatron's SequentialMLP"):
        GroupedExperts(4, config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       get_default_pg_collection())


H100 = Probe(cuda=True, capability=(9, 0), has_grouped_mm=True)
A100 = Probe(cuda=True, capability=(8, 0), has_grouped_mm=True)
CPU = Probe(cuda=False, capability=None, has_grouped_mm=True)


@pytest.mark.parametrize("probe,dtype,setting,on", [
    (H100, torch.bfloat16, None, True),
    (H100, torch.float32, None, False),
    (A100, torch.bfloat16, None, False),
    (CPU, torch.float32, None, False),  # the exact reference path stays the default on CPU
    (CPU, torch.float32, True, True),
    (H100, torch.bfloat16, False, False),
    (Probe(cuda=True, capability=(9, 0), has_grouped_mm=False), torch.bfloat16, None, False),
])
def test_the_profile_resolves_from_the_device(probe, dtype, setting, on):
    choice = performance.resolve(dtype, PerformanceConfig(grouped_experts=setting), probe)["grouped_experts"]
    assert choice.on is on and choice.why


def test_forcing_an_option_where_it_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="performance.grouped_experts: true, but CUDA 8.0, bfloat16: torch._grouped_mm "
                                         "needs bf16 on compute capability >= 9.0"):
        performance.resolve(torch.bfloat16, PerformanceConfig(grouped_experts=True), A100)
