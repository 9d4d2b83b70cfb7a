"""The data pipeline a model reads: its tokenizer, data sets and collator, checked against the model.

Shared by training and by the teacher-cache writer, so that both tokenise, template, expand images and pad the
same samples identically (the cache's rows line up with the student's answer positions only then).
"""
from __future__ import annotations

import os


def load_model_tokenizer(model, path: str | None, ckpt: str):
    """`path` or the checkpoint's tokenizer/ folder, checked against the model's vocabulary and image id."""
    from megamod.data.tokenizer import load_tokenizer

    path = path or os.path.join(ckpt, "tokenizer")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: set data.tokenizer")
    tok = load_tokenizer(path)
    if tok.vocab_size > model.language.vocab_size:
        raise ValueError(f"tokenizer {path} has {tok.vocab_size} tokens, more than the model's vocabulary "
                         f"({model.language.vocab_size})")
    if model.kind == "llava" and tok.token_to_id("<image>") != model.image_token_id:
        raise ValueError(f"tokenizer {path} has <image> at id {tok.token_to_id('<image>')}, the model reads images "
                         f"at id {model.image_token_id}")
    return tok


def build_datasets(model, tok, sources, kind: str, max_length: int, on_bad_sample: str = "error") -> list:
    """One FileDataset per source (a training.config.DataSource); every source must be of `kind`."""
    from megamod.data.datasets import FileDataset

    datasets = [FileDataset(s.path, tok, kind=s.kind or kind, image_folder=s.image_folder, template=s.template,
                            image_processor=_image_processor(model), max_length=max_length,
                            num_image_tokens=_num_image_tokens(model), on_bad_sample=on_bad_sample)
                for s in sources]
    wrong = [s.path for s, ds in zip(sources, datasets) if ds.kind != kind]
    if wrong:
        raise ValueError(f"this run reads {kind}; {wrong} are not")
    return datasets


def build_collator(model, tok, pad_to_multiple_of: int):
    from megamod.data.collate import Collator

    image_id = model.image_token_id if model.kind == "llava" else -1
    return Collator(image_id, tok.pad_id, num_image_tokens=_num_image_tokens(model),
                    pad_to_multiple_of=pad_to_multiple_of, image_size=_image_processor(model).size)


def _image_processor(model):
    from megamod.data.images import ImageProcessor

    if model.kind != "llava":
        return ImageProcessor()
    vision = model.cfg.vision
    return ImageProcessor(size=vision.image_size, mean=vision.image_mean, std=vision.image_std)


def _num_image_tokens(model) -> int:
    return model.cfg.vision.num_image_tokens if model.kind == "llava" else 1
