"""Samples -> the tensors the models and losses take.

The sequence is the one the language model runs on: each `<image>` id is repeated `num_image_tokens` times (576 for
CLIP-336/14), as transformers' LlavaProcessor does, so the model replaces the positions `tokens_BL == image_id`, in
row-major order, with the N images' projected features ([N * num_image_tokens, H], image n belonging to sample
`image_sample_index[n]`). Labels and loss mask are built after this expansion, so the next-token shift is right at
image boundaries too (with the plain template the last image position predicts the caption's first token).
Rows are right-padded to L, the longest expanded row rounded up to `pad_to_multiple_of` (tensor parallelism with
sequence parallelism needs L divisible by TP): padding has pad ids, label -100 and loss mask 0.
Preference pairs give a PairBatch: chosen and rejected padded to the same L (the trainer may concatenate them) and
sharing one images tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from megamod.data.datasets import BadSample, PairSample, Sample, Skipped
from megamod.data.templates import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    tokens: torch.Tensor              # int64 [B, L], image positions hold image_id
    labels: torch.Tensor              # int64 [B, L]: token to predict at each position, or -100
    loss_mask: torch.Tensor           # float32 [B, L]: 1 where labels is trained
    position_ids: torch.Tensor        # int64 [B, L]
    lengths: torch.Tensor             # int64 [B]: real length of each row; positions beyond are padding
    images: torch.Tensor              # float32 [N, 3, R, R]
    image_sample_index: torch.Tensor  # int64 [N]: the row each image belongs to
    sample_ids: list = field(default_factory=list)
    locations: list = field(default_factory=list)
    skipped: list[BadSample] = field(default_factory=list)  # left out of this batch (on_bad_sample="skip")
    num_requested: int = 0            # samples drawn for this batch, skipped ones included

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]


@dataclass
class PairBatch:
    chosen: Batch
    rejected: Batch
    skipped: list[BadSample] = field(default_factory=list)
    num_requested: int = 0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Collator:
    def __init__(self, image_token_id: int, pad_id: int, *, num_image_tokens: int = 1, pad_to_multiple_of: int = 1,
                 image_size: int = 336):
        if num_image_tokens < 1 or pad_to_multiple_of < 1:
            raise ValueError("num_image_tokens and pad_to_multiple_of must be >= 1")
        self.image_token_id, self.pad_id = image_token_id, pad_id
        self.num_image_tokens, self.multiple, self.image_size = num_image_tokens, pad_to_multiple_of, image_size

    def expand(self, encoded: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [T], targets [T]) with every image id repeated num_image_tokens times."""
        reps = np.where(encoded.tokens == self.image_token_id, self.num_image_tokens, 1)
        return np.repeat(encoded.tokens, reps), np.repeat(encoded.targets, reps)

    def expanded_length(self, encoded: Encoded) -> int:
        return len(encoded.tokens) + int((encoded.tokens == self.image_token_id).sum()) * (self.num_image_tokens - 1)

    def _rows(self, encodeds: list[Encoded], length: int, meta: dict) -> Batch:
        B = len(encodeds)
        tokens_BL = torch.full((B, length), self.pad_id, dtype=torch.int64)
        labels_BL = torch.full((B, length), IGNORE_INDEX, dtype=torch.int64)
        lengths_B = torch.zeros(B, dtype=torch.int64)
        for b, enc in enumerate(encodeds):
            tokens_T, targets_T = self.expand(enc)
            T = len(tokens_T)
            tokens_BL[b, :T] = torch.from_numpy(tokens_T)
            labels_BL[b, :T - 1] = torch.from_numpy(np.where(targets_T[1:], tokens_T[1:], IGNORE_INDEX))
            lengths_B[b] = T
        position_ids_BL = torch.arange(length, dtype=torch.int64).expand(B, length).contiguous()
        return Batch(tokens_BL, labels_BL, (labels_BL != IGNORE_INDEX).float(), position_ids_BL, lengths_B, **meta)

    def _images(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        for item in items:
            text = item.text if isinstance(item, Sample) else item.chosen
            found = int((text.tokens == self.image_token_id).sum())
            if found != item.images.shape[0]:
                raise ValueError(f"{item.location}: {found} image tokens for {item.images.shape[0]} images")
        if not items or all(item.images.shape[0] == 0 for item in items):
            return torch.zeros(0, 3, self.image_size, self.image_size), torch.zeros(0, dtype=torch.int64)
        images_NCHW = torch.cat([item.images for item in items])
        index_N = torch.cat([torch.full((item.images.shape[0],), b, dtype=torch.int64) for b, item in enumerate(items)])
        return images_NCHW, index_N

    def __call__(self, items: list) -> Batch | PairBatch:
        skipped = [item.bad for item in items if isinstance(item, Skipped)]
        kept = [item for item in items if not isinstance(item, Skipped)]
        pairs = [isinstance(item, PairSample) for item in kept]
        if any(pairs) and not all(pairs):
            raise ValueError("a batch mixes preference pairs with conversations")
        images_NCHW, index_N = self._images(kept)
        meta = dict(images=images_NCHW, image_sample_index=index_N, sample_ids=[i.sample_id for i in kept],
                    locations=[i.location for i in kept])
        if any(pairs):
            chosen, rejected = [i.chosen for i in kept], [i.rejected for i in kept]
            length = _round_up(max(self.expanded_length(e) for e in chosen + rejected), self.multiple)
            return PairBatch(self._rows(chosen, length, meta), self._rows(rejected, length, meta), skipped, len(items))
        length = _round_up(max((self.expanded_length(i.text) for i in kept), default=0), self.multiple)
        return self._rows([i.text for i in kept], length, {**meta, "skipped": skipped, "num_requested": len(items)})
