"""A model for one job, built on this rank's pipeline stage and loaded from its checkpoint: the student, the
online teacher, the teacher-cache writer's and the evaluator's model.

The teacher is built on the same pipeline stages as the student (its layers split the same way), with the
student's sequence-parallel setting so their activations have the same sequence layout, never expert-parallel
beyond what its own config asks, frozen, in eval mode, outside DDP and the optimizer.

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

from megamod import checkpoint, families
from megamod.families.base import ModelFamily
from megamod.families.factory import read_model

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module | None  # None: only the checkpoint's description, for checks before loading
    meta: dict
    cfg: object  # the family's config, as built (vocab_rows may widen the padded vocabulary)
    ckpt: str | None = None

    @property
    def family(self) -> ModelFamily:
        return families.get(self.meta["kind"], self.ckpt or "")

    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def language(self):
        return self.family.language(self.cfg)

    @property
    def image_token_id(self) -> int | None:
        return self.family.image_token_id(self.cfg)


def vocab_rows(*ckpts: str) -> int:
    """The padded vocabulary width that covers every checkpoint's rows: what a teacher and student share."""
    widths = []
    for c in ckpts:
        _, family, _, cfg = read_model(c)
        widths.append(family.language(cfg).padded_vocab_size)
    return max(widths)


def with_vocab_rows(cfg, rows: int, ckpt: str):
    """`cfg` built with exactly `rows` embedding and output rows; unchanged when it pads to `rows` already."""
    family = families.of_config(cfg)
    language = family.language(cfg)
    if language.padded_vocab_size == rows:
        return cfg
    if language.padded_vocab_size > rows:
        raise ValueError(f"{ckpt} pads its vocabulary to {language.padded_vocab_size} rows, more than the {rows} "
                         f"asked for: build the pair with vocab_rows(teacher, student)")
    wide = dataclasses.replace(language, vocab_pad_multiple=rows)  # ceil(vocab_size / rows) * rows == rows
    return family.with_language(cfg, wide)


def describe(ckpt: str) -> LoadedModel:
    """A checkpoint's metadata and config, no weights."""
    meta, _, _, cfg = read_model(ckpt)
    return LoadedModel(None, meta, cfg, ckpt)


def load(ckpt: str, params_dtype: torch.dtype, sequence_parallel: bool = False,
         vocab_rows: int | None = None) -> LoadedModel:
    """Build this rank's slice and fill every weight from `ckpt` (a missing or unused tensor is an error); with
    `vocab_rows`, the embedding and output layer have that many rows (past the checkpoint's: zeros)."""
    meta, family, _, cfg = read_model(ckpt)
    if vocab_rows is not None:
        cfg = with_vocab_rows(cfg, vocab_rows, ckpt)
    model = family.build(cfg, params_dtype, sequence_parallel)
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
        from megamod.loading.data import carried_tokenizer

        tokenizer = carried_tokenizer(student.ckpt)
    check_compatible(describe(ckpt), student, ckpt, tokenizer)
    return load_frozen_teacher(ckpt, params_dtype, sequence_parallel, student.language.padded_vocab_size)


def check_compatible(teacher: LoadedModel, student: LoadedModel, ckpt: str, tokenizer=None) -> None:
    """Same kind, same image placeholder, and one tokenizer: the teacher has a row for every id of the run's
    `tokenizer`, and the tokenizer the teacher carries (if any) gives those ids the same tokens."""
    from megamod.data.tokenizer import check_same_tokenizer
    from megamod.loading.data import carried_tokenizer, check_tokenizer_fits

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
