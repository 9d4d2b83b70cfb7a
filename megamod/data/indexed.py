"""Preprocessed data sets: templated tokens written once (tools/preprocess_data.py) in megatron-core's indexed format,
read back as the same Sample / PairSample items the JSON path gives.

Files for a prefix P:
  P.bin, P.idx         megatron.core IndexedDataset (int32): one document per sample, with the sequences
                         conversations: [tokens, spans]; pairs: [chosen tokens, chosen spans, rejected tokens,
                         rejected spans]; spans = trained token ranges as flattened [start, end) pairs
  P.samples.jsonl      one line per sample: {"id": ..., "images": [paths relative to the image folder],
                         "location": "source-file:line"}
  P.lengths.npy        int64 [num_samples]: the length each sample is grouped by (data.group_by_length), the JSON
                         path's own estimate (FileDataset.lengths: words plus expanded images), stored at
                         preprocessing so that both paths order a global batch identically; the exact token counts
                         are in the .idx (`token_lengths`)
  P.meta.json          {"kind", "template", "max_length", "num_image_tokens", "truncate_answer", "image_folder",
                         "num_samples", "sources", "tokenizer": {"path", "kind", "vocab_size", "image_id", "eod_id",
                         "pad_id", "vocab_sha256"}}; written last: a prefix without it is incomplete
Images stay files: they are opened and preprocessed at training time, as on the JSON path (preprocessing checked
once that each opens).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

from megamod.data.datasets import (BadSample, BadSampleError, BadSampleReport, ON_BAD_SAMPLE, PairSample, Sample,
                                   Skipped, load_images)
from megamod.data.images import ImageError, ImageProcessor
from megamod.data.records import DataError, RecordFile
from megamod.data.templates import Encoded
from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer, vocabulary_fingerprint


def spans_of(targets: np.ndarray) -> np.ndarray:
    """bool [S] -> int64 [2k]: the [start, end) runs of True, flattened."""
    edges = np.diff(np.concatenate([[0], targets.astype(np.int8), [0]]))
    return np.stack([np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)], axis=1).reshape(-1)


def targets_of(spans: np.ndarray, length: int) -> np.ndarray:
    targets = np.zeros(length, dtype=bool)
    for start, end in np.asarray(spans).reshape(-1, 2):
        targets[start:end] = True
    return targets


def tokenizer_info(tokenizer: Tokenizer) -> dict:
    return {"path": os.path.abspath(tokenizer.path), "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "image_id": tokenizer.token_to_id(IMAGE_TOKEN), "eod_id": tokenizer.eod_id, "pad_id": tokenizer.pad_id,
            "vocab_sha256": vocabulary_fingerprint(tokenizer)}


class IndexedWriter:
    """Appends templated samples to P.bin, P.samples.jsonl (and their lengths); `finalize(meta)` writes P.idx,
    P.lengths.npy and, last, P.meta.json."""

    def __init__(self, prefix: str, kind: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.kind, self.count = prefix, kind, 0
        self.builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        self.samples = open(prefix + ".samples.jsonl", "w")
        self.lengths: list[int] = []

    def add(self, sample_id: str | None, images: list[str], location: str, encoded, length: int | None = None) -> None:
        """`length`: what the sample is grouped by (the JSON path's FileDataset.lengths[k]); default its tokens."""
        parts = [encoded] if self.kind == "conversations" else list(encoded)
        arrays = [a for enc in parts for a in (enc.tokens, spans_of(enc.targets))]
        self.builder.add_document(np.concatenate(arrays), [len(a) for a in arrays])
        self.samples.write(json.dumps({"id": sample_id, "images": images, "location": location}) + "\n")
        self.lengths.append(max(len(enc.tokens) for enc in parts) if length is None else int(length))
        self.count += 1

    def finalize(self, meta: dict) -> None:
        self.builder.finalize(self.prefix + ".idx")
        self.samples.close()
        np.save(self.prefix + ".lengths.npy", np.asarray(self.lengths, dtype=np.int64))
        write_meta(self.prefix, {**meta, "kind": self.kind, "num_samples": self.count})


def write_meta(prefix: str, meta: dict) -> None:
    """P.meta.json, atomically (it marks the prefix complete)."""
    with open(prefix + ".meta.json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(prefix + ".meta.json.tmp", prefix + ".meta.json")


SUFFIXES = (".bin", ".idx", ".samples.jsonl", ".lengths.npy", ".meta.json")
KIND_PARTS = {"conversations": ("text",), "pairs": ("chosen", "rejected")}


class IndexedSampleDataset(torch.utils.data.Dataset):
    """The samples of a preprocessed prefix, images loaded from `image_folder` (default: the one recorded)."""

    def __init__(self, prefix: str, *, image_folder: str | None = None, image_processor: ImageProcessor | None = None,
                 on_bad_sample: str = "error"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample {on_bad_sample!r} is not one of {ON_BAD_SAMPLE}")
        for suffix in SUFFIXES:
            if not os.path.exists(prefix + suffix):
                raise DataError(f"preprocessed data set {prefix}: missing {prefix + suffix} (incomplete or older "
                                f"than this megamod: run tools/preprocess_data.py again)")
        self.prefix = self.path = prefix
        with open(prefix + ".meta.json") as f:
            self.meta = json.load(f)
        self.kind = self.meta["kind"]
        self.image_folder = self.meta["image_folder"] if image_folder is None else image_folder
        self.image_processor = image_processor or ImageProcessor()
        self.on_bad_sample = on_bad_sample
        self.report = BadSampleReport()
        self.data = IndexedDataset(prefix)
        self.samples = RecordFile(prefix + ".samples.jsonl")
        self._docs = self.data.document_indices
        if len(self._docs) - 1 != len(self.samples) or len(self.samples) != self.meta["num_samples"]:
            raise DataError(f"{prefix}: {len(self._docs) - 1} documents, {len(self.samples)} sample lines, "
                            f"meta says {self.meta['num_samples']}")
        self.lengths = np.load(prefix + ".lengths.npy")
        if self.lengths.shape != (len(self.samples),):
            raise DataError(f"{prefix}: {self.lengths.shape[0]} lengths for {len(self.samples)} samples")

    @property
    def token_lengths(self) -> np.ndarray:
        """int64 [N]: each sample's token count from the .idx (pairs: the longer side); no data read."""
        sizes = np.asarray(self.data.sequence_lengths, dtype=np.int64)
        docs = np.asarray(self._docs, dtype=np.int64)
        parts = len(KIND_PARTS[self.kind])
        tokens = sizes[docs[0]:docs[-1]].reshape(-1, parts * 2)[:, 0::2]  # each part: tokens, spans
        return tokens.max(axis=1)

    def location(self, k: int) -> str:
        return self.samples.read(k)["location"]

    def sample_id(self, k: int) -> str | None:
        return self.samples.read(k)["id"]

    def check_run(self, *, kind: str, template: str, max_length: int | None, num_image_tokens: int,
                  truncate_answer: bool = False, tokenizer: Tokenizer | None = None) -> None:
        """DataError naming every setting the data was preprocessed with that differs from the run's."""
        m = self.meta
        wanted = {"kind": kind, "template": template, "max_length": max_length, "num_image_tokens": num_image_tokens,
                  "truncate_answer": truncate_answer}
        diff = [f"{k}: preprocessed {m.get(k)!r}, this run {v!r}" for k, v in wanted.items() if m.get(k) != v]
        if diff:
            raise DataError(f"preprocessed data set {self.prefix} does not fit this run ({'; '.join(diff)}); "
                            f"preprocess it again with the run's settings")
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Error when `tokenizer` is not the one the data was tokenized with (vocabulary size or special ids)."""
        saved, now = self.meta["tokenizer"], tokenizer_info(tokenizer)
        keys = ("vocab_size", "image_id", "eod_id", "pad_id", "vocab_sha256")
        diff = {k: (saved.get(k), now[k]) for k in keys if saved.get(k) != now[k]}
        if diff:
            raise DataError(f"{self.prefix} was tokenized with {saved['path']}; tokenizer {tokenizer.path} "
                            f"differs (saved, now): {diff}")

    def __len__(self) -> int:
        return len(self.samples)

    def encoded(self, k: int) -> list[Encoded]:
        first, last = int(self._docs[k]), int(self._docs[k + 1])
        seqs = [self.data[j].astype(np.int64) for j in range(first, last)]
        return [Encoded(tokens, targets_of(spans, len(tokens))) for tokens, spans in zip(seqs[::2], seqs[1::2])]

    def __getitem__(self, k: int) -> Sample | PairSample | Skipped:
        info = self.samples.read(k)
        try:
            images = load_images(info["images"], self.image_folder, self.image_processor)
        except ImageError as e:
            bad = BadSample(info["location"], str(e), info["id"])
            if self.on_bad_sample == "skip":
                return Skipped(bad)
            raise BadSampleError(bad) from None
        encoded = self.encoded(k)
        if self.kind == "conversations":
            return Sample(encoded[0], images, info["id"], info["location"])
        return PairSample(encoded[0], encoded[1], images, info["id"], info["location"])
