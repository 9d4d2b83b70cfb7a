"""Open answers (captions, VQA, llava-bench): greedy generation after the training template's prompt, and, where
the file has references, SQuAD-style exact match and token F1 (best over the references, after lower-casing and
dropping punctuation and articles). Predictions are kept in LLaVA's answer-file fields (question_id, prompt, text),
"prompt" being the question (and `instruction`, on its own line) without the image line, as LLaVA records it.
"""
from __future__ import annotations

import re
import string
from collections import Counter

from megamod.data.templates import encode_prompt
from megamod.eval.formats import OpenItem
from megamod.eval.prompts import question_text, template as resolve_template, with_instruction

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split()


def token_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred), normalize(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if not common:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def caption_metrics(items: list[OpenItem], texts: list[str]) -> dict:
    scored = [(it, t) for it, t in zip(items, texts) if it.references]
    result = {"task": "caption", "count": len(items), "with_references": len(scored)}
    if scored:
        result["exact_match"] = sum(max(normalize(t) == normalize(r) for r in it.references)
                                    for it, t in scored) / len(scored)
        result["token_f1"] = sum(max(token_f1(t, r) for r in it.references) for it, t in scored) / len(scored)
    return result


def stop_ids(tokenizer) -> list[int]:
    """Where an answer ends: the end-of-text token (the llava_mod template's separator) and ChatML's <|im_end|>."""
    ids = [tokenizer.eod_id]
    im_end = tokenizer.token_to_id("<|im_end|>")
    return ids + ([im_end] if im_end is not None else [])


def evaluate_captions(loaded, tokenizer, items: list[OpenItem], *, batch_size: int = 8, max_new_tokens: int = 128,
                      template: str = "llava_mod", instruction: str | None = None, progress: bool = False) -> dict:
    from megamod.eval.generate import greedy_generate

    tmpl = resolve_template(template)
    rows, prompts = [], []
    for pos, item in enumerate(items):
        prompts.append(with_instruction(item.question, instruction))
        rows.append((pos, encode_prompt(tmpl, tokenizer, [], question_text(item, instruction)).tolist(),
                     item if item.image is not None else None))
    generated = greedy_generate(loaded, rows, max_new_tokens=max_new_tokens, stop_ids=stop_ids(tokenizer),
                                batch_size=batch_size, progress=progress, vocab_size=tokenizer.vocab_size)
    texts = [tokenizer.decode(generated[pos]).strip() for pos in range(len(items))]
    result = caption_metrics(items, texts)
    result["predictions"] = [{"question_id": it.id, "prompt": q, "text": t, "tokens": len(generated[p]),
                              **({"references": it.references} if it.references else {})}
                             for p, (it, q, t) in enumerate(zip(items, prompts, texts))]
    return result
