"""Scoring a checkpoint on yes/no (POPE) and multiple-choice (MMBench-style) items by one forward per batch.

Each item becomes the prompt training uses (template, default llava_mod, up to "ASSISTANT:"), followed by the
tokens every candidate answer starts with (e.g. a lone " " when the tokenizer splits " Yes" into " ", "Yes"). The
choice is the class whose candidate first token has the largest logit at the last position: Yes/yes vs No/no (the
case variant counts when it is one token there), or the option letters present. Prompts follow the training data:
yes/no is "<image>\\n{question}" (the synthetic conversations ask existence questions bare; `instruction`, e.g. LLaVA's
"Answer the question using a single word or phrase.", is appended on its own line when given); multiple choice is
LLaVA's MMBench prompt, "<image>\\n{hint}\\n{question}\\nA. ...\\nB. ...\\n" + the letter instruction.

POPE metrics are those of POPE's evaluation (positive class = yes; a 0/0 ratio counts as 0).
"""
from __future__ import annotations

import os

import torch

from megamod.data.synthetic import MCQ_SUFFIX
from megamod.data.templates import Turn, encode_prompt, get_template
from megamod.data.tokenizer import IMAGE_TOKEN
from megamod.eval.formats import LETTERS, ChoiceItem, YesNoItem, read_items

YES, NO = ("Yes", "yes"), ("No", "no")
TASKS = ("pope", "mcq", "mme")  # scored by one forward; "caption" generates (captions.py)


# ---- metrics ----------------------------------------------------------------------------------------------------
def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def pope_metrics(pred_yes: list[bool], label_yes: list[bool]) -> dict:
    tp = sum(p and y for p, y in zip(pred_yes, label_yes))
    fp = sum(p and not y for p, y in zip(pred_yes, label_yes))
    tn = sum(not p and not y for p, y in zip(pred_yes, label_yes))
    fn = sum(not p and y for p, y in zip(pred_yes, label_yes))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"count": len(label_yes), "accuracy": _ratio(tp + tn, len(label_yes)), "precision": precision,
            "recall": recall, "f1": _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": _ratio(tp + fp, len(label_yes))}


def rotate(item: ChoiceItem, r: int) -> ChoiceItem:
    """Options moved r places left (LLaVA's circular MMBench: round r puts option r first); the answer follows."""
    n = len(item.options)
    return ChoiceItem(item.id, item.question, item.hint, item.options[r:] + item.options[:r], (item.answer - r) % n,
                      item.category, item.image, item.location)


def circular_accuracy(correct_by_round: list[list[bool]]) -> float:
    """A question counts only when every rotation of its options is answered correctly."""
    return _ratio(sum(all(rounds) for rounds in correct_by_round), len(correct_by_round))


# ---- prompts and candidate tokens -------------------------------------------------------------------------------
def with_image(text: str, has_image: bool) -> str:
    """The question as training saw it: the <image> placeholder on its own line first, unless already there."""
    return f"{IMAGE_TOKEN}\n{text}" if has_image and IMAGE_TOKEN not in text else text


def yes_no_question(item: YesNoItem, instruction: str | None = None) -> str:
    text = item.question if not instruction else f"{item.question}\n{instruction}"
    return with_image(text, item.image is not None)


def choice_question(item: ChoiceItem) -> str:
    lines = ([item.hint] if item.hint else []) + [item.question]
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, item.options)] + [MCQ_SUFFIX]
    return with_image("\n".join(lines), item.image is not None)


def _continuation(template, tokenizer, word: str) -> list[int]:
    """Token ids the assistant produces up to the end of `word`, as the template renders an answer `word`."""
    rendered = template.render([Turn("?", word)], tokenizer)
    start, end = rendered.answer_spans[-1]
    span = rendered.text[start:end]
    return tokenizer.encode(span[:span.index(word) + len(word)])


