"""The evaluation tasks: each name with the reader of its files and how its answers are produced.

- pope: yes/no questions (formats.read_pope; with `annotation_dir`, LLaVA's question file labelled from POPE's
  annotation directory, pope_llava.py), scored by a first-token choice;
- mme: the MME release directory (mme.py), yes/no, scored by a first-token choice;
- mcq: multiple choice (MMBench TSV, synthetic mmbench.jsonl), scored by a first-token choice of the option letter;
- caption: open answers (LLaVA question JSON Lines), generated greedily (captions.py).

`chunk` splits items as LLaVA's evaluation scripts do (--num-chunks, --chunk-idx).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from megamod.eval.formats import FormatError, read_mcq, read_open, read_pope
from megamod.eval.mme import read_mme
from megamod.eval.pope_llava import read_llava_pope


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable      # (path, image_folder, limit) -> items
    answers: str        # "yes_no" | "choice" (one forward, the best first token) | "open" (generated text)


TASKS = {task.name: task for task in (Task("pope", read_pope, "yes_no"), Task("mme", read_mme, "yes_no"),
                                      Task("mcq", read_mcq, "choice"), Task("caption", read_open, "open"))}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]


def read_items(task: str, path: str, image_folder: str | None = None, limit: int | None = None,
               annotation_dir: str | None = None) -> list:
    """The task's items from `path` (the first `limit`); `annotation_dir` labels LLaVA's POPE question file."""
    spec = get_task(task)
    if annotation_dir is not None:
        if task != "pope":
            raise ValueError(f"annotation_dir labels LLaVA's POPE question file: task pope, not {task!r}")
        items = read_llava_pope(path, annotation_dir, image_folder, limit)
    else:
        items = spec.read(path, image_folder, limit)
    if not items:
        raise FormatError(f"{path}: no evaluation records")
    return items


def chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's get_chunk: items cut in order into pieces of ceil(len / num_chunks), piece `chunk_idx`."""
    if num_chunks < 1 or not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"need num_chunks >= 1 and 0 <= chunk_idx < num_chunks, got {num_chunks} and {chunk_idx}")
    size = math.ceil(len(items) / num_chunks)
    piece = items[chunk_idx * size:(chunk_idx + 1) * size]
    if not piece:
        raise ValueError(f"chunk {chunk_idx} of {num_chunks} is empty: {len(items)} items make "
                         f"{math.ceil(len(items) / size)} chunks of {size}")
    return piece
