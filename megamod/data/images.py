"""CLIP image preprocessing as LLaVA-1.5 / LLaVA-MoD feed CLIP ViT-L/14-336, in PIL + numpy.

Two modes:
- "pad" (LLaVA's `image_aspect_ratio=pad`, the default): paste the image centred on a square canvas of the CLIP mean
  colour, then resize to R x R (bicubic). The fill is `int(255 * mean)` per channel, (122, 116, 104) for CLIP: that
  is what LLaVA's `expand2square(img, tuple(int(x * 255) for x in image_processor.image_mean))` computes.
- "crop": resize the shortest edge to R (bicubic; the long edge becomes int(R * long / short)), centre-crop R x R.
Then rescale by 1/255 and normalise with the CLIP mean/std: float32 [3, R, R]. The arithmetic is transformers'
CLIPImageProcessor's PIL backend step for step (the tests hold it to 1e-5). Images are converted with
`.convert("RGB")` as LLaVA does (an alpha channel is dropped, not composited).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "crop")


class ImageError(ValueError):
    """An image that is missing or cannot be decoded; the message names the file."""


_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb(path: str) -> Image.Image:
    """The decoded image at `path` as RGB, or an ImageError naming the file."""
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes fully, so truncated files fail here
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot read image {path}: {e}") from None


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ... as in a parquet row) decoded as RGB, or an ImageError naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except _DECODE_ERRORS as e:
        raise ImageError(f"cannot decode the image bytes of {name}: {e}") from None


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's expand2square: centred on a square canvas of colour `fill`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


@dataclass(frozen=True)
class ImageProcessor:
    size: int = 336
    mode: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"image mode {self.mode!r} is not one of {MODES}")

    @property
    def fill(self) -> tuple[int, int, int]:
        return tuple(int(255 * m) for m in self.mean)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """float32 [3, R, R] from an RGB PIL image."""
        r = self.size
        if self.mode == "pad":
            img = expand_to_square(img, self.fill).resize((r, r), resample=Image.BICUBIC)
        else:
            w, h = img.size
            short, long = min(w, h), max(w, h)
            new_long = int(r * long / short)
            img = img.resize((r, new_long) if w <= h else (new_long, r), resample=Image.BICUBIC)
            left, top = (img.size[0] - r) // 2, (img.size[1] - r) // 2
            img = img.crop((left, top, left + r, top + r))
        pixels_HWC = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
        mean, std = np.asarray(self.mean, dtype=np.float32), np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(((pixels_HWC - mean) / std).transpose(2, 0, 1)))

    def load(self, path: str) -> torch.Tensor:
        return self(open_rgb(path))