def answer_tokens(template, tokenizer, classes: list[tuple[str, ...]]) -> tuple[list[int], list[list[int]]]:
    """(prefix ids shared by every class's first word, candidate token ids per class) for a first-token choice.

    A class's first word always gives its first token after the prefix; other case variants count only when the
    whole word is that one token. Two classes sharing a candidate cannot be told apart: an error."""
    conts = {w: _continuation(template, tokenizer, w) for words in classes for w in words}
    firsts = [conts[words[0]] for words in classes]
    n = 0
    while all(len(c) > n + 1 and c[n] == firsts[0][n] for c in firsts):
        n += 1
    prefix, ids = firsts[0][:n], []
    for words in classes:
        found = []
        for j, w in enumerate(words):
            c = conts[w]
            if c[:n] == prefix and len(c) > n and (j == 0 or len(c) == n + 1) and c[n] not in found:
                found.append(c[n])
        ids.append(found)
    for a in range(len(classes)):
        for b in range(a):
            shared = set(ids[a]) & set(ids[b])
            if shared:
                shown = {w: [tokenizer.decode([i]) for i in conts[w]] for w in classes[a] + classes[b]}
                raise ValueError(f"cannot tell {classes[b][0]!r} from {classes[a][0]!r} by their first token: both "
                                 f"start with {[tokenizer.decode([i]) for i in shared]} after the answer prefix "
                                 f"{[tokenizer.decode([i]) for i in prefix]} (tokenized: {shown})")
    return prefix, ids


# ---- evaluation -------------------------------------------------------------------------------------------------
def _queries(task: str, items: list, circular: bool, instruction: str | None):
    """(item position, round, question text, image source, answer classes) for every forward row."""
    out = []
    for pos, item in enumerate(items):
        if task in ("pope", "mme"):
            out.append((pos, 0, yes_no_question(item, instruction), item, (YES, NO)))
            continue
        for r in range(len(item.options) if circular else 1):
            rotated = rotate(item, r)
            classes = tuple((letter,) for letter in LETTERS[:len(item.options)])
            out.append((pos, r, choice_question(rotated), rotated, classes))
    return out


def metrics(task: str, items: list, scores: dict, circular: bool) -> dict:
    """`scores`: (item position, round) -> score per class; the first of equal scores wins."""
    chosen = {key: max(range(len(s)), key=s.__getitem__) for key, s in scores.items()}
    if task in ("pope", "mme"):
        preds = [chosen[(p, 0)] == 0 for p in range(len(items))]
        result = {"task": task, **pope_metrics(preds, [it.label for it in items])}
        if task == "mme":
            from megamod.eval.mme import mme_scores

            result.update(mme_scores(items, [y == it.label for it, y in zip(items, preds)]))
        result["predictions"] = [{"id": it.id, "label": "yes" if it.label else "no", "pred": "yes" if y else "no",
                                  "scores": scores[(p, 0)]} for p, (it, y) in enumerate(zip(items, preds))]
        return result
    rounds = [[chosen[(p, r)] == rotate(it, r).answer for r in range(len(it.options) if circular else 1)]
              for p, it in enumerate(items)]
    result = {"task": task, "count": len(items), "accuracy": _ratio(sum(r[0] for r in rounds), len(items))}
    if circular:
        result["circular_accuracy"] = circular_accuracy(rounds)
    by_category: dict = {}
    for it, r in zip(items, rounds):
        by_category.setdefault(it.category or "-", []).append(r[0])
    result["categories"] = {c: _ratio(sum(v), len(v)) for c, v in sorted(by_category.items())}
    result["predictions"] = [{"id": it.id, "answer": LETTERS[it.answer], "pred": LETTERS[chosen[(p, 0)]],
                              "correct": all(r), "scores": scores[(p, 0)]}
                             for p, (it, r) in enumerate(zip(items, rounds))]
    return result


