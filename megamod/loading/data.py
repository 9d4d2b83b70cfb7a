"""The data pipeline a model reads: its tokenizer, data sets and collator, checked against the model.

Shared by training and by the teacher-cache writer, so that both tokenise, template, expand images and pad the
same samples identically (the cache's rows line up with the student's answer positions only then).
"""
from __future__ import annotations

import os


def carried_tokenizer(ckpt: str):
    """The tokenizer a checkpoint carries in its tokenizer/ folder (conversion and training copy it), or None."""
    from megamod.data.tokenizer import load_tokenizer

    path = os.path.join(ckpt, "tokenizer")
    return load_tokenizer(path) if os.path.exists(path) else None


def load_run_tokenizer(path: str | None, ckpt: str):
    """`path` (e.g. data.tokenizer) or the tokenizer `ckpt` carries. Both present: they must agree on every id they
    share (`path` may extend it, e.g. with <image> at a padding row)."""
    from megamod.data.tokenizer import check_same_tokenizer, load_tokenizer

    carried = carried_tokenizer(ckpt)
    if path is None:
        if carried is None:
            raise FileNotFoundError(f"no tokenizer at {os.path.join(ckpt, 'tokenizer')}: set data.tokenizer")
        return carried
    tok = load_tokenizer(path)
    if carried is not None:
        check_same_tokenizer(tok, carried, "the given", f"{ckpt}'s")
    return tok


def check_tokenizer_fits(model, tok, ckpt: str) -> None:
    """The model has a row for every id of `tok` (rows past it are padding) and reads images at its <image>."""
    rows = model.language.vocab_size
    if tok.vocab_size > rows:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens, more than the {rows} vocabulary rows of "
                         f"{ckpt}")
    if model.family.takes_images and tok.token_to_id("<image>") != model.image_token_id:
        raise ValueError(f"tokenizer {tok.path} has <image> at id {tok.token_to_id('<image>')}, {ckpt} reads images "
                         f"at id {model.image_token_id}")


def load_model_tokenizer(model, path: str | None, ckpt: str):
    """`path` or the checkpoint's tokenizer/ folder, checked against the model's vocabulary and image id."""
    tok = load_run_tokenizer(path, ckpt)
    check_tokenizer_fits(model, tok, ckpt)
    return tok


def build_datasets(model, tok, sources, kind: str, max_length: int, on_bad_sample: str = "error",
                   check_images: str = "startup") -> list:
    """One data set per source (a training.config.DataSource): a FileDataset for `path`, an IndexedSampleDataset
    for `prefix` (checked to be preprocessed with this run's kind, template, lengths and tokenizer); every source
    must be of `kind`."""
    datasets = [_build_dataset(model, tok, s, kind, max_length, on_bad_sample, i, check_images)
                for i, s in enumerate(sources)]
    wrong = [s.path or s.prefix for s, ds in zip(sources, datasets) if ds.kind != kind]
    if wrong:
        raise ValueError(f"this run reads {kind}; {wrong} are not")
    return datasets


def _build_dataset(model, tok, s, kind: str, max_length: int, on_bad_sample: str, i: int,
                   check_images: str = "startup"):
    from megamod.data.datasets import FileDataset
    from megamod.data.indexed import IndexedSampleDataset
    from megamod.data.records import DataError
    from megamod.errors import ConfigError

    if (s.path is None) == (s.prefix is None):
        raise ConfigError(f"data.train[{i}] needs exactly one of path or prefix, got path={s.path!r}, "
                          f"prefix={s.prefix!r}")
    if s.path is not None:
        return FileDataset(s.path, tok, kind=s.kind or kind, image_folder=s.image_folder, template=s.template,
                           image_processor=_image_processor(model), max_length=max_length,
                           num_image_tokens=_num_image_tokens(model), on_bad_sample=on_bad_sample,
                           check_image_files=check_images == "startup")  # data.check_images
    ds = IndexedSampleDataset(s.prefix, image_folder=s.image_folder, image_processor=_image_processor(model),
                              on_bad_sample=on_bad_sample)
    try:
        ds.check_run(kind=s.kind or kind, template=s.template, max_length=max_length,
                     num_image_tokens=_num_image_tokens(model), tokenizer=tok)
    except DataError as e:
        raise ConfigError(f"data.train[{i}] (prefix {s.prefix}): {e}") from None
    return ds


def build_collator(model, tok, pad_to_multiple_of: int):
    from megamod.data.collate import Collator

    image_id = model.image_token_id if model.family.takes_images else -1
    return Collator(image_id, tok.pad_id, num_image_tokens=_num_image_tokens(model),
                    pad_to_multiple_of=pad_to_multiple_of, image_size=_image_processor(model).size)


def _image_processor(model):
    return model.family.image_processor(model.cfg)


def _num_image_tokens(model) -> int:
    return model.family.positions_per_image(model.cfg)
