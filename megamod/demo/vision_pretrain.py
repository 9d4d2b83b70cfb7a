"""A stand-in for CLIP's pre-training, for the demo's tiny vision tower.

LLaVA-MoD's teacher and student share a pre-trained CLIP ViT that stays frozen; none can be downloaded here, and a
randomly initialised tower gives the language model nothing to ground on (measured: a 128-dim teacher trained
600 steps with a random tower, even a trainable one, answers POPE at chance). So the demo first teaches its tower
what CLIP knows about these images: for every grid cell (one patch each), the colour and the shape of its object,
from the scenes' ground truth (scenes.jsonl), with linear heads on the features LLaVA reads (the selected layer).
The heads are dropped; the tower then stays frozen, as in the paper.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import time

import numpy as np
import torch

from megamod.data import synthetic as syn

log = logging.getLogger(__name__)
BACKGROUND = 0  # class 0 of both heads: no object on the patch


def cell_labels(objects: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(colour, shape) class per grid cell, row-major, 0 = empty. The demo's tower sees the 3 x 3 grid of a scene as
    its 3 x 3 patches (image_size = 3 x patch_size), so patch p is cell p."""
    colors, shapes = np.zeros(syn.GRID * syn.GRID, np.int64), np.zeros(syn.GRID * syn.GRID, np.int64)
    for o in objects:
        cell = o["row"] * syn.GRID + o["col"]
        colors[cell] = 1 + list(syn.COLORS).index(o["color"])
        shapes[cell] = 1 + syn.SHAPES.index(o["shape"])
    return colors, shapes


def load_scenes(data_dir: str, processor, split: str = "train"):
    """Images [N, 3, R, R] and per-cell labels [N, 9] x 2 for one split of a synthetic data set."""
    from megamod.data.images import open_rgb

    path = os.path.join(data_dir, "scenes.jsonl")
    images, colors, shapes = [], [], []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            scene = json.loads(line)
            if scene["split"] != split:
                continue
            try:
                c, s = cell_labels(scene["objects"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{line_no}: bad scene ({e!r})") from None
            images.append(processor(open_rgb(os.path.join(data_dir, scene["image"]))))
            colors.append(torch.from_numpy(c))
            shapes.append(torch.from_numpy(s))
    if not images:
        raise ValueError(f"{path} has no {split} scenes")
    return torch.stack(images), torch.stack(colors), torch.stack(shapes)


def pretrain_vision(tower, data_dir: str, steps: int = 300, batch_size: int = 64, lr: float = 2e-3,
                    seed: int = 0) -> dict:
    """Trains `tower` (CLIPVisionTower, one process) in place; returns {"loss", "color_acc", "shape_acc"} on the
    held-out eval images (cells with an object)."""
    from megamod.data.images import ImageProcessor

    cfg = tower.cfg
    if cfg.num_patches != syn.GRID * syn.GRID or cfg.select_strategy != "default":
        raise ValueError(f"the demo's vision tower must see the {syn.GRID} x {syn.GRID} grid as its patches "
                         f"(image_size = {syn.GRID} x patch_size, class token dropped); it has {cfg.num_patches}")
    processor = ImageProcessor(size=cfg.image_size, mean=cfg.image_mean, std=cfg.image_std)
    images, colors, shapes = load_scenes(data_dir, processor)
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(cfg.hidden_size, 1 + len(syn.COLORS)),
                                 "shape": torch.nn.Linear(cfg.hidden_size, 1 + len(syn.SHAPES))})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine to zero
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    rng = random.Random(seed)
    order, start = [], time.time()
    tower.train()

    def losses(x_NCHW, c_NP, s_NP):
        feats_NPH = tower(x_NCHW)
        logits_c = heads["color"](feats_NPH)
        logits_s = heads["shape"](feats_NPH)
        loss = torch.nn.functional.cross_entropy(logits_c.flatten(0, 1), c_NP.flatten()) + \
            torch.nn.functional.cross_entropy(logits_s.flatten(0, 1), s_NP.flatten())
        return loss, logits_c.argmax(-1), logits_s.argmax(-1)

    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(images)), len(images))
        idx, order = order[:batch_size], order[batch_size:]
        loss, _, _ = losses(images[idx], colors[idx], shapes[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log.info("vision pre-training step %d/%d: loss %.4f (%.1fs)", step, steps, loss.item(),
                     time.time() - start)
    tower.eval()
    images, colors, shapes = load_scenes(data_dir, processor, split="eval")
    with torch.no_grad():
        loss, pc, ps = losses(images, colors, shapes)
    fg = colors > 0
    return {"loss": loss.item(), "color_acc": (pc == colors)[fg].float().mean().item(),
            "shape_acc": (ps == shapes)[fg].float().mean().item()}
