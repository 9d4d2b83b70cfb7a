"""LLaVA (CLIP + adapter + Qwen2) on Megatron-Core against transformers, TP=1 (TP/PP in tests/distributed)."""
import json
import os

import pytest
import torch

from megamod import checkpoint
from megamod.families import llava_hf as convert_llava
from megamod.convert.checkpoint import hf_to_megamod, megamod_to_hf
from megamod.convert.hf_io import HFReader
from megamod.models.llava import build_llava_model, expand_image_tokens
from tests.helpers import tiny_llava, tiny_qwen2

IMAGE = 250  # the <image> id of the tiny models
TOKENS = 16  # (32 / 8) ** 2 image positions


def _load(ckpt):
    cfg = convert_llava.LlavaConfig.from_dict(checkpoint.read_metadata(ckpt)["model"])
    model = build_llava_model(cfg, init_weights=False)
    checkpoint.load_model(model, ckpt)
    return cfg, model.eval()


def _ids(*placeholders_and_text):
    return expand_image_tokens(list(placeholders_and_text), IMAGE, TOKENS)


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory):
    from megamod import distributed

    distributed.initialize()
    tmp = tmp_path_factory.mktemp("llava")
    hf = tiny_llava(tmp / "hf")
    hf_to_megamod(str(tmp / "hf"), str(tmp / "mg"))
    return tmp, hf


@pytest.fixture
def converted(world1, converted_once):
    return converted_once


def test_round_trip_bitwise(converted):
    tmp, _ = converted
    megamod_to_hf(str(tmp / "mg"), str(tmp / "hf2"))
    # transformers 5.x saved vision_tower.* without vision_model.; the export writes the 4.x layout both read
    a, b = HFReader(str(tmp / "hf"), rename=convert_llava.canonical_name), HFReader(str(tmp / "hf2"))
    assert sorted(a.names()) == sorted(b.names())
    assert all(k.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                             "language_model.lm_head.")) for k in b.names())
    for k in a.names():
        assert torch.equal(a.get(k), b.get(k)), k


def test_export_loads_in_transformers_with_processor_config(converted):
    from transformers import LlavaForConditionalGeneration

    tmp, hf = converted
    out = tmp / "hf-export"
    megamod_to_hf(str(tmp / "mg"), str(out))
    config = json.load(open(out / "config.json"))
    assert config["image_token_index"] == IMAGE and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default" and config["text_config"]["rope_theta"] == 1e6
    assert json.load(open(out / "processor_config.json"))["num_additional_image_tokens"] == 1
    reloaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.tensor([_ids(3, IMAGE, 17, 5)])
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, pixel_values=images).logits,
                           hf(input_ids=ids, pixel_values=images).logits)


@pytest.mark.parametrize("placeholders", [0, 1, 2])
def test_logits_match_transformers(converted, placeholders):
    tmp, hf = converted
    cfg, model = _load(str(tmp / "mg"))
    ids = _ids(*([3, IMAGE] * placeholders), 17, 5, 100, 9)
    ids_BS = torch.tensor([ids])
    images = torch.randn(placeholders, 3, 32, 32, generator=torch.Generator().manual_seed(placeholders))
    with torch.no_grad():
        ref = hf(input_ids=ids_BS, pixel_values=images if placeholders else None).logits
        ours = model(ids_BS, torch.arange(len(ids))[None], images if placeholders else None)[..., :cfg.language.vocab_size]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_batch_of_samples_with_different_image_counts(converted):
    """Images fill the image positions in batch-major order, as HF's masked_scatter does."""
    tmp, hf = converted
    cfg, model = _load(str(tmp / "mg"))
    a = _ids(IMAGE, 3, IMAGE, 4)
    b = _ids(5, 6, 7, IMAGE) + [8] * (len(a) - len(_ids(5, 6, 7, IMAGE)))
    ids_BS = torch.tensor([a, b])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids_BS, pixel_values=images).logits
        ours = model(ids_BS, torch.arange(len(a))[None].expand(2, -1), images)[..., :cfg.language.vocab_size]
    assert (ours - ref).abs().max().item() <= 1e-4


