"""What one micro-batch computes in each stage: the forward of student (and teacher) and the weighted losses.

Runs inside Megatron's pipeline schedule. On every stage the student runs its layers and, when the stage has a
teacher, the teacher runs its own slice of the same micro-batch under no_grad; intermediate stages send both
activations on together (DistillPair). The last stage turns both models' vocabulary-parallel logits into the loss
without gathering the vocabulary. Pairs (preference stage) run as one batch of 2B rows: chosen rows, then rejected.
With a cached teacher (`MicroBatch.cached`) no teacher runs: KD is the top-k bucketed KL (losses/topk_kd.py) and
the preference reference is the cached pair of sequence log-probs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megamod.losses.ce import cross_entropy_BS, masked_mean
from megamod.losses.chunked import DEFAULT_CHUNK_TOKENS, chunked_losses_BS, chunked_topk_kd_loss_BS
from megamod.losses.kd import kd_loss_BS
from megamod.losses.preference import preference_loss, sequence_logprobs_B
from megamod.losses.topk_kd import topk_kd_loss_BS


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


def from_batch(batch, llava: bool) -> MicroBatch:
    """A collated Batch or PairBatch -> MicroBatch (pairs concatenated, images repeated for the rejected rows)."""
    if hasattr(batch, "chosen"):
        c, r = batch.chosen, batch.rejected
        cat = lambda a, b: torch.cat([a, b])  # noqa: E731
        images = torch.cat([c.images, c.images]) if c.images.shape[0] else None
        return MicroBatch(cat(c.tokens, r.tokens), cat(c.position_ids, r.position_ids), cat(c.labels, r.labels),
                          cat(c.loss_mask, r.loss_mask), images if llava else None,
                          int(c.lengths.sum() + r.lengths.sum()), 0 if images is None else images.shape[0],
                          cat(_padding_BS(c), _padding_BS(r)), pairs=c.tokens.shape[0])
    images = batch.images if batch.images.shape[0] else None
    if images is not None and not llava:
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


def run_model(model, mb: MicroBatch, llava: bool, image_features=None):
    """Sparse models also get the padding mask, so that padding does not count in the load-balancing loss.
    `image_features`: the vision tower's output for `mb.images` (a tower shared by teacher and student)."""
    from megamod.models.moe import routing_padding_mask

    padding_BS = routing_padding_mask(model.config, mb.padding)
    if llava:
        extra = {} if image_features is None else {"image_features": image_features}
        return model(mb.tokens, mb.position_ids, mb.images, padding_mask=padding_BS, **extra)
    return model(mb.tokens, mb.position_ids, None, padding_mask=padding_BS)


