"""What one micro-batch computes in each stage: the forward of student (and teacher) and the weighted losses.

Runs inside Megatron's pipeline schedule. On every stage the student runs its layers and, when the stage has a
teacher, the teacher runs its own slice of the same micro-batch under no_grad; intermediate stages send both
activations on together (DistillPair). The last stage turns both models' vocabulary-parallel logits into the loss
without gathering the vocabulary. Pairs (preference stage) run as one batch of 2B rows: chosen rows, then rejected.
With a cached teacher (`MicroBatch.cached`) no teacher runs: KD is the top-k bucketed KL (losses/topk_kd.py) and
the preference reference is the cached pair of sequence log-probs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megamod.losses.ce import cross_entropy_BS, masked_mean
from megamod.losses.chunked import DEFAULT_CHUNK_TOKENS, chunked_losses_BS, chunked_topk_kd_loss_BS
from megamod.losses.kd import kd_loss_BS
from megamod.losses.preference import preference_loss, sequence_logprobs_B
from megamod.loading.microbatch import MicroBatch, run_model
from megamod.losses.topk_kd import topk_kd_loss_BS


@dataclass
class Objective:
    """The losses of a stage. `weights`: loss name -> weight (ce, kd, preference). `vocab_size`: the tokenizer's ids;
    logit columns past it (padding rows) never reach a loss. Teacher and student logits come at one padded width
    (loading.models builds the pair so), so that each TP rank holds the same ids of both.

    `chunk_tokens` > 0 (the default): the losses run over that many tokens at a time (losses/chunked.py: one pass over
    the student's logits for KD and the label log-probs of CE and the preference loss, one gradient buffer, no fp32
    copy of the whole vocabulary); 0: the reference losses (kd.py, ce.py, preference.py, topk_kd.py)."""

    weights: dict
    vocab_size: int
    family: object  # the models' ModelFamily (student and teacher are of one family)
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
        if "kd" in self.weights and _topk(mb) is not None:
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
            reference_2B = _reference(mb)
            if reference_2B is None:
                reference_2B = self.reference_2B(teacher_BSv, mb)
            P = mb.pairs
            loss_N, metrics = preference_loss(self.preference, policy_2B[:P], policy_2B[P:], reference_2B[:P],
                                              reference_2B[P:], beta=self.beta)
            parts["preference"] = loss_N.mean()
        return self._total(parts, metrics)

    def _chunked_loss(self, student_BSv: torch.Tensor, teacher_BSv: torch.Tensor | None, mb: MicroBatch):
        """loss() on the chunked losses: KD and the label log-probs (CE, preference) in one pass over the student."""
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        online_kd = "kd" in self.weights and _topk(mb) is None
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
        if "kd" in self.weights and _topk(mb) is not None:
            c = mb.cached
            parts["kd"] = masked_mean(chunked_topk_kd_loss_BS(student_BSv, c.ids_BSK, c.logprobs_BSK, c.log_tail_BS,
                                                              self.vocab_size, self.chunk_tokens), mb.loss_mask)
        elif online_kd:
            parts["kd"] = masked_mean(kd_BS, mb.loss_mask)
        if "preference" in self.weights:
            mask_BS = mb.loss_mask.to(torch.bool).to(logp_BS.dtype)
            policy_2B = (logp_BS * mask_BS).sum(-1)
            reference_2B = _reference(mb)
            if reference_2B is None:
                reference_2B = self.reference_2B(teacher_BSv, mb)
            P = mb.pairs
            loss_N, metrics = preference_loss(self.preference, policy_2B[:P], policy_2B[P:], reference_2B[:P],
                                              reference_2B[P:], beta=self.beta)
            parts["preference"] = loss_N.mean()
        return self._total(parts, metrics)

    def reference_2B(self, teacher_BSv: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        """The teacher's log-probs of each pair row's answer [2B] (the preference loss's reference), computed as
        the loss computes the student's (chunked or not)."""
        with torch.no_grad():
            if not self.chunk_tokens:
                return sequence_logprobs_B(teacher_BSv, mb.labels, mb.loss_mask, self.vocab_size)
            ref_BS = chunked_losses_BS(teacher_BSv, self.vocab_size, labels_BS=mb.labels,
                                       chunk_tokens=self.chunk_tokens)[1]
            return (ref_BS * mb.loss_mask.to(torch.bool).to(ref_BS.dtype)).sum(-1)

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
            student_out = run_model(student, mb, self.family, features)
            teacher_out = _logits(mb)  # a teacher on its own ranks sent them (teacher.send: full)
            if teacher is not None:
                with torch.no_grad():
                    teacher_out = run_model(teacher, mb, self.family, features)
            if not last and pair is not None:
                return pair.join(student_out, teacher_out), None

            def loss_func(student_BSv):
                return self.loss(student_BSv, teacher_out, mb)

            return student_out, loss_func

        return forward_step


def _topk(mb: MicroBatch):
    """The teacher's top-k rows (a cache, or a teacher on its own ranks), None when it runs in this job or sent its
    full logits."""
    return mb.cached if mb.cached is not None and mb.cached.ids_BSK is not None else None


def _reference(mb: MicroBatch):
    return mb.cached.reference_2B if mb.cached is not None else None


def _logits(mb: MicroBatch):
    return mb.cached.logits_BSv if mb.cached is not None else None
