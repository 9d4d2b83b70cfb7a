"""megamod's SDPA core attention against megatron-core's DotProductAttention (its torch path, the reference):
outputs and gradients, grouped-query heads, every mask case the models use, and the cases left to megatron."""
import pytest
import torch

S, B, HEADS, GROUPS, HN = 11, 3, 8, 2, 8


def _config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=HEADS * HN, num_attention_heads=HEADS, num_query_groups=GROUPS,
              kv_channels=HN, attention_dropout=0.0, params_dtype=torch.float32)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _pair(mask_type, **overrides):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megamod.models.attention import SDPAttention

    cfg = _config(**overrides)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=mask_type, attention_type="self")
    return DotProductAttention(**kw), SDPAttention(**kw)


def _qkv(sq=S, sk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, B, HEADS, HN, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(sk, B, GROUPS, HN, generator=g).requires_grad_()
    v = torch.randn(sk, B, GROUPS, HN, generator=g).requires_grad_()
    return q, k, v


def _run(module, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, q.grad, k.grad, v.grad


def _assert_same(ref, ours, tol=2e-6):
    for name, a, b in zip(("context", "dq", "dk", "dv"), ref, ours):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=tol, rtol=tol), f"{name}: max diff {(a - b).abs().max():.2e}"


@pytest.mark.parametrize("mask_type", ["causal", "no_mask"])
def test_sdpa_matches_megatron_without_a_mask(world1, mask_type):
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(getattr(AttnMaskType, mask_type))
    q, k, v = _qkv()
    out_ref = _run(ref, q, k, v, None)
    out = _run(ours, q, k, v, None)
    assert out[0].shape == (S, B, HEADS * HN)
    _assert_same(out_ref, out)


def test_sdpa_matches_megatron_with_an_explicit_mask(world1):
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.padding)
    q, k, v = _qkv(seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(B, 1, S, S, generator=g) < 0.4  # True: hidden, as megatron reads it
    mask &= ~torch.eye(S, dtype=torch.bool)  # every query sees at least itself
    _assert_same(_run(ref, q, k, v, mask), _run(ours, q, k, v, mask))


def test_sdpa_one_query_over_a_cache(world1):
    """Greedy decoding: one new query against the cached keys, no mask (megatron's causal path drops it too)."""
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.causal)
    q, k, v = _qkv(sq=1, sk=7, seed=3)
    _assert_same(_run(ref, q, k, v, None), _run(ours, q, k, v, None))


def test_causal_attention_refuses_unequal_lengths(world1):
    from megatron.core.transformer.enums import AttnMaskType

    _, ours = _pair(AttnMaskType.causal)
    q, k, v = _qkv(sq=4, sk=6)
    with pytest.raises(ValueError, match="as many queries as keys"):
        ours(q, k, v, None)


def test_cases_sdpa_does_not_express_run_megatrons_path(world1, monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.causal, window_size=(3, 0))
    called = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: called.append(1))
    q, k, v = _qkv(seed=4)
    _assert_same(_run(ref, q, k, v, None), _run(ours, q, k, v, None), tol=0)
    assert not called


def test_local_specs_use_sdpa(world1):
    from megamod.models.attention import SDPAttention
    from megamod.models.specs import decoder_block_spec

    spec = decoder_block_spec(_config(num_layers=2), use_te=False)
    cores = [layer.submodules.self_attention.submodules.core_attention for layer in spec.layer_specs]
    assert cores == [SDPAttention, SDPAttention]