def build_rows(tokenizer, task: str, items: list, *, circular: bool = False, template: str = "llava_mod",
               instruction: str | None = None) -> list:
    """One forward row per (item, round): (key, prompt ids ending where the choice is read, item or None when it
    has no image, candidate token ids per class). The <image> placeholder is not expanded."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    tmpl, cache = get_template(template), {}
    rows = []
    for pos, r, question, item, classes in _queries(task, items, circular, instruction):
        if classes not in cache:
            cache[classes] = answer_tokens(tmpl, tokenizer, list(classes))
        prefix, ids = cache[classes]
        prompt = encode_prompt(tmpl, tokenizer, [], question).tolist() + prefix
        rows.append(((pos, r), prompt, item if item.image is not None else None, ids))
    return rows


def evaluate_model(loaded, tokenizer, task: str, items: list, *, batch_size: int = 8, circular: bool = False,
                   template: str = "llava_mod", instruction: str | None = None, progress: bool = False,
                   max_new_tokens: int = 128) -> dict:
    """Metrics of a loaded LLaVA model (training.models.LoadedModel) on every rank of the initialised world."""
    from megamod.eval.runner import choose

    if loaded.kind != "llava":
        raise ValueError(f"evaluation needs a LLaVA checkpoint (images), this one is a {loaded.kind} model")
    if tokenizer.token_to_id(IMAGE_TOKEN) != loaded.image_token_id:
        raise ValueError(f"tokenizer {tokenizer.path} has <image> at id {tokenizer.token_to_id(IMAGE_TOKEN)}, the "
                         f"model reads images at id {loaded.image_token_id}")
    if tokenizer.vocab_size > loaded.language.vocab_size:  # rows past the tokenizer are padding, never read
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
                         f"{loaded.language.vocab_size} vocabulary rows")
    if task == "caption":
        from megamod.eval.captions import evaluate_captions

        return evaluate_captions(loaded, tokenizer, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                 template=template, progress=progress)
    rows = build_rows(tokenizer, task, items, circular=circular, template=template, instruction=instruction)
    scores = choose(loaded, tokenizer, rows, batch_size=batch_size, progress=progress)
    return metrics(task, items, scores, circular)


def evaluate(ckpt: str, task: str, data: str, *, image_folder: str | None = None, batch_size: int = 8,
             limit: int | None = None, circular: bool = False, tp: int = 1, pp: int = 1, ep: int = 1,
             template: str = "llava_mod", instruction: str | None = None, tokenizer: str | None = None,
             dtype: str = "auto", progress: bool = False, max_new_tokens: int = 128) -> dict:
    """Initialise the world (tp, pp, ep), load `ckpt` and score it on `data`; every rank returns the same dict:
    task, count and the task's metrics (pope: accuracy, precision, recall, f1, yes_ratio; mme: those plus MME's
    per-sub-task, perception and cognition scores; mcq: accuracy, categories and, with `circular`,
    circular_accuracy; caption: exact match and token F1 where there are references), plus per-item
    predictions."""
    from megamod import checkpoint, distributed
    from megamod.data.tokenizer import check_same_tokenizer, load_tokenizer
    from megamod.training.models import load

    if task not in TASKS + ("caption",):
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS + ('caption',)}")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch_size and limit must be >= 1, got {batch_size} and {limit}")
    items = read_items(task, data, image_folder, limit)
    tok_path = tokenizer or os.path.join(ckpt, "tokenizer")
    if not os.path.exists(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}: pass tokenizer=")
    tok = load_tokenizer(tok_path)
    carried = os.path.join(ckpt, "tokenizer")
    if tokenizer is not None and os.path.exists(carried):  # the model's ids must mean what the given one says
        check_same_tokenizer(tok, load_tokenizer(carried), "the given", f"{ckpt}'s")
    distributed.initialize(distributed.ParallelConfig(tp=tp, pp=pp, ep=ep))
    loaded = load(ckpt, checkpoint.resolve_dtype(dtype))
    result = evaluate_model(loaded, tok, task, items, batch_size=batch_size, circular=circular, template=template,
                            instruction=instruction, progress=progress, max_new_tokens=max_new_tokens)
    return {**result, "ckpt": ckpt, "data": data}
