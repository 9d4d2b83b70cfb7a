"""Map-style datasets over one data file: conversations (LLaVA JSON/JSONL) and preference pairs (JSONL/JSON); a
.parquet file or a directory of them is read by megamod/data/parquet.py (RLAIF-V's shards, images embedded).

Construction scans every record once (JSON, fields, roles, placeholders vs images, empty answers, image files
present), so that most bad input stops a run at start-up rather than hours in. Access then templates and tokenizes
the record and loads its images (unreadable image, too long). Every problem names file:line (and the sample id):
- on_bad_sample="error" (default): construction raises a DataError listing the bad samples; access raises
  BadSampleError.
- on_bad_sample="skip": bad samples are left out and counted. Those found by the scan are in `dataset.report`;
  those found on access come back as `Skipped` items, which the collator drops and the loader adds to its report.
Nothing is ever replaced by another sample or by a blank image (METHOD.md §5).
"""
from __future__ import annotations

import bisect
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from megamod.data.images import ImageError, ImageProcessor
from megamod.data.parquet import EmbeddedImage, ParquetRecords, is_parquet
from megamod.data.records import DataError, RecordFile, cached_arrays
from megamod.data.schema import ConversationRecord, PairRecord, parse_conversation, parse_pair
from megamod.data.templates import Encoded, SampleError, encode, get_template
from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer

ON_BAD_SAMPLE = ("error", "skip")
KINDS = ("conversations", "pairs")


@dataclass(frozen=True)
class BadSample:
    location: str  # "path:line"
    reason: str
    sample_id: str | None = None

    def __str__(self) -> str:
        where = f"{self.location} (id={self.sample_id})" if self.sample_id is not None else self.location
        return f"{where}: {self.reason}"


class BadSampleError(ValueError):
    def __init__(self, bad: BadSample):
        super().__init__(str(bad))
        self.bad = bad

    def __reduce__(self):  # crosses process boundaries (DataLoader and Pool workers) intact
        return BadSampleError, (self.bad,)


class BadSampleReport:
    """Every bad sample met, with where and why."""

    def __init__(self, samples: list[BadSample] | None = None):
        self.samples = list(samples or [])

    def add(self, bad: BadSample) -> None:
        self.samples.append(bad)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def summary(self, limit: int | None = None) -> str:
        if not self.samples:
            return "no bad samples"
        shown = self.samples if limit is None else self.samples[:limit]
        lines = [f"{len(self.samples)} bad sample(s):"] + [f"  {b}" for b in shown]
        if len(shown) < len(self.samples):
            lines.append(f"  ... and {len(self.samples) - len(shown)} more")
        lines.append(self.by_reason())
        return "\n".join(lines)

    def by_reason(self) -> str:
        """Counts per kind of problem (the reason up to its first colon)."""
        reasons = Counter(b.reason.split(":")[0] for b in self.samples)
        return "by reason: " + "; ".join(f"{r}: {n}" for r, n in reasons.most_common())


@dataclass
class Sample:
    text: Encoded
    images: torch.Tensor  # float32 [n, 3, R, R], n = number of <image> tokens in text
    sample_id: str | None
    location: str


@dataclass
class PairSample:
    chosen: Encoded     # trained tokens: the last (chosen) answer only
    rejected: Encoded
    images: torch.Tensor  # float32 [n, 3, R, R], shared by both
    sample_id: str | None
    location: str


@dataclass
class Skipped:
    bad: BadSample


def load_images(paths: list[str], folder: str, processor: ImageProcessor) -> torch.Tensor:
    """float32 [n, 3, R, R]; ImageError names the file."""
    if not paths:
        return torch.zeros(0, 3, processor.size, processor.size)
    return torch.stack([processor.load(os.path.join(folder, p)) for p in paths])


