"""POPE as LLaVA evaluates it: its question file plus POPE's annotation directory, read as yes/no items.

LLaVA's question file (playground/data/eval/pope/llava_pope_test.jsonl) holds every question of the three POPE
splits, unlabelled, as JSON Lines {"question_id", "image", "text", "category"}; the labels are in the annotation
directory (playground/data/eval/pope/coco/), one POPE file per category, `coco_pope_<category>.json` (JSON Lines
{"question_id", "image", "text", "label"}; aokvqa_/gqa_ prefixes are read the same way).

LLaVA's eval_pope.py pairs a category's answers with its label file line by line, because the question file numbers
its questions across the three categories while POPE numbers each file from 1. Here each question is matched to its
label by what it asks, (image, first line of the text), so a question file whose texts end with an instruction line
still matches, and a question missing from the annotation file, or a file out of order, is an error naming both
files instead of a silently shifted label.
"""
from __future__ import annotations

import os
import re

from megamod.eval.formats import FormatError, YesNoItem, _Images, _jsonl, _records, _text

_ANNOTATION = re.compile(r"^(?P<dataset>\w+?)_pope_(?P<category>\w+)\.json$")


def annotation_files(annotation_dir: str) -> dict[str, str]:
    """{category: path} of the POPE label files in `annotation_dir`."""
    if not os.path.isdir(annotation_dir):
        raise FileNotFoundError(f"POPE annotation directory not found: {annotation_dir}")
    files: dict[str, str] = {}
    for name in sorted(os.listdir(annotation_dir)):
        match = _ANNOTATION.match(name)
        if not match:
            continue
        category = match["category"]
        if category in files:
            raise FormatError(f"{annotation_dir}: two label files for category {category!r}: "
                              f"{os.path.basename(files[category])} and {name}")
        files[category] = os.path.join(annotation_dir, name)
    if not files:
        raise FormatError(f"{annotation_dir}: no POPE label files (<dataset>_pope_<category>.json, e.g. "
                          f"coco_pope_random.json)")
    return files


def _key(image: str, text: str) -> tuple[str, str]:
    return image.strip(), text.strip().split("\n")[0].strip()


def read_labels(path: str) -> dict[tuple[str, str], tuple[bool, str]]:
    """{(image, question's first line): (label is yes, "file:line")} of one POPE label file."""
    labels: dict = {}
    for lineno, obj in _jsonl(path):
        where = f"{path}:{lineno}"
        label = obj.get("label")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise FormatError(f"{where}: field 'label' must be \"yes\" or \"no\", got {label!r}")
        key = _key(_text(obj, "image", where), _text(obj, "text", where))
        yes = label.strip().lower() == "yes"
        if key in labels and labels[key][0] != yes:
            raise FormatError(f"{where}: labels {label!r} the question {key[1]!r} about {key[0]} that "
                              f"{labels[key][1]} labels the other way")
        labels.setdefault(key, (yes, where))
    return labels


def read_llava_pope(path: str, annotation_dir: str, image_folder: str | None = None,
                    limit: int | None = None) -> list[YesNoItem]:
    """LLaVA's POPE question file `path`, labelled from `annotation_dir`; each item's category is its split."""
    files = annotation_files(annotation_dir)
    labels: dict[str, dict] = {}
    images, items, seen = _Images(path, image_folder), [], {}
    for lineno, where, obj in _records(path, limit):
        qid = obj.get("question_id")
        if qid is None:
            raise FormatError(f"{where}: field 'question_id' is missing")
        if qid in seen:
            raise FormatError(f"{where}: question_id {qid!r} repeats {seen[qid]}")
        seen[qid] = where
        category = _text(obj, "category", where)
        if category not in files:
            raise FormatError(f"{where}: category {category!r} has no label file in {annotation_dir} (found "
                              f"{sorted(files)})")
        if category not in labels:
            labels[category] = read_labels(files[category])
        rel, text = _text(obj, "image", where), _text(obj, "text", where)
        found = labels[category].get(_key(rel, text))
        if found is None:
            raise FormatError(f"{where}: question_id {qid!r} ({_key(rel, text)[1]!r} about {rel}) is not in "
                              f"{files[category]}")
        items.append(YesNoItem(qid, text, images(rel, where), found[0], where, category))
    return items
