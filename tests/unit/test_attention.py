"""megamod's SDPA core attention against megatron-core's DotProductAttention (its torch path, the reference):
outputs and gradients, grouped-query heads, every mask case the models use, and the cases left to megatron.

SDPAttention is a subclass of the reference and falls back to it for the cases SDPA does not express, so a
comparison alone would pass if the SDPA branch never ran (megatron compared with itself). Every comparison therefore
counts the calls to torch's scaled_dot_product_attention: one for megamod's module, none for the reference (which
never calls it), and none where megatron's path must run; and test_the_comparison_catches_a_broken_sdpa shows that the
comparison fails when the SDPA call is wrong."""
import contextlib
from unittest import mock

import pytest
import torch

S, B, HEADS, GROUPS, HN = 11, 3, 8, 2, 8
_SDPA = torch.nn.functional.scaled_dot_product_attention  # torch's own, whatever a test puts in its place


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
    ref, ours = DotProductAttention(**kw), SDPAttention(**kw)
    assert type(ref) is DotProductAttention and type(ours) is SDPAttention
    return ref, ours


def _qkv(sq=S, sk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, B, HEADS, HN, generator=g, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(sk, B, GROUPS, HN, generator=g).requires_grad_()
    v = torch.randn(sk, B, GROUPS, HN, generator=g).requires_grad_()
    return q, k, v


def _padding_mask(seed=2):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, 1, S, S, generator=g) < 0.4  # True: hidden, as megatron reads it
    mask &= ~torch.eye(S, dtype=torch.bool)  # every query sees at least itself
    return mask


def _run(module, q, k, v, mask, seed=None):
    """Output and input gradients. `seed` reseeds the CPU generator and megatron's RNG tracker first (the
    attention-dropout stream), so that two modules draw the same dropout mask."""
    if seed is not None:
        from megatron.core import tensor_parallel

        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = module(q, k, v, mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, q.grad, k.grad, v.grad


def _assert_same(ref, ours, tol=2e-6):
    for name, a, b in zip(("context", "dq", "dk", "dv"), ref, ours):
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=tol, rtol=tol), f"{name}: max diff {(a - b).abs().max():.2e}"


@contextlib.contextmanager
def _sdpa_calls(impl=None):
    """Counts the calls to torch.nn.functional.scaled_dot_product_attention (megamod.models.attention looks it up
    there at each call) while running `impl` (torch's own by default) in its place."""
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", wraps=impl or _SDPA) as spy:
        yield spy


def _compare_with_sdpa(ref, ours, q, k, v, mask, tol=2e-6):
    """megatron's module and megamod's on the same inputs; megamod's must have taken exactly one SDPA call and
    megatron's none. Returns the SDPA call's arguments."""
    with _sdpa_calls() as spy:
        expected = _run(ref, q, k, v, mask)
        assert spy.call_count == 0, "the reference called torch's SDPA: it would not be independent"
        got = _run(ours, q, k, v, mask)
    assert spy.call_count == 1, f"SDPA ran {spy.call_count} times: megatron's path was compared with itself"
    _assert_same(expected, got, tol)
    return spy.call_args


@pytest.mark.parametrize("mask_type", ["causal", "no_mask"])
def test_sdpa_matches_megatron_without_a_mask(world1, mask_type):
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(getattr(AttnMaskType, mask_type))
    q, k, v = _qkv()
    call = _compare_with_sdpa(ref, ours, q, k, v, None)
    assert call.kwargs["is_causal"] is (mask_type == "causal") and call.kwargs["attn_mask"] is None
    assert call.kwargs["enable_gqa"] is True  # 8 query heads over 2 key/value groups, not repeated beforehand
    assert call.args[1].shape == (B, GROUPS, S, HN)


def test_sdpa_matches_megatron_with_an_explicit_mask(world1):
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.padding)
    q, k, v = _qkv(seed=1)
    mask = _padding_mask()
    call = _compare_with_sdpa(ref, ours, q, k, v, mask)
    assert call.kwargs["is_causal"] is False and torch.equal(call.kwargs["attn_mask"], ~mask)


def test_sdpa_one_query_over_a_cache(world1):
    """Greedy decoding: one new query against the cached keys, no mask (megatron's causal path drops it too)."""
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.causal)
    q, k, v = _qkv(sq=1, sk=7, seed=3)
    call = _compare_with_sdpa(ref, ours, q, k, v, None)
    assert call.kwargs["is_causal"] is False


def test_sdpa_applies_in_eval_despite_attention_dropout(world1):
    """Dropout only sends training to megatron's path: the same modules in eval take SDPA."""
    from megatron.core.transformer.enums import AttnMaskType

    ref, ours = _pair(AttnMaskType.causal, attention_dropout=0.3)
    for module in (ref, ours):
        module.eval()
    q, k, v = _qkv(seed=5)
    _compare_with_sdpa(ref, ours, q, k, v, None)


