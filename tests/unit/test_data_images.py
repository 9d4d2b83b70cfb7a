"""megamod.data.images: equal to transformers' CLIPImageProcessor, and clear errors for bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from megamod.data.images import ImageError, ImageProcessor, expand_to_square, open_rgb

SIZES = [(100, 60), (60, 100), (336, 336), (500, 337), (37, 41), (800, 20)]


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPImageProcessor

    return lambda size: CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("resolution", [336, 32])
def test_crop_mode_equals_clip_image_processor(clip, resolution):
    ref = clip(resolution)
    for k, (w, h) in enumerate(SIZES):
        img = _image(w, h, k)
        ours_CHW = ImageProcessor(resolution, "crop")(img)
        theirs_CHW = ref(img, return_tensors="pt")["pixel_values"][0]
        assert ours_CHW.dtype == torch.float32 and ours_CHW.shape == (3, resolution, resolution)
        assert (ours_CHW - theirs_CHW).abs().max() <= 1e-5, (w, h)


def test_pad_mode_equals_pil_padding_then_clip_image_processor(clip):
    ref = clip(336)
    proc = ImageProcessor(336, "pad")
    assert proc.fill == (122, 116, 104)  # int(255 * CLIP mean), LLaVA's expand2square argument
    for k, (w, h) in enumerate(SIZES):
        img = _image(w, h, 10 + k)
        side = max(w, h)
        padded = Image.new("RGB", (side, side), (122, 116, 104))
        padded.paste(img, ((side - w) // 2, (side - h) // 2))
        theirs_CHW = ref(padded, return_tensors="pt")["pixel_values"][0]
        assert (proc(img) - theirs_CHW).abs().max() <= 1e-5, (w, h)


def test_pad_puts_image_in_the_middle_of_mean_colour():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    sq = np.asarray(expand_to_square(img, (122, 116, 104)))
    assert sq.shape == (40, 40, 3)
    assert (sq[10:30] == (255, 0, 0)).all()
    assert (sq[:10] == (122, 116, 104)).all() and (sq[30:] == (122, 116, 104)).all()
    # The padding normalises to (almost) zero: int(255 * mean) / 255 is within 1/255 of the mean.
    out = ImageProcessor(64, "pad")(img)
    assert out[:, 0, 0].abs().max() < 0.02


def test_alpha_and_greyscale_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    Image.new("L", (8, 8), 77).save(tmp_path / "g.png")
    assert open_rgb(str(tmp_path / "a.png")).getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, as LLaVA does
    assert open_rgb(str(tmp_path / "g.png")).getpixel((0, 0)) == (77, 77, 77)


def test_errors_name_the_file(tmp_path):
    proc = ImageProcessor(32)
    with pytest.raises(ImageError, match=f"image not found: {tmp_path}/missing.png"):
        proc.load(str(tmp_path / "missing.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=f"cannot read image {tmp_path}/junk.jpg"):
        proc.load(str(tmp_path / "junk.jpg"))
    _image(64, 64, 0).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=f"cannot read image {tmp_path}/cut.png"):
        proc.load(str(tmp_path / "cut.png"))
    with pytest.raises(ValueError, match="image mode 'squash'"):
        ImageProcessor(32, "squash")
