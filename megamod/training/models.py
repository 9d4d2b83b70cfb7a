"""Student and teacher for one training job: built on this rank's pipeline stage, loaded from checkpoints.

The teacher is built on the same pipeline stages as the student (its layers split the same way), with the
student's sequence-parallel setting so their activations have the same sequence layout, never expert-parallel
beyond what its own config asks, frozen, in eval mode, outside DDP and the optimizer. `DistillPair` lets
Megatron's pipeline schedules move both models' activations between stages as one tensor: [student | teacher]
along the hidden dimension. When both hold the same frozen CLIP tower (checked by content: shared_vision_tower), it
runs once per micro-batch for both.

Vocabulary: the losses run over the tokenizer's ids, not over the models' rows. Teacher and student may have
different row counts over one tokenizer (Qwen2-7B has 152064 rows, Qwen2-0.5B 151936, for 151646 ids): both are
built with the wider padded width (megatron loads embeddings and output layers at any width, zero-filling rows the
checkpoint lacks), so their tensor-parallel logit shards cover the same ids. Different tokenizers are refused.
"""
from __future__ import annotations

import dataclasses
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
    model: torch.nn.Module | None  # None: only the checkpoint's description, for checks before loading
    meta: dict
    cfg: LanguageModelConfig | LlavaConfig  # as built (vocab_rows may widen the padded vocabulary)
    ckpt: str | None = None

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def language(self) -> LanguageModelConfig:
        return self.cfg.language if self.kind == "llava" else self.cfg

    @property
    def image_token_id(self) -> int | None:
        return self.cfg.image_token_id if self.kind == "llava" else None


def vocab_rows(*ckpts: str) -> int:
    """The padded vocabulary width that covers every checkpoint's rows: what a teacher and student share."""
    return max(read_model(c, "loaded as a model (language or llava)")[4].padded_vocab_size for c in ckpts)


def with_vocab_rows(cfg, kind: str, rows: int, ckpt: str):
    """`cfg` built with exactly `rows` embedding and output rows; unchanged when it pads to `rows` already."""
    language = cfg.language if kind == "llava" else cfg
    if language.padded_vocab_size == rows:
        return cfg
    if language.padded_vocab_size > rows:
        raise ValueError(f"{ckpt} pads its vocabulary to {language.padded_vocab_size} rows, more than the {rows} "
                         f"asked for: build the pair with vocab_rows(teacher, student)")
    wide = dataclasses.replace(language, vocab_pad_multiple=rows)  # ceil(vocab_size / rows) * rows == rows
    return dataclasses.replace(cfg, language=wide) if kind == "llava" else wide


def describe(ckpt: str) -> LoadedModel:
    """A checkpoint's metadata and config, no weights."""
    meta, _, _, cfg, _ = read_model(ckpt, "loaded as a model (language or llava)")
    return LoadedModel(None, meta, cfg, ckpt)


def load(ckpt: str, params_dtype: torch.dtype, sequence_parallel: bool = False,
         vocab_rows: int | None = None) -> LoadedModel:
    """Build this rank's slice and fill every weight from `ckpt` (a missing or unused tensor is an error); with
    `vocab_rows`, the embedding and output layer have that many rows (past the checkpoint's: zeros)."""
    meta, kind, _, cfg, _ = read_model(ckpt, "loaded as a model (language or llava)")
    if vocab_rows is not None:
        cfg = with_vocab_rows(cfg, kind, vocab_rows, ckpt)
    model = build_model(cfg, kind, params_dtype, sequence_parallel)
    checkpoint.load_model(model, ckpt)
    return LoadedModel(model, meta, cfg, ckpt)


def check_weights_loaded(model: torch.nn.Module, ckpt: str) -> None:
    """A teacher of all-zero weights teaches nothing: refuse it (e.g. a checkpoint written before training)."""
    zero = [n for n, p in model.named_parameters() if p.dim() >= 2 and not torch.any(p != 0)]
    if zero:
        raise ValueError(f"teacher {ckpt}: weight matrices {zero[:5]}{' ...' if len(zero) > 5 else ''} are all "
                         f"zero on this rank: the teacher checkpoint holds no trained weights")


def load_frozen_teacher(ckpt: str, params_dtype: torch.dtype, sequence_parallel: bool = False,
                        vocab_rows: int | None = None) -> LoadedModel:
    """A trained model, frozen and in eval mode (the online teacher, and the teacher-cache writer's model)."""
    meta = checkpoint.read_metadata(ckpt)
    if "init" in (meta.get("source") or {}):
        raise ValueError(f"teacher {ckpt} holds freshly initialised (random) weights, not a trained model")
    teacher = load(ckpt, params_dtype, sequence_parallel, vocab_rows)
    check_weights_loaded(teacher.model, ckpt)
    teacher.model.requires_grad_(False)
    teacher.model.eval()
    return teacher


def load_teacher(ckpt: str, student: LoadedModel, params_dtype: torch.dtype, sequence_parallel: bool,
                 tokenizer=None) -> LoadedModel:
    """The online teacher, checked against the student and the run's `tokenizer` (default: the one the student
    carries) before its weights load, and built at the student's padded vocabulary width."""
    if tokenizer is None and student.ckpt is not None:
        from megamod.training.data_setup import carried_tokenizer

        tokenizer = carried_tokenizer(student.ckpt)
    check_compatible(describe(ckpt), student, ckpt, tokenizer)
    return load_frozen_teacher(ckpt, params_dtype, sequence_parallel, student.language.padded_vocab_size)


