"""Depth pruning equals the source model with the dropped layers removed, checked against transformers."""
import pytest
import torch

from megamod import checkpoint
from megamod.convert.prune import prune
from megamod.convert.upcycle import upcycle
from megamod.convert.checkpoint import hf_to_megamod
from megamod.inference import forward_logits
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import LlavaConfig, build_llava_model, expand_image_tokens
from megamod.models.prune import important_neurons, keep_layers
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


def _assert_language_matches(model, cfg, hf, batch, seq, seed):
    ids = torch.randint(0, 251, (batch, seq), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf(input_ids=ids, use_cache=False).logits
    ours = forward_logits(model, ids, cfg.vocab_size)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-5


def _assert_llava_matches(model, cfg, hf):
    ids_BS = torch.tensor([expand_image_tokens([3, 250, 17, 5, 100, 9], 250, 16)])
    images = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(input_ids=ids_BS, pixel_values=images, use_cache=False).logits
        ours = model(ids_BS, torch.arange(ids_BS.shape[1])[None], images)[..., :cfg.language.vocab_size]
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


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
    _assert_language_matches(model, cfg, hf, batch=2, seq=19, seed=0)


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
    _assert_language_matches(model, cfg, hf, batch=1, seq=17, seed=1)


def test_pruned_llava_matches_transformers(world1, tmp_path):
    hf = tiny_llava(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    prune(str(tmp_path / "mg"), str(tmp_path / "pruned"), "every:2")
    cfg, model = _load(str(tmp_path / "pruned"), build_llava_model, LlavaConfig)
    assert cfg.language.num_layers == 3  # 0, 2 and the last
    _drop_hf_layers(hf.model.language_model, hf.config.text_config, [0, 2, 3])
    _assert_llava_matches(model, cfg, hf)


def test_prune_refuses_other_kinds(world1, tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "megamod.json").write_text('{"format": "megamod", "kind": "vision", "dtype": "float32"}')
    with pytest.raises(ValueError, match=r"ck: model kind 'vision' is not one megamod knows \(language, llava\)"):
        prune(str(tmp_path / "ck"), str(tmp_path / "out"), "0")


def test_important_neurons_rank_by_weight_norms():
    fc1_2FH, fc2_HF = torch.ones(8, 3), torch.ones(3, 4)
    fc1_2FH[1] = 0.0      # neuron 1's gate row
    fc1_2FH[4 + 2] *= 3   # neuron 2's up row
    fc2_HF[:, 3] *= 2     # neuron 3's down column
    assert important_neurons(fc1_2FH, fc2_HF, 2).tolist() == [2, 3]
    assert important_neurons(fc1_2FH, fc2_HF, 3).tolist() == [0, 2, 3]


def test_width_pruning_drops_only_dead_neurons(world1, tmp_path):
    """Neurons whose down projection is zero contribute nothing: pruning exactly those leaves the function of the
    unpruned transformers model unchanged, and the kept neurons' weights are the source's."""
    hf = tiny_qwen2(tmp_path / "hf0")
    dead = {0: [1, 5, 50], 1: [0, 2, 3], 2: [95, 94, 10], 3: [7, 8, 9]}
    with torch.no_grad():
        for layer, cols in dead.items():
            hf.model.layers[layer].mlp.down_proj.weight[:, cols] = 0.0
    hf.save_pretrained(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    info = prune(str(tmp_path / "mg"), str(tmp_path / "narrow"), ffn_hidden_size=93)
    assert info["ffn_hidden_size"] == 93 and info["layers"] == [0, 1, 2, 3]
    cfg, model = _load(str(tmp_path / "narrow"), build_language_model, LanguageModelConfig)
    assert cfg.ffn_hidden_size == 93
    kept = [i for i in range(96) if i not in dead[2]]
    fc1 = model.decoder.layers[2].mlp.linear_fc1.weight
    assert torch.equal(fc1[:93], hf.model.layers[2].mlp.gate_proj.weight[kept])
    assert torch.equal(fc1[93:], hf.model.layers[2].mlp.up_proj.weight[kept])
    _assert_language_matches(model, cfg, hf, batch=2, seq=21, seed=2)


def test_width_and_depth_pruned_llava_matches_transformers(world1, tmp_path):
    hf = tiny_llava(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    prune(str(tmp_path / "mg"), str(tmp_path / "pruned"), "1,3", ffn_hidden_size=40)
    cfg, model = _load(str(tmp_path / "pruned"), build_llava_model, LlavaConfig)
    assert cfg.language.ffn_hidden_size == 40 and cfg.vision.intermediate_size == 64  # the tower is untouched
    text = hf.model.language_model
    with torch.no_grad():  # the reference: transformers' layers cut by hand to the same neurons
        for layer in text.layers:
            mlp = layer.mlp
            idx = important_neurons(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight, 40)
            for name in ("gate_proj", "up_proj"):
                old = getattr(mlp, name)
                new = torch.nn.Linear(old.in_features, 40, bias=False)
                new.weight.copy_(old.weight[idx])
                setattr(mlp, name, new)
            new = torch.nn.Linear(40, mlp.down_proj.out_features, bias=False)
            new.weight.copy_(mlp.down_proj.weight[:, idx])
            mlp.down_proj = new
    _drop_hf_layers(text, hf.config.text_config, [1, 3])
    _assert_llava_matches(model, cfg, hf)


def test_width_pruning_errors(world1, tmp_path):
    tiny_qwen2(tmp_path / "hf")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "dense"))
    with pytest.raises(ValueError, match="nothing to prune"):
        prune(str(tmp_path / "dense"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--ffn-hidden-size 97: expected 1..96"):
        prune(str(tmp_path / "dense"), str(tmp_path / "out"), ffn_hidden_size=97)
    upcycle(str(tmp_path / "dense"), str(tmp_path / "moe"), num_experts=2, topk=2)
    with pytest.raises(ValueError, match="prune before upcycling"):
        prune(str(tmp_path / "moe"), str(tmp_path / "out"), ffn_hidden_size=48)