def test_causal_attention_refuses_unequal_lengths(world1):
    from megatron.core.transformer.enums import AttnMaskType

    _, ours = _pair(AttnMaskType.causal)
    q, k, v = _qkv(sq=4, sk=6)
    with _sdpa_calls() as spy, pytest.raises(ValueError, match="as many queries as keys"):
        ours(q, k, v, None)
    assert spy.call_count == 0


# (config overrides, train, changes the result): each a case SDPA does not express; megatron's path must run, giving
# its result exactly. Query-key layer scaling divides the scores by the layer number and the softmax multiplies them
# back: the same attention, only computed otherwise.
FALLBACKS = {
    "sliding_window": (dict(window_size=(3, 0)), False, True),
    "query_key_layer_scaling": (dict(apply_query_key_layer_scaling=True), False, False),
    "softmax_offset": (dict(softmax_type="off-by-one"), False, True),
    "dropout_while_training": (dict(attention_dropout=0.3), True, True),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_cases_sdpa_does_not_express_run_megatrons_path(world1, case):
    from megatron.core.transformer.enums import AttnMaskType

    overrides, train, changes_result = FALLBACKS[case]
    ref, ours = _pair(AttnMaskType.causal, **overrides)
    for module in (ref, ours):
        module.train(train)
    q, k, v = _qkv(seed=4)
    with _sdpa_calls() as spy:
        expected, got = _run(ref, q, k, v, None, seed=6), _run(ours, q, k, v, None, seed=6)
    assert spy.call_count == 0, f"{case}: SDPA ran where megatron's path must"
    _assert_same(expected, got, tol=0)
    if changes_result:  # so SDPA's plain causal attention in its place would fail the comparison
        _, plain = _pair(AttnMaskType.causal)
        with _sdpa_calls() as spy:
            other = _run(plain, q, k, v, None, seed=6)
        assert spy.call_count == 1
        assert not torch.allclose(other[0], expected[0], atol=1e-3, rtol=1e-3), case


def _changed(**changes):
    """torch's SDPA with some of megamod's arguments replaced."""
    return lambda query, key, value, **kwargs: _SDPA(query, key, value, **{**kwargs, **changes})


def _scale_off(query, key, value, **kwargs):
    return _SDPA(query, key, value, **{**kwargs, "scale": kwargs["scale"] * 1.001})


def _tiled_groups(query, key, value, **kwargs):
    """A plausible GQA bug: each group's keys/values repeated as a tile (head h reads group h % G) instead of in
    blocks (head h reads group h // (H / G), as megatron and enable_gqa do)."""
    rep = query.shape[1] // key.shape[1]
    return _SDPA(query, key.repeat(1, rep, 1, 1), value.repeat(1, rep, 1, 1), **{**kwargs, "enable_gqa": False})


def _gradient_only(query, key, value, **kwargs):
    """Forward exact (the added term is 0), every input gradient 1 % too large."""
    out = _SDPA(query, key, value, **kwargs)
    return out + 0.01 * (out - out.detach())


BROKEN_SDPA = {
    "scale": _scale_off,
    "causal_dropped": _changed(is_causal=False),
    "mask_dropped": _changed(attn_mask=None),
    "tiled_groups": _tiled_groups,
    "gradient_only": _gradient_only,
}


@pytest.mark.parametrize("breakage", list(BROKEN_SDPA))
def test_the_comparison_catches_a_broken_sdpa(world1, breakage):
    """The fast path with one thing wrong fails the comparison the tests above make (and the spy sees it run)."""
    from megatron.core.transformer.enums import AttnMaskType

    mask = _padding_mask() if breakage == "mask_dropped" else None
    ref, ours = _pair(AttnMaskType.padding if mask is not None else AttnMaskType.causal)
    q, k, v = _qkv(seed=7)
    expected = _run(ref, q, k, v, mask)
    with _sdpa_calls(BROKEN_SDPA[breakage]) as spy:
        got = _run(ours, q, k, v, mask)
    assert spy.call_count == 1
    with pytest.raises(AssertionError, match="max diff"):
        _assert_same(expected, got)


def test_local_specs_use_sdpa(world1):
    from megamod.models.attention import SDPAttention
    from megamod.models.specs import decoder_block_spec

    spec = decoder_block_spec(_config(num_layers=2), use_te=False)
    cores = [layer.submodules.self_attention.submodules.core_attention for layer in spec.layer_specs]
    assert cores == [SDPAttention, SDPAttention]
