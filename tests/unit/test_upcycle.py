"""Upcycling is function-preserving and every expert is the dense FFN, bit for bit (EP=2 in tests/distributed).

The sparse models' MoE layers permute tokens with megamod._C's kernels, which fall back to megatron-core's torch path
when the extension is missing: every forward of a sparse model here counts the calls to both (tests.helpers
.PermuteCalls), so that a comparison shows the kernels ran, and that the reference it is compared with did not."""
import os

import pytest
import torch

from megamod import checkpoint
from megamod.convert.upcycle import upcycle
from megamod.convert.checkpoint import hf_to_megamod
from megamod.inference import forward_logits
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import LlavaConfig, build_llava_model, expand_image_tokens
from megamod.models.moe import AlltoAllTokenDispatcher, MegamodMoELayer
from megamod.models.upcycle import dense_source, moe_layer_pattern
from tests.helpers import PermuteCalls, tiny_llava, tiny_qwen2


def _load(ckpt, build, config_cls):
    cfg = config_cls.from_dict(checkpoint.read_metadata(ckpt)["model"])
    model = build(cfg, init_weights=False)
    checkpoint.load_model(model, ckpt)
    return cfg, model.eval()


def _sparse_logits(model, *args):
    """forward_logits of a sparse model, which must permute on megamod's kernels, never megatron-core's torch path."""
    with PermuteCalls() as calls:
        logits = forward_logits(model, *args)
    assert calls.counts["permute_fwd"] > 0 and calls.counts["unpermute_fwd"] > 0, dict(calls.counts)
    assert calls.megatron() == 0, dict(calls.counts)
    return logits


def test_layer_patterns():
    assert moe_layer_pattern("even", 5) == [1, 0, 1, 0, 1]
    assert moe_layer_pattern("odd", 4) == [0, 1, 0, 1]
    assert moe_layer_pattern("all", 2) == [1, 1]
    assert moe_layer_pattern("0,3", 4) == [1, 0, 0, 1]
    with pytest.raises(ValueError, match=r"layers \[7\] are not in \[0, 4\)"):
        moe_layer_pattern("1,7", 4)
    with pytest.raises(ValueError, match="expected 'even'"):
        moe_layer_pattern("evens", 4)


def test_upcycled_language_model_equals_dense(world1, tmp_path):
    tiny_qwen2(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "dense"))
    os.makedirs(tmp_path / "dense" / "tokenizer")
    (tmp_path / "dense" / "tokenizer" / "tokenizer.json").write_text('{"stand-in": 1}')
    counts = upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), num_experts=4, topk=2)
    assert counts["routers"] == 2  # layers 0 and 2 of 4
    # the tokenizer travels with the checkpoint, so the next stage finds it as with any other
    assert (tmp_path / "moe" / "tokenizer" / "tokenizer.json").read_text() == '{"stand-in": 1}'
    dense_cfg, dense = _load(str(tmp_path / "dense"), build_language_model, LanguageModelConfig)
    cfg, sparse = _load(str(tmp_path / "moe"), build_language_model, LanguageModelConfig)
    assert cfg.moe_layer_pattern == [1, 0, 1, 0] and cfg.num_experts == 4 and cfg.moe_router_topk == 2
    layer0 = sparse.decoder.layers[0].mlp
    assert isinstance(layer0, MegamodMoELayer) and isinstance(layer0.token_dispatcher, AlltoAllTokenDispatcher)
    dense_params = dict(dense.named_parameters())
    n_experts = 0
    for name, p in sparse.named_parameters():
        source = dense_source(name)
        if source is None:
            assert p.shape == (4, 64) and p.dtype == torch.float32 and p.abs().max() <= 1 / 8  # nn.Linear init
        else:
            assert torch.equal(p, dense_params[source]), name
            n_experts += ".local_experts." in name
    assert n_experts == 2 * 4 * 2  # layers x experts x (fc1, fc2)
    ids = torch.randint(0, cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    a, b = forward_logits(dense, ids, cfg.vocab_size), _sparse_logits(sparse, ids, cfg.vocab_size)
    assert (a - b).abs().max().item() <= 1e-5


def test_upcycled_llava_equals_dense(world1, tmp_path):
    tiny_llava(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "dense"))
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), num_experts=3, topk=2, moe_layers="odd")
    _, dense = _load(str(tmp_path / "dense"), build_llava_model, LlavaConfig)
    cfg, sparse = _load(str(tmp_path / "moe"), build_llava_model, LlavaConfig)
    assert cfg.language.moe_layer_pattern == [0, 1, 0, 1]
    ids = torch.tensor([expand_image_tokens([3, 250, 7, 9], 250, 16)])
    images = torch.randn(1, 3, 32, 32)
    a = forward_logits(dense, ids, cfg.language.vocab_size, images)
    b = _sparse_logits(sparse, ids, cfg.language.vocab_size, images)
    assert (a - b).abs().max().item() <= 1e-5


