"""MME as published (MME_Benchmark_release_version/), read as yes/no items, and MME's scores.

Layout of the release: one folder per sub-task. Five of them (artwork, celebrity, landmark, posters, scene) keep
images in `images/` and questions in `questions_answers_YN/<image stem>.txt`; the others keep `<stem>.txt` next to
`<stem>.png|.jpg`. Each text file holds one "question<TAB>Yes|No" per line, two per image in the release.

Scores as MME's calculation.py: per sub-task, accuracy over questions plus "accuracy+" over images (an image counts
when all its questions are right), both in percent, so 200 at most; perception and cognition add their sub-tasks.
"""
from __future__ import annotations

import os

from megamod.eval.formats import FormatError, YesNoItem

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".JPG", ".PNG", ".JPEG")


def _image_for(folder: str, stem: str, where: str) -> str:
    for ext in IMAGE_EXTENSIONS:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    raise FormatError(f"{where}: no image {stem}{{{','.join(IMAGE_EXTENSIONS)}}} in {folder}")


def _category_files(root: str, category: str) -> tuple[str, list[str], str]:
    """(folder of the question files, their names, folder of the images)."""
    base = os.path.join(root, category)
    qa, img = os.path.join(base, "questions_answers_YN"), os.path.join(base, "images")
    if os.path.isdir(qa):
        if not os.path.isdir(img):
            raise FormatError(f"{base}: has questions_answers_YN/ but no images/ folder")
        base_q, base_i = qa, img
    else:
        base_q = base_i = base
    return base_q, sorted(f for f in os.listdir(base_q) if f.endswith(".txt")), base_i


def read_mme(path: str, image_folder: str | None = None, limit: int | None = None) -> list[YesNoItem]:
    """Every question of the release directory `path` (sub-tasks in MME's order, then any others sorted)."""
    if image_folder is not None:
        raise ValueError("MME's images live in the release directory: image_folder does not apply")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MME expects the release directory (MME_Benchmark_release_version/), got {path}")
    present = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    known = [c for c in PERCEPTION + COGNITION if c in present]
    categories = known + [c for c in present if c not in known]
    items: list[YesNoItem] = []
    for category in categories:
        q_dir, names, i_dir = _category_files(path, category)
        for name in names:
            stem, q_path = name[:-4], os.path.join(q_dir, name)
            image = None
            with open(q_path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{q_path}:{lineno}"
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no") or not fields[0].strip():
                        raise FormatError(f"{where}: expected 'question<TAB>Yes|No', got {line.strip()!r}")
                    image = image or _image_for(i_dir, stem, where)
                    items.append(YesNoItem(f"{category}/{stem}/{lineno}", fields[0].strip(), image,
                                           fields[1].strip().lower() == "yes", where, category,
                                           f"{category}/{stem}"))
                    if limit is not None and len(items) >= limit:
                        return items
    if not items:
        raise FormatError(f"{path}: no MME question files found (expected <sub-task>/*.txt)")
    return items


def mme_scores(items: list[YesNoItem], correct: list[bool]) -> dict:
    """{"categories": {name: {"accuracy", "accuracy_plus", "score"}}, "perception", "cognition"} (percent)."""
    per: dict = {}
    for item, ok in zip(items, correct):
        cat = per.setdefault(item.category or "-", {"right": 0, "total": 0, "images": {}})
        cat["right"] += ok
        cat["total"] += 1
        cat["images"][item.group] = cat["images"].get(item.group, True) and ok
    categories = {}
    for name, c in per.items():
        acc = 100.0 * c["right"] / c["total"]
        acc_plus = 100.0 * sum(c["images"].values()) / len(c["images"])
        categories[name] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus}
    return {"categories": categories,
            "perception": sum(v["score"] for k, v in categories.items() if k in PERCEPTION),
            "cognition": sum(v["score"] for k, v in categories.items() if k in COGNITION)}
