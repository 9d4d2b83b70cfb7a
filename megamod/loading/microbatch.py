"""One micro-batch as the models and losses take it, built from a collated batch; shared by training, the
teacher-cache writer and the benchmarks, so that all feed the models the same tensors."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megamod.models.common import routing_padding_mask


@dataclass
class MicroBatch:
    tokens: torch.Tensor          # int64 [B, S]
    position_ids: torch.Tensor    # int64 [B, S]
    labels: torch.Tensor          # int64 [B, S], -100 where not trained
    loss_mask: torch.Tensor       # float32 [B, S]
    images: torch.Tensor | None   # float32 [N, 3, R, R], batch-major
    num_tokens: int               # real (unpadded) tokens, for throughput
    num_images: int
    padding: torch.Tensor         # bool [B, S]: True at padding (kept out of MoE routing statistics)
    pairs: int = 0                # > 0: rows [0, pairs) chosen, [pairs, 2 pairs) rejected
    cached: object = None         # teacher_cache.reader.CachedTeacher: the offline teacher's rows, if any

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "MicroBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return dataclasses.replace(self, tokens=move(self.tokens), position_ids=move(self.position_ids),
                                   labels=move(self.labels), loss_mask=move(self.loss_mask),
                                   images=move(self.images), padding=move(self.padding),
                                   cached=None if self.cached is None else self.cached.to(device))


def _padding_BS(b) -> torch.Tensor:
    return torch.arange(b.tokens.shape[1]).unsqueeze(0) >= b.lengths.unsqueeze(1)


def from_batch(batch, takes_images: bool) -> MicroBatch:
    """A collated Batch or PairBatch -> MicroBatch (pairs concatenated, images repeated for the rejected rows).
    `takes_images`: the model's family reads images (ModelFamily.takes_images)."""
    if hasattr(batch, "chosen"):
        c, r = batch.chosen, batch.rejected
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        images = torch.cat([c.images, c.images]) if c.images.shape[0] else None
        return MicroBatch(cat(c.tokens, r.tokens), cat(c.position_ids, r.position_ids), cat(c.labels, r.labels),
                          cat(c.loss_mask, r.loss_mask), images if takes_images else None,
                          int(c.lengths.sum() + r.lengths.sum()), 0 if images is None else images.shape[0],
                          cat(_padding_BS(c), _padding_BS(r)), pairs=c.tokens.shape[0])
    images = batch.images if batch.images.shape[0] else None
    if images is not None and not takes_images:
        raise ValueError(f"a language-only model got images (samples {batch.locations[:3]})")
    return MicroBatch(batch.tokens, batch.position_ids, batch.labels, batch.loss_mask, images,
                      int(batch.lengths.sum()), 0 if images is None else images.shape[0], _padding_BS(batch))


def pad_to(mb: MicroBatch, length: int, pad_id: int) -> MicroBatch:
    """Right-pad to `length` (pipeline stages exchange one activation shape per step)."""
    extra = length - mb.seq_length
    if extra <= 0:
        return mb
    B = mb.tokens.shape[0]

    def pad(t, value):
        return torch.cat([t, t.new_full((B, extra), value)], dim=1)

    positions = torch.arange(length).expand(B, length).contiguous()
    return dataclasses.replace(mb, tokens=pad(mb.tokens, pad_id), position_ids=positions, labels=pad(mb.labels, -100),
                               loss_mask=pad(mb.loss_mask, 0.0), padding=pad(mb.padding, True),
                               cached=None if mb.cached is None else mb.cached.pad_to(length))


def run_model(model, mb: MicroBatch, family, image_features=None):
    """The model's forward (its ModelFamily's signature) on a micro-batch. Sparse models also get the padding mask,
    so that padding does not count in the load-balancing loss. `image_features`: the vision tower's output for
    `mb.images` (a tower shared by teacher and student)."""
    padding_BS = routing_padding_mask(model.config, mb.padding)
    return family.forward(model, mb.tokens, mb.position_ids, mb.images, padding_BS, image_features)