def open_cache(directory: str, tokenizer, pairs: bool):
    """A teacher cache of the kind the stage reads (pairs or conversations), written with the run's tokenizer."""
    from megamod.data.tokenizer import vocabulary_fingerprint
    from megamod.teacher_cache.format import CacheError
    from megamod.teacher_cache.reader import TeacherCache

    cache = TeacherCache(directory)
    kind = "pairs" if pairs else "conversations"
    if cache.kind != kind:
        raise CacheError(f"teacher cache {directory} holds {cache.kind}; this stage trains on {kind}")
    fingerprint = vocabulary_fingerprint(tokenizer)
    written = cache.manifest.get("tokenizer") or {}  # absent in caches written before it was recorded
    if cache.vocab_size != tokenizer.vocab_size or written.get("sha256", fingerprint) != fingerprint:
        raise CacheError(f"teacher cache {directory} was written with tokenizer {written.get('path', '?')} "
                         f"({cache.vocab_size} ids), the student reads tokenizer {tokenizer.path} "
                         f"({tokenizer.vocab_size} ids): different tokenizers; re-write the cache with the student's")
    return cache


def check_compatible(teacher: LoadedModel, student: LoadedModel, ckpt: str, tokenizer=None) -> None:
    """Same kind, same image placeholder, and one tokenizer: the teacher has a row for every id of the run's
    `tokenizer`, and the tokenizer the teacher carries (if any) gives those ids the same tokens."""
    from megamod.data.tokenizer import check_same_tokenizer
    from megamod.training.data_setup import carried_tokenizer, check_tokenizer_fits

    if teacher.kind != student.kind:
        raise ValueError(f"teacher {ckpt} is a {teacher.kind} model, the student a {student.kind} model")
    if teacher.image_token_id != student.image_token_id:
        raise ValueError(f"teacher {ckpt} reads images at token {teacher.image_token_id}, the student at "
                         f"{student.image_token_id}")
    if tokenizer is None:
        return
    check_tokenizer_fits(teacher, tokenizer, f"teacher {ckpt}")
    carried = carried_tokenizer(ckpt)
    if carried is None:
        log.warning("teacher %s carries no tokenizer/: its ids are taken to mean what %s says (only its %d rows "
                    "are checked)", ckpt, tokenizer.path, teacher.language.vocab_size)
        return
    check_same_tokenizer(carried, tokenizer, f"teacher {ckpt}:", "the student's")


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


def _local_tower_difference(student_model, teacher_model) -> str | None:
    """Why this rank's student and teacher towers cannot share one forward (None: they can, or neither is here)."""
    student, teacher = unwrap(student_model), unwrap(teacher_model)
    s, t = getattr(student, "vision_model", None), getattr(teacher, "vision_model", None)
    if s is None and t is None:
        return None  # a later pipeline stage: the towers live on the first
    if s is None or t is None:
        return "only one model has a vision tower on this rank"
    if s.cfg != t.cfg:
        return "the vision configs differ"
    for name, tower in (("student", s), ("teacher", t)):
        if any(p.requires_grad for p in tower.parameters()):
            return f"the {name}'s vision tower trains"
        if tower.config.hidden_dropout or tower.config.attention_dropout:
            return f"the {name}'s vision tower has dropout"
    if [type(m) for m in s.modules()] != [type(m) for m in t.modules()] \
            or s.config.params_dtype != t.config.params_dtype:
        return "the vision towers are built differently"
    a, b = dict(s.named_parameters()), dict(t.named_parameters())
    a.update(s.named_buffers())
    b.update(t.named_buffers())
    if a.keys() != b.keys():
        return "the vision towers hold different tensors"
    for name, x in a.items():
        y = b[name]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return f"the vision towers' weights differ ({name})"
    return None


def shared_vision_tower(student_model, teacher_model) -> tuple[bool, torch.nn.Module | None, str]:
    """Whether the two LLaVA models' CLIP towers can run as one (once per micro-batch, the features going to both
    adapters), the tower to run on this rank, and why (or why not). Every rank calls this (one all-reduce).

    Shared when the student's and the teacher's towers are the same: same vision config, bitwise-equal weights
    (each rank compares its own tensor-parallel shard; all must agree), both frozen and without dropout, so that
    the student's tower computes exactly what the teacher's does on the micro-batch's one pixel tensor (LLaVA-MoD's
    case: the student starts from the teacher's CLIP and neither trains it). The tower returned is the teacher's;
    None on ranks without one (later pipeline stages) or when not shared."""
    from megamod.distributed import collective_device

    reason = _local_tower_difference(student_model, teacher_model)
    ok = torch.tensor([0 if reason else 1], dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if not int(ok):
        return False, None, reason or "the vision towers differ on another rank"
    return True, getattr(unwrap(teacher_model), "vision_model", None), \
        "same vision config and weights, both frozen, no dropout"