def _perturbed_sparse(tmp_path, kind="language"):
    """An upcycled student whose experts differ (as after D2S training), so routing decides the output."""
    hf_dir = tmp_path / "hf"
    (tiny_llava if kind == "llava" else tiny_qwen2)(hf_dir)
    hf_to_megamod(str(hf_dir), str(tmp_path / "dense"))
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe0"), num_experts=4, topk=2)
    build, config_cls = (build_llava_model, LlavaConfig) if kind == "llava" else (build_language_model,
                                                                                  LanguageModelConfig)
    cfg, model = _load(str(tmp_path / "moe0"), build, config_cls)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".local_experts." in name or ".router." in name:
                p.add_(0.05 * torch.randn_like(p))
    meta = checkpoint.read_metadata(str(tmp_path / "moe0"))
    checkpoint.save_model(model, str(tmp_path / "moe"), meta)
    return cfg, model


def test_sparse_export_is_qwen2_moe_with_equal_logits(world1, tmp_path):
    from transformers import Qwen2MoeForCausalLM

    from megamod.convert.checkpoint import megamod_to_hf
    from megamod.convert.hf_io import HFReader

    cfg, model = _perturbed_sparse(tmp_path)
    megamod_to_hf(str(tmp_path / "moe"), str(tmp_path / "hf-moe"))
    hf, info = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "hf-moe", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.mlp_only_layers == [1, 3] and hf.config.norm_topk_prob and hf.config.num_experts == 4
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.eval()(ids).logits
    ours = _sparse_logits(model, ids, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4 and torch.equal(ours.argmax(-1), ref.argmax(-1))
    # and back: Qwen2-MoE -> megamod -> Qwen2-MoE is bitwise
    hf_to_megamod(str(tmp_path / "hf-moe"), str(tmp_path / "moe-again"))
    megamod_to_hf(str(tmp_path / "moe-again"), str(tmp_path / "hf-moe-again"))
    a, b = HFReader(str(tmp_path / "hf-moe")), HFReader(str(tmp_path / "hf-moe-again"))
    assert sorted(a.names()) == sorted(b.names())
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_sparse_llava_export_loads_in_transformers(world1, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from megamod.convert.checkpoint import megamod_to_hf

    cfg, model = _perturbed_sparse(tmp_path, kind="llava")
    megamod_to_hf(str(tmp_path / "moe"), str(tmp_path / "hf-moe"))
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf-moe", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.config.text_config.model_type == "qwen2_moe"
    ids = torch.tensor([expand_image_tokens([3, 250, 7, 9, 11], 250, 16)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, pixel_values=images).logits
    ours = _sparse_logits(model, ids, cfg.language.vocab_size, images)
    assert (ours - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dispatcher,capacity", [("alltoall", None), ("allgather", None), ("alltoall", 0.5),
                                                 ("allgather", 0.5)])
def test_moe_layer_dispatchers_and_capacity_equal_megatron(world1, dispatcher, capacity):
    """The dispatcher seam: both dispatchers, dropless and with token dropping (capacity factor 0.5 drops about half
    the assignments), equal megatron-core's own MoELayer on the same weights, forward and backward. megamod's layer
    runs the kernels forward and backward and never megatron's torch permute, megatron's layer the reverse."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megamod.models.moe import AllGatherTokenDispatcher

    cfg = LanguageModelConfig(vocab_size=251, hidden_size=64, num_layers=1, num_attention_heads=4,
                              num_query_groups=2, ffn_hidden_size=96, num_experts=4, moe_router_topk=2,
                              moe_capacity_factor=capacity, moe_token_dispatcher=dispatcher)
    torch.manual_seed(0)
    ours = build_language_model(cfg).decoder.layers[0].mlp
    mine = {"alltoall": AlltoAllTokenDispatcher, "allgather": AllGatherTokenDispatcher}[dispatcher]
    assert type(ours.token_dispatcher) is mine
    theirs = MoELayer(ours.config, ours.submodules, layer_number=1)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, 2, 64)
    results, calls = [], []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        with PermuteCalls() as counted:
            out, _ = layer(xi)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad for p in layer.parameters()]))
        calls.append(dict(counted.counts))
    # ours: the row map, permute (with probs) and unpermute forward; backward, permute_bwd and unpermute's (a permute)
    assert calls[0] == {"build_row_id_map": 1, "permute_fwd": 2, "unpermute_fwd": 1, "permute_bwd": 1}, calls[0]
    assert calls[1] == {"megatron.permute": 1, "megatron.unpermute": 1}, calls[1]
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-7)
    for g_ours, g_theirs in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-7)
    if capacity is not None:  # tokens were really dropped: the output differs from the dropless layer's
        dropless = MoELayer(build_language_model(LanguageModelConfig(**{**cfg.to_dict(), "moe_capacity_factor": None})
                                                 ).decoder.layers[0].mlp.config, ours.submodules, layer_number=1)
        dropless.load_state_dict(ours.state_dict())
        assert not torch.allclose(dropless(x)[0], results[0][0])
