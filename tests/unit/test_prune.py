"""Depth pruning equals the source model with the dropped layers removed, checked against transformers."""
import pytest
import torch

from megamod import checkpoint
from megamod.commands.prune import prune
from megamod.commands.upcycle import upcycle
from megamod.convert.checkpoint import hf_to_megamod
from megamod.inference import forward_logits
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import LlavaConfig, build_llava_model, expand_image_tokens
from megamod.models.prune import keep_layers
from tests.helpers import tiny_llava, tiny_qwen2


def _load(ckpt, build, config_cls):
    cfg = config_cls.from_dict(checkpoint.read_metadata(ckpt)["model"])
    model = build(cfg, init_weights=False)
    checkpoint.load_model(model, ckpt)
    return cfg, model.eval()


def _drop_hf_layers(decoder, config, keep):
    """The transformers reference: the source model with only `keep` left in its layer list."""
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in keep])
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]


def test_keep_layers_spec():
    assert keep_layers("0,3", 4) == [0, 3]
    assert keep_layers("3, 0,3", 4) == [0, 3]
    assert keep_layers("every:2", 5) == [0, 2, 4]
    assert keep_layers("every:2", 4) == [0, 2, 3]  # the last layer is always kept
    assert keep_layers("every:1", 3) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"layers \[4\] are not in \[0, 4\)"):
        keep_layers("1,4", 4)
    with pytest.raises(ValueError, match="every:K with K >= 1"):
        keep_layers("every:0", 4)
    with pytest.raises(ValueError, match="comma-separated layer indices"):
        keep_layers("first", 4)


def test_pruned_language_model_matches_transformers(world1, tmp_path):
    hf = tiny_qwen2(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    info = prune(str(tmp_path / "mg"), str(tmp_path / "pruned"), "0,3")
    assert info["layers"] == [0, 3]
    meta = checkpoint.read_metadata(str(tmp_path / "pruned"))
    assert meta["source"]["layers"] == [0, 3] and meta["source"]["pruned_from"] == str(tmp_path / "mg")
    cfg, model = _load(str(tmp_path / "pruned"), build_language_model, LanguageModelConfig)
    assert cfg.num_layers == 2
    _drop_hf_layers(hf.model, hf.config, [0, 3])
    ids = torch.randint(0, 251, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    ours = forward_logits(model, ids, cfg.vocab_size)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def test_pruned_sparse_model_keeps_its_experts(world1, tmp_path):
    hf = tiny_qwen2(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "dense"))
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), num_experts=4, topk=2, moe_layers="even")
    prune(str(tmp_path / "moe"), str(tmp_path / "pruned"), "1,2")
    cfg, model = _load(str(tmp_path / "pruned"), build_language_model, LanguageModelConfig)
    assert cfg.num_layers == 2 and cfg.moe_layer_pattern == [0, 1] and cfg.num_experts == 4
    _, moe = _load(str(tmp_path / "moe"), build_language_model, LanguageModelConfig)
    assert torch.equal(model.decoder.layers[1].mlp.router.weight, moe.decoder.layers[2].mlp.router.weight)
    # identical experts: the sparse layer computes the dense FFN, so the reference is dense transformers
    _drop_hf_layers(hf.model, hf.config, [1, 2])
    ids = torch.randint(0, 251, (1, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    assert (forward_logits(model, ids, cfg.vocab_size) - ref).abs().max().item() <= 1e-5


def test_pruned_llava_matches_transformers(world1, tmp_path):
    hf = tiny_llava(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    prune(str(tmp_path / "mg"), str(tmp_path / "pruned"), "every:2")
    cfg, model = _load(str(tmp_path / "pruned"), build_llava_model, LlavaConfig)
    assert cfg.language.num_layers == 3  # 0, 2 and the last
    _drop_hf_layers(hf.model.language_model, hf.config.text_config, [0, 2, 3])
    ids_BS = torch.tensor([expand_image_tokens([3, 250, 17, 5, 100, 9], 250, 16)])
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids_BS, pixel_values=images, use_cache=False).logits
        ours = model(ids_BS, torch.arange(ids_BS.shape[1])[None], images)[..., :cfg.language.vocab_size]
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_prune_refuses_other_kinds(world1, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "megamod.json").write_text('{"format": "megamod", "kind": "vision", "dtype": "float32"}')
    with pytest.raises(ValueError, match="kind 'vision' cannot be pruned"):
        prune(str(tmp_path / "ck"), str(tmp_path / "out"), "0")
