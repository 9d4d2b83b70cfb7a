"""`megamod logits`: one forward pass of a checkpoint, fp32 logits of every position saved as [S, V].

V is the true vocabulary size (padding rows dropped), so the file compares directly against transformers'
`model(input_ids).logits[0]`. For a LLaVA checkpoint, `--image` gives one image per `<image>` id in the input ids;
each `<image>` is expanded to the model's image positions (576 for CLIP-L/14-336) before the forward, so the saved
logits are those of every position of the expanded sequence: exactly HF LlavaForConditionalGeneration's
`logits[0]` for the processor-expanded input ids.
"""
from __future__ import annotations

import argparse
import logging
import os

import torch

from megamod import checkpoint, distributed
from megamod.families.factory import read_model
from megamod.models.llava import expand_image_tokens

log = logging.getLogger(__name__)


def compute_logits(ckpt: str, input_ids: list[int], tp: int = 1, pp: int = 1, ep: int = 1,
                   images_NCHW: torch.Tensor | None = None) -> torch.Tensor | None:
    """Every rank calls this; the last pipeline stage gets [S, V] fp32 logits, the others None.

    For LLaVA checkpoints, `input_ids` has one `<image>` id per image in `images_NCHW` (preprocessed)."""
    from megamod.inference import forward_logits

    _, family, dtype, cfg = read_model(ckpt)
    language, image_token_id = family.language(cfg), family.image_token_id(cfg)
    bad = [i for i in input_ids if not 0 <= i < language.vocab_size]
    if bad:
        raise ValueError(f"input ids {bad} are outside the vocabulary [0, {language.vocab_size})")
    n_placeholders = input_ids.count(image_token_id) if image_token_id is not None else 0
    n_images = 0 if images_NCHW is None else images_NCHW.shape[0]
    if n_images and image_token_id is None:
        raise ValueError(f"{ckpt} is a language model: it takes no images")
    if n_placeholders != n_images:
        raise ValueError(f"the input ids hold {n_placeholders} <image> ids (id {image_token_id}) for "
                         f"{n_images} images: give one image per <image>")
    distributed.initialize(distributed.ParallelConfig(tp=tp, pp=pp, ep=ep))
    model = family.build(cfg, params_dtype=dtype)
    if family.takes_images:
        input_ids = expand_image_tokens(input_ids, image_token_id, family.positions_per_image(cfg))
    checkpoint.load_model(model, ckpt)
    images = images_NCHW if n_images else None
    logits_BSV = forward_logits(model, torch.tensor([input_ids]), language.vocab_size, images)
    return None if logits_BSV is None else logits_BSV[0]


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids must be comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--input-ids is empty")
    return ids


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="megamod checkpoint directory")
    p.add_argument("--input-ids", required=True, type=_ids, help="comma-separated token ids, e.g. 3,17,5")
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--image", action="append", default=[],
                   help="image file for a LLaVA checkpoint, once per <image> id in --input-ids, in order")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (sparse checkpoints)")


def _load_images(ckpt: str, paths: list[str]) -> torch.Tensor:
    """CLIP preprocessing at the checkpoint's resolution: pad to square with the mean colour, resize, normalise."""
    from megamod.data.images import ImageProcessor

    _, family, _, cfg = read_model(ckpt)
    vision = family.vision(cfg)
    if vision is None:
        raise ValueError(f"{ckpt}: --image needs a model with a vision tower, this one is a {family.kind} model")
    processor = ImageProcessor(size=vision.image_size, mode="pad", mean=vision.image_mean, std=vision.image_std)
    return torch.stack([processor.load(p) for p in paths])


def run(args) -> int:
    from megatron.core import parallel_state as ps

    images_NCHW = _load_images(args.ckpt, args.image) if args.image else None
    logits_SV = compute_logits(args.ckpt, args.input_ids, args.tp, args.pp, args.ep, images_NCHW)
    if logits_SV is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(logits_SV, args.out)
        log.info("saved logits %s to %s", tuple(logits_SV.shape), args.out)
    distributed.shutdown()
    return 0