def test_vision_features_equal_clip_hidden_states(converted):
    tmp, hf = converted
    _, model = _load(str(tmp / "mg"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.vision_model(images)
        ref = hf.model.vision_tower(images, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == ref.shape == (2, TOKENS, 32)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_image_count_mismatch_is_an_error(converted):
    tmp, _ = converted
    _, model = _load(str(tmp / "mg"))
    ids = torch.tensor([_ids(3, IMAGE, IMAGE, 4)])
    with pytest.raises(ValueError, match=r"32 image-token positions .* 1 images x 16 tokens"):
        model(ids, torch.arange(ids.shape[1])[None], torch.randn(1, 3, 32, 32))
    from megamod.commands.logits import compute_logits

    with pytest.raises(ValueError, match="2 <image> ids .* for 1 images"):
        compute_logits(str(tmp / "mg"), [3, IMAGE, IMAGE], images_NCHW=torch.randn(1, 3, 32, 32))


def test_freeze_switches(converted):
    tmp, _ = converted
    _, model = _load(str(tmp / "mg"))
    model.freeze(vision=True, projector=False, language=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision_projection.") for n in trainable)
    model.freeze(vision=True, projector=False, language=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("language_model.") for n in trainable)
    assert not any(n.startswith("vision_model.") for n in trainable)


def test_compose_from_clip_and_qwen2(world1, tmp_path):
    """Stage 0's starting point: a CLIP vision checkpoint + a Qwen2 checkpoint, adapter freshly initialised."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, image_size=32, patch_size=8)).eval()
    clip.save_pretrained(tmp_path / "clip")
    qwen = tiny_qwen2(tmp_path / "qwen")
    with pytest.raises(ValueError, match="no <image> token in tokenizer.json"):
        hf_to_megamod(str(tmp_path / "qwen"), str(tmp_path / "x"), vision_dir=str(tmp_path / "clip"))
    cfg = hf_to_megamod(str(tmp_path / "qwen"), str(tmp_path / "mg"), vision_dir=str(tmp_path / "clip"),
                        image_token_id=IMAGE)
    _, model = _load(str(tmp_path / "mg"))
    images = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = clip(images, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (model.vision_model(images) - ref).abs().max() <= 1e-5
        text_only = model(ids, torch.arange(4)[None])[..., :cfg.language.vocab_size]
        assert (text_only - qwen(ids).logits).abs().max() <= 1e-4
    w = model.vision_projection.encoder.linear_fc1.weight
    assert w.shape == (64, 32) and w.abs().max() <= 1 / 32**0.5 and w.std() > 0  # nn.Linear's default init


def test_unsupported_llava_configs_are_errors(tmp_path):
    hf = {"model_type": "llava", "text_config": {"model_type": "qwen2", "vocab_size": 251, "hidden_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96},
          "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                            "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
          "image_token_index": 250}
    assert convert_llava.config_from_hf(hf).vision.num_image_tokens == 16
    with pytest.raises(ValueError, match="vision_feature_layer"):
        convert_llava.config_from_hf({**hf, "vision_feature_layer": [-2, -5]})
    with pytest.raises(ValueError, match="image_token_index 400"):
        convert_llava.config_from_hf({**hf, "image_token_index": 400})
    with pytest.raises(ValueError, match="CLIP only"):
        convert_llava.config_from_hf({**hf, "vision_config": {**hf["vision_config"], "model_type": "siglip"}})
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        convert_llava.config_from_hf({**hf, "projector_hidden_act": "relu"})


def test_logits_command_with_an_image_file(converted):
    """`megamod logits --image`: CLIP preprocessing (pad to square with the mean colour), one image per <image>."""
    from PIL import Image

    from megamod.cli import main
    from megamod.data.images import ImageProcessor

    tmp, hf = converted
    pixels = (torch.arange(20 * 12 * 3) % 251).to(torch.uint8).reshape(12, 20, 3).numpy()  # not square
    Image.fromarray(pixels).save(tmp / "img.png")
    assert main(["logits", "--ckpt", str(tmp / "mg"), "--input-ids", f"3,{IMAGE},17,5", "--image",
                 str(tmp / "img.png"), "--out", str(tmp / "img-logits.pt")]) == 0
    pixel_values = ImageProcessor(size=32, mode="pad").load(str(tmp / "img.png"))[None]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([_ids(3, IMAGE, 17, 5)]), pixel_values=pixel_values).logits[0]
    ours = torch.load(tmp / "img-logits.pt")
    assert ours.shape == ref.shape == (19, 251)
    assert (ours - ref).abs().max().item() <= 1e-4
