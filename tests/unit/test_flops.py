"""megamod/flops.py against counts made by hand on a tiny model: trainable weights 6N, frozen weights behind a
trainable part 4N, frozen weights with nothing trainable before them 2N, top-k experts, causal attention pairs,
the vision tower and projector."""
import pytest

from megamod.models.language import LanguageModelConfig
from megamod.models.vision import VisionConfig
from megamod.flops import causal_pairs, language_flops, model_flops, vision_flops

# h=8, 2 heads of 4 (q width 8), 1 key/value group (k, v width 4), F=16, layer 0 dense, layer 1 MoE (4 experts,
# top-2), vocabulary 100 padded to 128. Weights a token goes through: q 64, k 32, v 32, o 64; dense gate+up 256,
# down 128; router 32; two experts' gate+up 512, down 256; output layer 8 x 128 = 1024.
TINY = LanguageModelConfig(vocab_size=100, hidden_size=8, num_layers=2, num_attention_heads=2, num_query_groups=1,
                           ffn_hidden_size=16, kv_channels=4, num_experts=4, moe_router_topk=2,
                           moe_layer_pattern=[0, 1])


def test_causal_pairs():
    assert [causal_pairs(n) for n in (0, 1, 2, 5)] == [0, 1, 3, 15]


def test_forward_only_is_2n_and_causal_scores():
    f = language_flops(TINY, tokens=10, pairs=7)
    assert f["language_matmul"] == 10 * 2 * (128 + 64 + 384 + 128 + 64 + 32 + 768 + 1024)
    assert f["language_attention"] == 2 * 4 * 8 * 7  # 2 layers, QK and PV: 4 FLOPs per pair and query channel


def test_d2s_counts_frozen_weights_behind_the_adapter_as_4n():
    # d2s: the projector (upstream), FFNs and routers train; attention and the output layer are frozen
    f = language_flops(TINY, tokens=1, pairs=1, groups=("projector", "ffn", "router"), upstream=True)
    layer0 = 4 * 128 + 4 * 64 + 6 * 256 + 6 * 128
    layer1 = 4 * 128 + 4 * 64 + 6 * 32 + 6 * 512 + 6 * 256
    assert f["language_matmul"] == layer0 + layer1 + 4 * 1024
    assert f["language_attention"] == 2 * 3 * 32  # forward and the backward a gradient passes through (2x)


def test_nothing_trainable_upstream_skips_input_gradients():
    # only the FFNs train, no adapter: layer 0's attention needs no gradient at all; its dense MLP needs no input
    # gradient below gate/up; the frozen router sits behind a trainable MLP
    f = language_flops(TINY, tokens=1, pairs=1, groups=("ffn",), upstream=False)
    layer0 = 2 * 128 + 2 * 64 + 4 * 256 + 6 * 128
    layer1 = 4 * 128 + 4 * 64 + 4 * 32 + 6 * 512 + 6 * 256
    assert f["language_matmul"] == layer0 + layer1 + 4 * 1024
    assert f["language_attention"] == 32 + 3 * 32


def test_everything_trainable_is_6n():
    f = language_flops(TINY, tokens=3, pairs=0, groups=("language",))
    assert f["language_matmul"] == 3 * 6 * (128 + 64 + 384 + 128 + 64 + 32 + 768 + 1024)


def test_dense_model_has_no_router():
    dense = LanguageModelConfig(vocab_size=128, hidden_size=8, num_layers=1, num_attention_heads=2,
                                num_query_groups=2, ffn_hidden_size=16)
    assert language_flops(dense, 1, 0)["language_matmul"] == 2 * (64 * 4 + 384 + 1024)


def test_vision_tower_and_projector():
    # 32 x 32 image in 16 x 16 patches: 4 patches + the class token; one layer runs (feature_layer -2 of 2)
    vision = VisionConfig(hidden_size=4, intermediate_size=8, num_layers=2, num_attention_heads=1, image_size=32,
                          patch_size=16)
    f = vision_flops(vision, language_hidden=8, images=2, groups=("projector", "ffn"))
    tower = 4 * 2 * (3 * 16 * 16 * 4) + 5 * 2 * (4 * 4 * 4 + 2 * 4 * 8) + 4 * 4 * 25  # patches, weights, scores
    projector = 4 * (4 * 32 + 6 * 64)  # 4 image tokens; first layer: nothing trainable before it
    assert f == {"vision": 2 * tower, "projector": 2 * projector}
    trained = vision_flops(vision, 8, 1, groups=("vision",))
    assert trained["vision"] == 4 * 4 * 3072 + 5 * 6 * 128 + 3 * 4 * 4 * 25  # the conv has no input gradient


def test_llava_model_marks_the_decoder_upstream():
    vision = VisionConfig(hidden_size=4, intermediate_size=8, num_layers=2, num_attention_heads=1, image_size=32,
                          patch_size=16)
    groups = ("projector", "ffn", "router")
    f = model_flops(TINY, vision, tokens=5, pairs=15, images=1, groups=groups)
    assert f["language_matmul"] == language_flops(TINY, 5, 15, groups, upstream=True)["language_matmul"]
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert model_flops(TINY, None, 5, 15, 0, groups)["language_matmul"] < f["language_matmul"]