class FileDataset(torch.utils.data.Dataset):
    """One data file of `kind` "conversations" or "pairs". `image_folder` defaults to the file's directory;
    `max_length` counts each <image> as `num_image_tokens` positions (576 for CLIP-336/14).
    `check_image_files=False` (data.check_images: lazy) leaves out the start-up check that every image exists (one
    file-system lookup per image per rank): a missing image is then a bad sample naming file:line when it is read.
    `lengths` (for length grouping) is computed on first use, once per file (cached beside it, see
    records.cached_arrays), not at construction."""

    def __init__(self, path: str, tokenizer: Tokenizer, *, kind: str = "conversations", image_folder: str | None = None,
                 template: str = "llava_mod", image_processor: ImageProcessor | None = None,
                 max_length: int | None = 2048, num_image_tokens: int = 1, truncate_answer: bool = False,
                 on_bad_sample: str = "error", check_image_files: bool = True):
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {KINDS}")
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample {on_bad_sample!r} is not one of {ON_BAD_SAMPLE}")
        self.path, self.kind, self.tokenizer = path, kind, tokenizer
        home = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        self.image_folder = home if image_folder is None else image_folder
        self.template = get_template(template)
        self.image_processor = image_processor or ImageProcessor()
        self.max_length, self.num_image_tokens, self.truncate_answer = max_length, num_image_tokens, truncate_answer
        self.on_bad_sample = on_bad_sample
        self.records = ParquetRecords(path, kind) if is_parquet(path) else RecordFile(path)
        self.report = BadSampleReport()
        self._lengths = None
        self._index = self._scan(check_image_files)

    def _parse(self, i: int) -> ConversationRecord | PairRecord:
        obj = self.records.read(i)
        return parse_conversation(obj) if self.kind == "conversations" else parse_pair(obj)

    def _bad(self, i: int, error: Exception) -> BadSample:
        try:
            obj = self.records.read(i)
            sample_id = next((str(obj[k]) for k in ("id", "idx") if obj.get(k) is not None), None)
        except SampleError:
            sample_id = None
        return BadSample(self.records.location(i), str(error), sample_id)

    def _estimate_length(self, record) -> int:
        """Positions the sample takes, roughly: words plus expanded images (as LLaVA's modality lengths); pairs
        count the longer side. Only orders samples for length grouping, so no tokenising."""
        def words(turns):
            return sum(len(t.question.split()) + len(t.answer.split()) for t in turns)

        text = words(record.turns) if self.kind == "conversations" else max(words(record.chosen),
                                                                              words(record.rejected))
        return text + len(record.images) * (self.num_image_tokens - 1)  # "<image>" is one of the words

    def _scan(self, check_image_files: bool) -> np.ndarray:
        good, with_images = [], False
        for i in range(len(self.records)):
            try:
                record = self._parse(i)
                for p in record.images if check_image_files else ():
                    if not isinstance(p, EmbeddedImage) and not os.path.isfile(os.path.join(self.image_folder, p)):
                        raise SampleError(f"image not found: {os.path.join(self.image_folder, p)}")
            except SampleError as e:
                self.report.add(self._bad(i, e))
                continue
            with_images |= bool(record.images)
            good.append(i)
        if with_images and self.tokenizer.token_to_id(IMAGE_TOKEN) is None:
            raise DataError(f"{self.path} has images but tokenizer {self.tokenizer.path} has no {IMAGE_TOKEN} token; "
                            f"add it with megamod.data.tokenizer.add_special_tokens (the model's embeddings need at "
                            f"least the new vocab_size rows)")
        if self.report and self.on_bad_sample == "error":
            raise DataError(f"{self.path}: {self.report.summary(limit=10)}\n(run `python -m megamod check-data` for "
                            f"the full list, or pass on_bad_sample='skip' to leave them out)")
        if not good:
            raise DataError(f"{self.path}: no usable samples\n{self.report.summary(limit=10)}")
        return np.asarray(good, dtype=np.int64)

    @property
    def lengths(self) -> np.ndarray:
        """Per usable sample, see _estimate_length; computed (or read from the file's cache) on first use."""
        if self._lengths is None:
            def build():  # every record's estimate (-1: not a usable record), whatever the image check found
                out = np.full(len(self.records), -1, dtype=np.int64)
                for i in range(len(self.records)):
                    try:
                        out[i] = self._estimate_length(self._parse(i))
                    except SampleError:
                        pass
                return {"lengths": out}

            if isinstance(self.records, RecordFile):
                name = f"lengths-{self.kind}-{self.num_image_tokens}"
                every = cached_arrays(self.records.path, name, build)["lengths"]
            else:
                every = build()["lengths"]
            self._lengths = every[self._index]
        return self._lengths

    def __len__(self) -> int:
        return len(self._index)

    def location(self, k: int) -> str:
        return self.records.location(int(self._index[k]))

    def sample_id(self, k: int) -> str | None:
        """Sample k's id as its record gives it (no tokenising, no images)."""
        return self._parse(int(self._index[k])).sample_id

    def _encode(self, turns, train_on: str = "all") -> Encoded:
        return encode(self.template, self.tokenizer, turns, train_on=train_on, max_length=self.max_length,
                      num_image_tokens=self.num_image_tokens, truncate_answer=self.truncate_answer)

    def encode_record(self, record) -> Encoded | tuple[Encoded, Encoded]:
        """The templated tokens of a record: one Encoded (conversations) or (chosen, rejected)."""
        if self.kind == "conversations":
            return self._encode(record.turns)
        return self._encode(record.chosen, "last"), self._encode(record.rejected, "last")

    def text_item(self, k: int):
        """(record, encoded) of sample k without its images (tools/preprocess_data.py); BadSampleError/Skipped."""
        i = int(self._index[k])
        try:
            record = self._parse(i)
            return record, self.encode_record(record)
        except SampleError as e:
            return self._handle(self._bad(i, e))

    def _handle(self, bad: BadSample):
        if self.on_bad_sample == "skip":
            return Skipped(bad)
        raise BadSampleError(bad)

    def __getitem__(self, k: int) -> Sample | PairSample | Skipped:
        item = self.text_item(k)
        if isinstance(item, Skipped):
            return item
        record, encoded = item
        location = self.location(k)
        try:
            loader = getattr(self.records, "load_images", load_images)  # parquet: images from the rows' bytes
            images = loader(record.images, self.image_folder, self.image_processor)
        except ImageError as e:
            return self._handle(BadSample(location, str(e), record.sample_id))
        if self.kind == "conversations":
            return Sample(encoded, images, record.sample_id, location)
        return PairSample(encoded[0], encoded[1], images, record.sample_id, location)


class MixedDataset(torch.utils.data.Dataset):
    """Several datasets end to end; MixtureSampler decides how often each is drawn."""

    def __init__(self, datasets: list[torch.utils.data.Dataset]):
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.sizes = [len(d) for d in self.datasets]
        self._offsets = np.cumsum([0] + self.sizes).tolist()

    def __len__(self) -> int:
        return self._offsets[-1]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([d.lengths for d in self.datasets])

    def __getitem__(self, i: int):
        source = bisect.bisect_right(self._offsets, i) - 1
        return self.datasets[source][i - self._offsets[source]]

    @property
    def report(self) -> BadSampleReport:
        return BadSampleReport([b for d in self.datasets for b in getattr(d, "report", ())])
