"""The performance profile (megamod/performance.py): what a CUDA machine with and without TransformerEngine and a CPU
get (mocked probes), errors for options forced where they cannot run, and, forced on CPU, that the fused SwiGLU and
bias-dropout-add really run in the language model and compute what the unfused path computes."""
import pytest
import torch

from megamod import performance
from megamod.performance import PerformanceConfig, Probe

H100_TE = Probe(cuda=True, capability=(9, 0), has_grouped_mm=True, wgrad_kernels="transformer_engine")
H100 = Probe(cuda=True, capability=(9, 0), has_grouped_mm=True, wgrad_kernels=None)
CPU = Probe(cuda=False, capability=None, has_grouped_mm=True, wgrad_kernels=None)


def _on(probe, dtype=torch.bfloat16, **settings):
    return {name: c.on for name, c in performance.resolve(dtype, PerformanceConfig(**settings), probe).items()}


def test_cuda_gets_every_path_it_can_run_and_cpu_the_exact_one():
    # overlap_grad_reduce only when asked for: megatron asserts when a trainable parameter gets no gradient
    assert _on(H100_TE) == dict(grouped_experts=True, bias_activation_fusion=True, bias_dropout_fusion=True,
                                gradient_accumulation_fusion=True, overlap_grad_reduce=False)
    assert _on(H100) == dict(grouped_experts=True, bias_activation_fusion=True, bias_dropout_fusion=True,
                             gradient_accumulation_fusion=False, overlap_grad_reduce=False)
    assert not any(_on(CPU, torch.float32).values())
    rows = performance.resolve(torch.bfloat16, PerformanceConfig(), H100)
    assert "TransformerEngine or Apex" in rows["gradient_accumulation_fusion"].why


def test_recipe_settings_override_and_impossible_ones_are_errors():
    assert _on(H100, overlap_grad_reduce=True)["overlap_grad_reduce"] is True
    assert _on(H100, grouped_experts=False)["grouped_experts"] is False
    assert _on(CPU, torch.float32, bias_activation_fusion=True)["bias_activation_fusion"] is True
    with pytest.raises(ValueError, match="performance.gradient_accumulation_fusion: true, but needs CUDA and "
                                         "TransformerEngine or Apex"):
        performance.resolve(torch.bfloat16, PerformanceConfig(gradient_accumulation_fusion=True), H100)


def test_the_recipe_section_is_checked_by_key(tmp_path):
    from megamod.training.config import ConfigError, load_config

    base = {"stage": "d2d", "student": "s", "teacher": "t", "out": str(tmp_path),
            "data": {"train": [{"path": "conversations.json"}]}, "performance": {"overlap_grad_reduce": True}}
    assert load_config(base=base).performance.overlap_grad_reduce is True
    with pytest.raises(ConfigError, match="performance.*grouped_expert"):
        load_config(base={**base, "performance": {"grouped_expert": True}})


def test_forced_fusions_run_in_the_language_model_and_match_the_exact_path(world1, monkeypatch):
    from megatron.core.transformer import mlp

    from megamod.models.language import LanguageModelConfig, build_language_model

    from megatron.core.fusions import fused_bias_dropout

    calls = {"swiglu": 0, "bda": 0}
    real = mlp.bias_swiglu_impl
    real_bda = fused_bias_dropout.bias_dropout_add_fused_train

    def swiglu(*args, **kwargs):
        calls["swiglu"] += 1
        return real(*args, **kwargs)

    def bda(*args, **kwargs):
        calls["bda"] += 1
        return real_bda(*args, **kwargs)

    monkeypatch.setattr(mlp, "bias_swiglu_impl", swiglu)
    # get_bias_dropout_add looks the fused function up at call time: a spy on the module attribute sees it run
    monkeypatch.setattr(fused_bias_dropout, "bias_dropout_add_fused_train", bda)
    cfg = LanguageModelConfig(vocab_size=251, hidden_size=64, num_layers=2, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=96)
    models = {}
    try:
        for fused in (False, True):
            performance.configure(PerformanceConfig(bias_activation_fusion=fused, bias_dropout_fusion=fused))
            torch.manual_seed(0)
            models[fused] = build_language_model(cfg)
    finally:
        performance.configure(PerformanceConfig())
    assert models[True].config.bias_activation_fusion and models[True].config.bias_dropout_fusion
    assert not models[False].config.bias_activation_fusion
    models[True].load_state_dict(models[False].state_dict())
    ids_BS = torch.randint(0, 251, (2, 16), generator=torch.Generator().manual_seed(1))
    pos_BS = torch.arange(16).expand(2, 16)
    logits = {}
    for fused, model in models.items():
        before, before_bda = calls["swiglu"], calls["bda"]
        assert model.training  # the fused bias-dropout-add under test is the training one
        logits[fused] = model(ids_BS, pos_BS, attention_mask=None)
        assert (calls["swiglu"] - before) == (2 if fused else 0)  # one per layer, only when fused
        assert (calls["bda"] - before_bda) == (4 if fused else 0)  # after attention and after the MLP, per layer
        logits[fused].float().square().mean().backward()
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(models[False].named_parameters(), models[True].named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_overlap_grad_reduce_reaches_megatrons_ddp(world1):
    from megamod.models.language import LanguageModelConfig, build_language_model
    from megamod.training.step import wrap_ddp

    cfg = LanguageModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_attention_heads=2,
                              num_query_groups=1, ffn_hidden_size=32, vocab_pad_multiple=8)
    try:
        for setting in (True, False):
            performance.configure(PerformanceConfig(overlap_grad_reduce=setting))
            assert wrap_ddp(build_language_model(cfg)).ddp_config.overlap_grad_reduce is setting
    finally:
        performance.configure(PerformanceConfig())
