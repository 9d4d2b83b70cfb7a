"""Evaluation files -> items. Every bad record is a FormatError naming `file:line` and what is wrong.

Yes/no (`read_pope`), JSON Lines, one object per line:
- POPE as published (the POPE repository's coco/aokvqa/gqa_pope_{random,popular,adversarial}.json files, which are
  JSON Lines despite the name): {"question_id", "image", "text", "label": "yes" | "no"};
- the synthetic data set's eval/pope_{random,adversarial}.jsonl, which uses the same fields.
  "label" is read case-insensitively; "answer" is accepted in its place; an optional "category" (e.g. adversarial)
  splits the scores.

Multiple choice (`read_mcq`):
- MMBench's published TSV (`*.tsv`: columns index, question, hint, A, B, C, D, answer, category, image as base64;
  empty or "nan" options and hints are absent, options stop at the first absent letter as LLaVA's eval does; an image
  cell holding only digits refers to the row of that index, as VLMEvalKit writes repeated images; a numeric index is
  the item's id as an int, as pandas reads it in LLaVA's scripts);
- the synthetic eval/mmbench.jsonl (any other extension), one object per line with the same fields, "image" a path.

MME (`read_mme`, eval/mme.py): the release directory as published (MME_Benchmark_release_version/).
LLaVA's POPE question file with POPE's annotation directory: eval/pope_llava.py. eval/tasks.py maps task names to
readers.

Open answers (`read_open`): LLaVA's question JSON Lines {"question_id", "image", "text"} with optional references.

Image paths are relative to `image_folder` when given; otherwise to the data file's directory, or to its parent when
the images are only found there (the synthetic data set's paths are relative to the data set root, one level up).
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import os
import sys
from dataclasses import dataclass

LETTERS = "ABCDEFGHI"
_MISSING = ("", "nan", "NaN", "None", "none", "null")


class FormatError(ValueError):
    """A bad record; the message starts with `file:line`."""


@dataclass
class YesNoItem:
    id: object
    question: str
    image: str | bytes | None  # a path, or the encoded image file itself
    label: bool                # True = "yes"
    location: str              # file:line
    category: str | None = None  # MME: the sub-task
    group: str | None = None     # MME: the image its questions share (for acc+)


@dataclass
class OpenItem:
    id: object
    question: str
    image: str | None
    references: list[str]      # reference answers (may be empty: predictions only)
    location: str


@dataclass
class ChoiceItem:
    id: object
    question: str
    hint: str | None
    options: list[str]         # option texts, lettered A, B, ... in order
    answer: int                # index into options
    category: str | None
    image: str | bytes | None
    location: str


def rotate(item: ChoiceItem, r: int) -> ChoiceItem:
    """Options moved r places left (LLaVA's circular MMBench: round r puts option r first); the answer follows."""
    n = len(item.options)
    return ChoiceItem(item.id, item.question, item.hint, item.options[r:] + item.options[:r], (item.answer - r) % n,
                      item.category, item.image, item.location)


def open_image(item):
    """The item's image as an RGB PIL image, or ImageError naming where it comes from."""
    from PIL import Image, UnidentifiedImageError

    from megamod.data.images import ImageError, open_rgb

    if isinstance(item.image, str):
        return open_rgb(item.image)
    try:
        with Image.open(io.BytesIO(item.image)) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{item.location}: cannot decode the base64 image: {e}") from None


def _jsonl(path: str, what: str = "evaluation file"):
    """(line number, object) per non-blank line; `what` names the file in the not-found error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{lineno}: not JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise FormatError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _text(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise FormatError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def _optional(value) -> str | None:
    if value is None or isinstance(value, float):  # pandas writes NaN for empty cells
        return None
    value = str(value)
    return None if value.strip() in _MISSING else value


class _Images:
    """Resolves the image paths of one file, choosing the base folder once (see the module docstring)."""

    def __init__(self, path: str, image_folder: str | None):
        here = os.path.dirname(os.path.abspath(path))
        self.bases = [image_folder] if image_folder is not None else [here, os.path.dirname(here)]
        self.base: str | None = image_folder

    def __call__(self, rel: str, where: str) -> str:
        if self.base is None:
            self.base = next((b for b in self.bases if os.path.isfile(os.path.join(b, rel))), None)
        full = os.path.join(self.base, rel) if self.base is not None else None
        if full is None or not os.path.isfile(full):
            tried = [os.path.join(b, rel) for b in ([self.base] if self.base is not None else self.bases)]
            raise FormatError(f"{where}: image not found: tried {tried} (set --image-folder)")
        return full

    def optional(self, obj: dict, where: str) -> str | None:
        """The record's image path, or None when it has none (text-only questions)."""
        rel = _optional(obj.get("image"))
        return self(rel, where) if rel else None


def _records(path: str, limit: int | None):
    """(line number, "file:line", object) for the first `limit` records of a JSON Lines file."""
    for n, (lineno, obj) in enumerate(_jsonl(path)):
        if limit is not None and n >= limit:
            return
        yield lineno, f"{path}:{lineno}", obj


def read_pope(path: str, image_folder: str | None = None, limit: int | None = None) -> list[YesNoItem]:
    images, items = _Images(path, image_folder), []
    for lineno, where, obj in _records(path, limit):
        label = obj.get("label", obj.get("answer"))
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise FormatError(f"{where}: field 'label' must be \"yes\" or \"no\", got {label!r}")
        image = images(_text(obj, "image", where), where)
        items.append(YesNoItem(obj.get("question_id", lineno), _text(obj, "text", where), image,
                               label.strip().lower() == "yes", where, _optional(obj.get("category"))))
    return items


def _choice(row: dict, image, where: str) -> ChoiceItem:
    options = []
    for letter in LETTERS:
        value = _optional(row.get(letter))
        if value is None:
            break
        options.append(value)
    if len(options) < 2:
        raise FormatError(f"{where}: needs at least options A and B, found {len(options)}")
    answer = _optional(row.get("answer"))
    if answer is None or answer.strip() not in LETTERS[:len(options)]:
        raise FormatError(f"{where}: answer must be one of the option letters {list(LETTERS[:len(options)])}, "
                          f"got {row.get('answer')!r}")
    question = _optional(row.get("question"))
    if question is None:
        raise FormatError(f"{where}: field 'question' is missing or empty")
    index = row.get("index", where)
    index = int(index) if isinstance(index, str) and index.strip().isdigit() else index
    return ChoiceItem(index, question, _optional(row.get("hint")), options,
                      LETTERS.index(answer.strip()), _optional(row.get("category")), image, where)


def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FormatError(f"{where}: column 'image' is not base64 ({e})") from None


def _read_tsv(path: str, limit: int | None) -> list[ChoiceItem]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images exceed csv's 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise FormatError(f"{path}:1: empty file, expected a header row")
        missing = [c for c in ("question", "A", "B", "answer", "image") if c not in header]
        if missing:
            raise FormatError(f"{path}:1: header lacks columns {missing} (has {header})")
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise FormatError(f"{where}: {len(row)} columns, the header has {len(header)}")
            rows.append((where, dict(zip(header, row))))
    by_index = {r.get("index"): r["image"] for _, r in rows if not r["image"].strip().isdigit()}
    items = []
    for where, row in rows[:limit]:
        cell = row["image"].strip()
        if cell.isdigit():  # a reference to the row holding the image
            if cell not in by_index:
                raise FormatError(f"{where}: image refers to row index {cell}, which has no image")
            cell = by_index[cell]
        if not cell:
            raise FormatError(f"{where}: column 'image' is empty")
        items.append(_choice(row, _b64(cell, where), where))
    return items


def read_mcq(path: str, image_folder: str | None = None, limit: int | None = None) -> list[ChoiceItem]:
    if path.endswith(".tsv"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"evaluation file not found: {path}")
        return _read_tsv(path, limit)
    images = _Images(path, image_folder)
    return [_choice(obj, images.optional(obj, where), where) for _, where, obj in _records(path, limit)]


def _references(obj: dict, where: str) -> list[str]:
    for key in ("answer", "answers", "caption", "captions"):
        if key not in obj:
            continue
        value = obj[key]
        refs = [value] if isinstance(value, str) else value
        # VQAv2 annotations list {"answer": ...} objects
        refs = [r.get("answer") if isinstance(r, dict) else r for r in refs] if isinstance(refs, list) else None
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise FormatError(f"{where}: field {key!r} must be a non-empty string or list of strings, got {value!r}")
        return refs
    return []


def read_open(path: str, image_folder: str | None = None, limit: int | None = None) -> list[OpenItem]:
    """LLaVA's question files for open answers (llava-bench, MM-Vet, the VQA sets, captions), JSON Lines:
    {"question_id", "image", "text"}, plus optional references under "answer", "answers" (strings, or VQAv2's
    {"answer": ...} objects), "caption" or "captions"."""
    images = _Images(path, image_folder)
    return [OpenItem(obj.get("question_id", lineno), _text(obj, "text", where), images.optional(obj, where),
                     _references(obj, where), where) for lineno, where, obj in _records(path, limit)]
