"""LLaVA's answer files: writing a run's answers, reading them back, merging chunks and scoring them.

An answer file is JSON Lines, one record per question, as LLaVA's model_vqa_loader.py writes it:
{"question_id", "prompt", "text", "answer_id", "model_id", "metadata": {}}; multiple choice adds model_vqa_mmbench.py's
"round_id", "options" and "option_char" (one record per rotation with circular evaluation). So LLaVA's eval_pope.py
and convert_mmbench_for_submission.py read megamod's files unchanged. "prompt" is the question without the image line;
"text" the answer: "Yes"/"No" for yes/no tasks (the class chosen), the option letter for multiple choice, the
generated text for open answers.

Scoring an answer file reads "text" as LLaVA's scripts do: yes/no by eval_pope.py's rule (the first sentence; "No",
"no" or "not" among its words is no, anything else yes), multiple choice by its leading option letter. The metrics
are metrics.py's, so the merge of a split run's answer files reports what the whole run reported.
"""
from __future__ import annotations

import json
import os
import uuid

from megamod.eval.formats import LETTERS, FormatError, _jsonl, rotate
from megamod.eval.metrics import choice_metrics
from megamod.eval.prompts import choice_text, with_instruction
from megamod.eval.tasks import get_task

FIELDS = ("question_id", "prompt", "text", "answer_id", "model_id", "metadata")


def answer_id() -> str:
    """A unique 22-character id, as shortuuid.uuid() gives LLaVA (a uuid4 in base 57)."""
    alphabet = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    n, out = uuid.uuid4().int, []
    for _ in range(22):
        n, digit = divmod(n, len(alphabet))
        out.append(alphabet[digit])
    return "".join(out)


def records(task: str, items: list, result: dict, model_id: str, instruction: str | None = None) -> list[dict]:
    """LLaVA answer records of a run's `result` on `items` (in the items' order)."""
    kind, out = get_task(task).answers, []
    for item, pred in zip(items, result["predictions"], strict=True):
        if kind == "choice":
            for r, letter in enumerate(pred.get("round_preds", [pred["pred"]])):
                shown = rotate(item, r)
                out.append({"question_id": item.id, "round_id": r, "prompt": choice_text(shown), "text": letter,
                            "options": shown.options, "option_char": list(LETTERS[r:len(item.options)] + LETTERS[:r]),
                            "answer_id": answer_id(), "model_id": model_id, "metadata": {}})
            continue
        text = pred["text"] if kind == "open" else ("Yes" if pred["pred"] == "yes" else "No")
        out.append({"question_id": item.id, "prompt": with_instruction(item.question, instruction), "text": text,
                    "answer_id": answer_id(), "model_id": model_id, "metadata": {}})
    return out


def write(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read(paths: list[str]) -> list[tuple[str, dict]]:
    """("file:line", record) for every record of the answer files, in order (chunk files concatenated)."""
    out = []
    for path in paths:
        for lineno, record in _jsonl(path, "answer file"):
            where = f"{path}:{lineno}"
            if "question_id" not in record or not isinstance(record.get("text"), str):
                raise FormatError(f"{where}: an answer record needs 'question_id' and a string 'text'")
            out.append((where, record))
    return out


def llava_yes_no(text: str) -> bool:
    """eval_pope.py's reading of an answer: True for yes."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _letter(text: str, n_options: int) -> int | None:
    head = text.strip()[:1].upper()
    return LETTERS.index(head) if head and head in LETTERS[:n_options] else None


def _by_question(task: str, items: list, answers: list[tuple[str, dict]], data: str) -> dict:
    """{(item position, round): (where, record)}, each question answered exactly once per round."""
    position: dict = {}
    for pos, item in enumerate(items):
        if item.id in position:
            raise FormatError(f"{item.location}: question_id {item.id!r} repeats {items[position[item.id]].location}: "
                              f"answers cannot be matched to questions")
        position[item.id] = pos
    found: dict = {}
    for where, record in answers:
        qid = record["question_id"]
        if qid not in position:
            raise FormatError(f"{where}: question_id {qid!r} is not a question of {data}")
        key = (position[qid], record.get("round_id", 0) if task == "mcq" else 0)
        if key in found:
            raise FormatError(f"{where}: question_id {qid!r} (round {key[1]}) is answered again, first at "
                              f"{found[key][0]}")
        found[key] = (where, record)
    missing = [items[p].id for p in range(len(items)) if (p, 0) not in found]
    if missing:
        raise FormatError(f"{len(missing)} of the {len(items)} questions of {data} have no answer in "
                          f"{sorted({w.rsplit(':', 1)[0] for w, _ in answers})}, e.g. question_id "
                          f"{missing[:5]}")
    return found


def score(task: str, items: list, answers: list[tuple[str, dict]], data: str) -> dict:
    """The metrics of `answers` (from `read`) on `items`: what the run that wrote them reports."""
    found = _by_question(task, items, answers, data)
    kind = get_task(task).answers
    if kind == "open":
        from megamod.eval.captions import caption_metrics

        texts = [found[(p, 0)][1]["text"] for p in range(len(items))]
        result = caption_metrics(items, texts)
        result["predictions"] = [{"question_id": it.id, "prompt": found[(p, 0)][1].get("prompt"), "text": t,
                                  **({"references": it.references} if it.references else {})}
                                 for p, (it, t) in enumerate(zip(items, texts))]
        return result
    if kind == "yes_no":
        chosen = {key: 0 if llava_yes_no(record["text"]) else 1 for key, (_, record) in found.items()}
        return choice_metrics(task, items, chosen)
    per_item = [sum(1 for k in found if k[0] == p) for p in range(len(items))]
    circular = any(n > 1 for n in per_item)
    if circular:
        short = [it.id for it, n in zip(items, per_item) if n != len(it.options)]
        if short:
            raise FormatError(f"circular answers need one per rotation (round_id 0 .. options - 1) of every question; "
                              f"question_id {short[:5]} have others")
    chosen = {}
    for (p, r), (where, record) in found.items():
        if not 0 <= r < len(items[p].options):
            raise FormatError(f"{where}: round_id {r} is not a rotation of the {len(items[p].options)} options")
        letter = _letter(record["text"], len(items[p].options))
        chosen[(p, r)] = -1 if letter is None else letter  # not an option letter: wrong in every round
    return choice_metrics(task, items, chosen, circular)
