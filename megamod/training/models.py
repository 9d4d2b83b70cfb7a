"""Student and teacher for one training job: built on this rank's pipeline stage, loaded from checkpoints.

The teacher is built on the same pipeline stages as the student (its layers split the same way), with the
student's sequence-parallel setting so their activations have the same sequence layout, never expert-parallel
beyond what its own config asks, frozen, in eval mode, outside DDP and the optimizer. `DistillPair` lets
Megatron's pipeline schedules move both models' activations between stages as one tensor: [student | teacher]
along the hidden dimension.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from megamod import checkpoint
from megamod.models.factory import build_model, read_model
from megamod.models.language import LanguageModelConfig
from megamod.models.llava import LlavaConfig

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict
    cfg: LanguageModelConfig | LlavaConfig

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def language(self) -> LanguageModelConfig:
        return self.cfg.language if self.kind == "llava" else self.cfg

    @property
    def image_token_id(self) -> int | None:
        return self.cfg.image_token_id if self.kind == "llava" else None


def load(ckpt: str, params_dtype: torch.dtype, sequence_parallel: bool = False) -> LoadedModel:
    """Build this rank's slice and fill every weight from `ckpt` (a missing or unused tensor is an error)."""
    meta, kind, _, cfg, _ = read_model(ckpt, "loaded as a model (language or llava)")
    model = build_model(cfg, kind, params_dtype, sequence_parallel)
    checkpoint.load_model(model, ckpt)
    return LoadedModel(model, meta, cfg)


def check_weights_loaded(model: torch.nn.Module, ckpt: str) -> None:
    """A teacher of all-zero weights teaches nothing: refuse it (e.g. a checkpoint written before training)."""
    zero = [n for n, p in model.named_parameters() if p.dim() >= 2 and not torch.any(p != 0)]
    if zero:
        raise ValueError(f"teacher {ckpt}: weight matrices {zero[:5]}{' ...' if len(zero) > 5 else ''} are all "
                         f"zero on this rank: the teacher checkpoint holds no trained weights")


def load_frozen_teacher(ckpt: str, params_dtype: torch.dtype, sequence_parallel: bool = False) -> LoadedModel:
    """A trained model, frozen and in eval mode (the online teacher, and the teacher-cache writer's model)."""
    meta = checkpoint.read_metadata(ckpt)
    if "init" in (meta.get("source") or {}):
        raise ValueError(f"teacher {ckpt} holds freshly initialised (random) weights, not a trained model")
    teacher = load(ckpt, params_dtype, sequence_parallel)
    check_weights_loaded(teacher.model, ckpt)
    teacher.model.requires_grad_(False)
    teacher.model.eval()
    return teacher


def load_teacher(ckpt: str, student: LoadedModel, params_dtype: torch.dtype, sequence_parallel: bool) -> LoadedModel:
    teacher = load_frozen_teacher(ckpt, params_dtype, sequence_parallel)
    check_compatible(teacher, student, ckpt)
    return teacher


def open_cache(directory: str, student: LoadedModel, pairs: bool):
    """A teacher cache of the kind the stage reads (pairs or conversations), for the student's vocabulary."""
    from megamod.teacher_cache.format import CacheError
    from megamod.teacher_cache.reader import TeacherCache

    cache = TeacherCache(directory)
    kind = "pairs" if pairs else "conversations"
    if cache.kind != kind:
        raise CacheError(f"teacher cache {directory} holds {cache.kind}; this stage trains on {kind}")
    if cache.vocab_size != student.language.vocab_size:
        raise CacheError(f"teacher cache {directory} has a vocabulary of {cache.vocab_size} tokens, the student "
                         f"{student.language.vocab_size}: distillation needs one tokenizer")
    return cache


def check_compatible(teacher: LoadedModel, student: LoadedModel, ckpt: str) -> None:
    """Same tokenizer vocabulary, same image placeholder, and (under TP) vocabulary shards that line up."""
    from megatron.core import parallel_state as ps

    if teacher.kind != student.kind:
        raise ValueError(f"teacher {ckpt} is a {teacher.kind} model, the student a {student.kind} model")
    tv, sv = teacher.language.vocab_size, student.language.vocab_size
    if tv != sv:
        raise ValueError(f"teacher {ckpt} has a vocabulary of {tv} tokens, the student {sv}: distillation needs one "
                         f"tokenizer (the KD vocabulary is the true vocabulary, padding rows excluded)")
    if teacher.image_token_id != student.image_token_id:
        raise ValueError(f"teacher {ckpt} reads images at token {teacher.image_token_id}, the student at "
                         f"{student.image_token_id}")
    tp = ps.get_tensor_model_parallel_world_size()
    tpad, spad = teacher.language.padded_vocab_size, student.language.padded_vocab_size
    if tp > 1 and tpad != spad:
        raise ValueError(f"teacher {ckpt} pads its vocabulary to {tpad} rows and the student to {spad}: under TP={tp} "
                         f"their logit shards would cover different token ids; convert both with the same "
                         f"vocab_pad_multiple")


def unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class DistillPair:
    """What the pipeline schedule sees when a teacher rides along: the student's config (loss scaling, grad sync),
    and one input tensor per stage that carries both models' activations."""

    def __init__(self, student_ddp, teacher):
        self.student, self.teacher = student_ddp, teacher
        self.config = student_ddp.config
        self.model_type = unwrap(student_ddp).model_type
        self.student_hidden = self.config.hidden_size
        self.teacher_hidden = teacher.config.hidden_size

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        if tensor is None:
            unwrap(self.student).set_input_tensor(None)
            self.teacher.set_input_tensor(None)
            return
        unwrap(self.student).set_input_tensor(tensor[..., : self.student_hidden])
        self.teacher.set_input_tensor(tensor[..., self.student_hidden:].detach())

    def join(self, student_SBH: torch.Tensor, teacher_SBH: torch.Tensor) -> torch.Tensor:
        return torch.cat([student_SBH, teacher_SBH.detach().to(student_SBH.dtype)], dim=-1)

    def adjust_tensor_shapes(self, recv_shapes, send_shapes):
        def widen(shapes):
            return [(*s[:-1], self.student_hidden + self.teacher_hidden) for s in shapes]

        return widen(recv_shapes), widen(send_shapes)
