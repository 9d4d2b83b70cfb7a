"""Preprocessed data sets: templated tokens written once (tools/preprocess_data.py) in megatron-core's indexed format,
read back as the same Sample / PairSample items the JSON path gives.

Files for a prefix P:
  P.bin, P.idx         megatron.core IndexedDataset (int32): one document per sample, with the sequences
                         conversations: [tokens, spans]; pairs: [chosen tokens, chosen spans, rejected tokens,
                         rejected spans]; spans = trained token ranges as flattened [start, end) pairs
  P.samples.jsonl      one line per sample: {"id": ..., "images": [paths relative to the image folder],
                         "location": "source-file:line"}
  P.meta.json          {"kind", "template", "max_length", "num_image_tokens", "truncate_answer", "image_folder",
                         "num_samples", "sources", "tokenizer": {"path", "kind", "vocab_size", "image_id", "eod_id",
                         "pad_id"}}
Images stay files: they are opened and preprocessed at training time, as on the JSON path.
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
from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer


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
            "image_id": tokenizer.token_to_id(IMAGE_TOKEN), "eod_id": tokenizer.eod_id, "pad_id": tokenizer.pad_id}


class IndexedWriter:
    """Appends templated samples to P.bin and P.samples.jsonl; `finalize(meta)` writes P.idx and P.meta.json."""

    def __init__(self, prefix: str, kind: str):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.kind, self.count = prefix, kind, 0
        self.builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
        self.samples = open(prefix + ".samples.jsonl", "w")

    def add(self, sample_id: str | None, images: list[str], location: str, encoded) -> None:
        parts = [encoded] if self.kind == "conversations" else list(encoded)
        arrays = [a for enc in parts for a in (enc.tokens, spans_of(enc.targets))]
        self.builder.add_document(np.concatenate(arrays), [len(a) for a in arrays])
        self.samples.write(json.dumps({"id": sample_id, "images": images, "location": location}) + "\n")
        self.count += 1

    def finalize(self, meta: dict) -> None:
        self.builder.finalize(self.prefix + ".idx")
        self.samples.close()
        with open(self.prefix + ".meta.json", "w") as f:
            json.dump({**meta, "kind": self.kind, "num_samples": self.count}, f, indent=1)


class IndexedSampleDataset(torch.utils.data.Dataset):
    """The samples of a preprocessed prefix, images loaded from `image_folder` (default: the one recorded)."""

    def __init__(self, prefix: str, *, image_folder: str | None = None, image_processor: ImageProcessor | None = None,
                 on_bad_sample: str = "error"):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample {on_bad_sample!r} is not one of {ON_BAD_SAMPLE}")
        for suffix in (".bin", ".idx", ".samples.jsonl", ".meta.json"):
            if not os.path.exists(prefix + suffix):
                raise DataError(f"preprocessed data set {prefix}: missing {prefix + suffix}")
        self.prefix = prefix
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

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Error when `tokenizer` is not the one the data was tokenized with (vocabulary size or special ids)."""
        saved, now = self.meta["tokenizer"], tokenizer_info(tokenizer)
        diff = {k: (saved[k], now[k]) for k in ("vocab_size", "image_id", "eod_id", "pad_id") if saved[k] != now[k]}
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
