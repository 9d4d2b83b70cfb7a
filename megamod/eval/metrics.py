"""Metrics from the class chosen for each item: POPE's (per category too), MME's, multiple choice (circular too).

Used on the model's choices (scoring.py) and on the answers of LLaVA answer files (answers.py), so that a run and the
merge of its chunks' answer files report the same numbers. POPE metrics are those of POPE's and LLaVA's evaluation
(positive class = yes; a 0/0 ratio counts as 0 where eval_pope.py would divide by zero).
"""
from __future__ import annotations

from megamod.eval.formats import LETTERS, rotate
from megamod.eval.mme import mme_scores

YES_NO_TASKS = ("pope", "mme")


def ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def pope_metrics(pred_yes: list[bool], label_yes: list[bool]) -> dict:
    tp = sum(p and y for p, y in zip(pred_yes, label_yes))
    fp = sum(p and not y for p, y in zip(pred_yes, label_yes))
    tn = sum(not p and not y for p, y in zip(pred_yes, label_yes))
    fn = sum(not p and y for p, y in zip(pred_yes, label_yes))
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"count": len(label_yes), "accuracy": ratio(tp + tn, len(label_yes)), "precision": precision,
            "recall": recall, "f1": ratio(2 * precision * recall, precision + recall),
            "yes_ratio": ratio(tp + fp, len(label_yes)), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def circular_accuracy(correct_by_round: list[list[bool]]) -> float:
    """A question counts only when every rotation of its options is answered correctly."""
    return ratio(sum(all(rounds) for rounds in correct_by_round), len(correct_by_round))


def _yes_no(task: str, items: list, chosen: dict) -> dict:
    preds = [chosen[(p, 0)] == 0 for p in range(len(items))]
    result = {"task": task, **pope_metrics(preds, [it.label for it in items])}
    if task == "mme":
        result.update(mme_scores(items, [y == it.label for it, y in zip(items, preds)]))
    elif any(it.category for it in items):  # POPE's splits (adversarial, popular, random), each scored alone
        by_category: dict = {}
        for it, y in zip(items, preds):
            pair = by_category.setdefault(it.category or "-", ([], []))
            pair[0].append(y)
            pair[1].append(it.label)
        result["categories"] = {c: pope_metrics(*by_category[c]) for c in sorted(by_category)}
    result["predictions"] = [{"id": it.id, "label": "yes" if it.label else "no", "pred": "yes" if y else "no"}
                             for it, y in zip(items, preds)]
    return result


def _letter(index: int) -> str | None:
    return LETTERS[index] if index >= 0 else None  # -1: an answer that names no option


def _choice(task: str, items: list, chosen: dict, circular: bool) -> dict:
    rounds = [[chosen[(p, r)] == rotate(it, r).answer for r in range(len(it.options) if circular else 1)]
              for p, it in enumerate(items)]
    result = {"task": task, "count": len(items), "accuracy": ratio(sum(r[0] for r in rounds), len(items))}
    if circular:
        result["circular_accuracy"] = circular_accuracy(rounds)
    by_category: dict = {}
    for it, r in zip(items, rounds):
        by_category.setdefault(it.category or "-", []).append(r[0])
    result["categories"] = {c: ratio(sum(v), len(v)) for c, v in sorted(by_category.items())}
    result["predictions"] = []
    for p, (it, r) in enumerate(zip(items, rounds)):
        pred = {"id": it.id, "answer": LETTERS[it.answer], "pred": _letter(chosen[(p, 0)]), "correct": all(r)}
        if circular:  # the letter answered in each rotation (round r shows option r first, as "A")
            pred["round_preds"] = [_letter(chosen[(p, k)]) for k in range(len(r))]
        result["predictions"].append(pred)
    return result


def choice_metrics(task: str, items: list, chosen: dict, circular: bool = False) -> dict:
    """`chosen`: (item position, round) -> index of the class picked (yes/no: 0 = yes; multiple choice: the option
    letter's index in that round's rotation, -1 for an answer naming no option). Returns task, count, the task's
    metrics and per-item predictions."""
    if task in YES_NO_TASKS:
        return _yes_no(task, items, chosen)
    return _choice(task, items, chosen, circular)