@dataclass
class Objective:
    """The losses of a stage. `weights`: loss name -> weight (ce, kd, preference). `vocab_size`: the tokenizer's ids;
    logit columns past it (padding rows) never reach a loss. Teacher and student logits come at one padded width
    (training.models builds the pair so), so that each TP rank holds the same ids of both.

    `chunk_tokens` > 0 (the default): the losses run over that many tokens at a time (losses/chunked.py: one pass over
    the student's logits for KD and the label log-probs of CE and the preference loss, one gradient buffer, no fp32
    copy of the whole vocabulary); 0: the reference losses (kd.py, ce.py, preference.py, topk_kd.py)."""

    weights: dict
    vocab_size: int
    llava: bool
    kd_mode: str = "forward"
    temperature: float = 1.0
    preference: str = "dpo"
    beta: float = 0.1
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def loss(self, student_BSv: torch.Tensor, teacher_BSv: torch.Tensor | None, mb: MicroBatch):
        if self.chunk_tokens:
            return self._chunked_loss(student_BSv, teacher_BSv, mb)
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            rows = slice(0, mb.pairs) if mb.pairs else slice(None)  # pairs: the chosen answers only
            parts["ce"] = masked_mean(cross_entropy_BS(student_BSv[rows], mb.labels[rows], self.vocab_size),
                                      mb.loss_mask[rows])
        if "kd" in self.weights and mb.cached is not None:
            c = mb.cached
            parts["kd"] = masked_mean(topk_kd_loss_BS(student_BSv, c.ids_BSK, c.logprobs_BSK, c.log_tail_BS,
                                                      self.vocab_size), mb.loss_mask)
        elif "kd" in self.weights:
            parts["kd"] = masked_mean(kd_loss_BS(student_BSv, teacher_BSv, self.vocab_size, self.kd_mode,
                                                 self.temperature), mb.loss_mask)
        if "preference" in self.weights:
            if not mb.pairs:
                raise ValueError("the preference loss needs preference pairs (data kind: pairs)")
            policy_2B = sequence_logprobs_B(student_BSv, mb.labels, mb.loss_mask, self.vocab_size)
            if mb.cached is not None:
                reference_2B = mb.cached.reference_2B
            else:
                with torch.no_grad():
                    reference_2B = sequence_logprobs_B(teacher_BSv, mb.labels, mb.loss_mask, self.vocab_size)
            P = mb.pairs
            loss_N, metrics = preference_loss(self.preference, policy_2B[:P], policy_2B[P:], reference_2B[:P],
                                              reference_2B[P:], beta=self.beta)
            parts["preference"] = loss_N.mean()
        return self._total(parts, metrics)

    def _chunked_loss(self, student_BSv: torch.Tensor, teacher_BSv: torch.Tensor | None, mb: MicroBatch):
        """loss() on the chunked losses: KD and the label log-probs (CE, preference) in one pass over the student."""
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        online_kd = "kd" in self.weights and mb.cached is None
        need_logp = "ce" in self.weights or "preference" in self.weights
        if "preference" in self.weights and not mb.pairs:
            raise ValueError("the preference loss needs preference pairs (data kind: pairs)")
        kd_BS = logp_BS = None
        if online_kd or need_logp:
            kd_BS, logp_BS = chunked_losses_BS(student_BSv, self.vocab_size,
                                               teacher_logits_BSv=teacher_BSv if online_kd else None,
                                               labels_BS=mb.labels if need_logp else None, mode=self.kd_mode,
                                               temperature=self.temperature, chunk_tokens=self.chunk_tokens)
        if "ce" in self.weights:
            rows = slice(0, mb.pairs) if mb.pairs else slice(None)  # pairs: the chosen answers only
            parts["ce"] = masked_mean(-logp_BS[rows], mb.loss_mask[rows])
        if "kd" in self.weights and mb.cached is not None:
            c = mb.cached
            parts["kd"] = masked_mean(chunked_topk_kd_loss_BS(student_BSv, c.ids_BSK, c.logprobs_BSK, c.log_tail_BS,
                                                              self.vocab_size, self.chunk_tokens), mb.loss_mask)
        elif online_kd:
            parts["kd"] = masked_mean(kd_BS, mb.loss_mask)
        if "preference" in self.weights:
            mask_BS = mb.loss_mask.to(torch.bool).to(logp_BS.dtype)
            policy_2B = (logp_BS * mask_BS).sum(-1)
            if mb.cached is not None:
                reference_2B = mb.cached.reference_2B
            else:
                with torch.no_grad():
                    ref_BS = chunked_losses_BS(teacher_BSv, self.vocab_size, labels_BS=mb.labels,
                                               chunk_tokens=self.chunk_tokens)[1]
                    reference_2B = (ref_BS * mask_BS).sum(-1)
            P = mb.pairs
            loss_N, metrics = preference_loss(self.preference, policy_2B[:P], policy_2B[P:], reference_2B[:P],
                                              reference_2B[P:], beta=self.beta)
            parts["preference"] = loss_N.mean()
        return self._total(parts, metrics)

    def _total(self, parts: dict, metrics: dict):
        total = sum(self.weights[k] * v for k, v in parts.items())
        report = {"loss": total.detach().clone(), **{k: v.detach().clone() for k, v in parts.items()},
                  **{k: torch.as_tensor(v).detach().float().clone() for k, v in metrics.items()}}
        return total, report

    def forward_step(self, student, teacher=None, pair=None, shared_tower=None):
        """A megatron forward_step_func. `student`: the model the schedule runs (DDP-wrapped); `teacher`: the
        frozen teacher or None; `pair`: the DistillPair when pipeline stages exchange both activations;
        `shared_tower`: the one frozen vision tower teacher and student share (training/models.py
        shared_vision_tower), run once per micro-batch under no_grad, its features handed to both adapters."""
        from megatron.core import parallel_state as ps

        last = ps.is_pipeline_last_stage()

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            features = None
            if shared_tower is not None and mb.images is not None:
                with torch.no_grad():
                    features = shared_tower(mb.images)
            student_out = run_model(student, mb, self.llava, features)
            teacher_out = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = run_model(teacher, mb, self.llava, features)
            if not last and pair is not None:
                return pair.join(student_out, teacher_out), None

            def loss_func(student_BSv):
                return self.loss(student_BSv, teacher_out, mb)

            return student_out, loss_func

        return forward_step
