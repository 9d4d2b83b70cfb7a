"""The record layouts megamod reads, checked field by field (every problem is a SampleError saying what is wrong).

Conversations (LLaVA's layout):
    {"id": "000123", "image": "coco/000123.jpg" | ["a.jpg", "b.jpg"] | absent (text-only),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}
  Roles "human"/"user" and "gpt"/"assistant"; turns alternate, human first, assistant last. The `<image>`
  placeholders in the questions must number exactly the images (none in answers); answers must not be empty.

Preference pairs, either of:
  - flat, with RLAIF-V's field names (openbmb/RLAIF-V-Dataset: idx, image_path, question, chosen, rejected):
    {"id" | "idx": ..., "image" | "image_path": path(s), "question": "...", "chosen": "...", "rejected": "..."}
    RLAIF-V questions carry no placeholder: when the question has none and the pair has images, one "<image>\\n" per
    image is put before the question (LLaVA's placement). RLAIF-V's parquet shards (image bytes embedded) are read as
    published: megamod/data/parquet.py gives each row as such a record.
  - conversations (LLaVA-MoD's DPO json): {"id", "image", "chosen": [turns], "rejected": [turns]}, both lists in the
    conversation layout above with the same questions and the same answers except the last one.
  chosen and rejected must differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from megamod.data.templates import SampleError, Turn
from megamod.data.tokenizer import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class ConversationRecord:
    sample_id: str | None
    images: list[str]
    turns: list[Turn]


@dataclass
class PairRecord:
    sample_id: str | None
    images: list[str]
    chosen: list[Turn]
    rejected: list[Turn]


def _sample_id(obj: dict, *keys: str) -> str | None:
    value = next((obj[k] for k in keys if obj.get(k) is not None), None)
    return None if value is None else str(value)


def _images(obj: dict, *keys: str) -> list[str]:
    key = next((k for k in keys if obj.get(k) is not None), None)
    if key is None:
        return []
    value = obj[key]
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p.strip() for p in paths):
        raise SampleError(f'field "{key}" must be an image path or a list of image paths, got {value!r:.80}')
    return paths


def _string(obj: dict, key: str) -> str:
    if key not in obj:
        raise SampleError(f'missing field "{key}"')
    if not isinstance(obj[key], str):
        raise SampleError(f'field "{key}" must be a string, got {type(obj[key]).__name__}')
    return obj[key]


def _turns(conversation, field: str) -> list[Turn]:
    if not isinstance(conversation, list) or not conversation:
        raise SampleError(f'field "{field}" must be a non-empty list of {{"from", "value"}} turns')
    roles, values = [], []
    for k, turn in enumerate(conversation):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(f'{field}[{k}] must be an object with "from" and "value"')
        if turn["from"] not in ROLES:
            raise SampleError(f'{field}[{k}] has unknown role {turn["from"]!r} (expected one of {sorted(ROLES)})')
        if not isinstance(turn["value"], str):
            raise SampleError(f'{field}[{k}]["value"] must be a string')
        roles.append(ROLES[turn["from"]])
        values.append(turn["value"])
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if len(roles) % 2 or roles != expected[:len(roles)]:
        raise SampleError(f'{field} must alternate human, gpt, ... and end with gpt; got roles {roles}')
    turns = [Turn(values[k], values[k + 1]) for k in range(0, len(values), 2)]
    for k, turn in enumerate(turns):
        if not turn.answer.strip():
            raise SampleError(f"empty answer in turn {k + 1} of {field}")
        if IMAGE_TOKEN in turn.answer:
            raise SampleError(f"{IMAGE_TOKEN} placeholder in the answer of turn {k + 1} of {field}")
    return turns


def _check_placeholders(turns: list[Turn], images: list[str]) -> None:
    found = sum(t.question.count(IMAGE_TOKEN) for t in turns)
    if found != len(images):
        raise SampleError(f"{found} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)")


def parse_conversation(obj: dict) -> ConversationRecord:
    if "conversations" not in obj:
        raise SampleError('missing field "conversations"')
    images = _images(obj, "image")
    turns = _turns(obj["conversations"], "conversations")
    _check_placeholders(turns, images)
    return ConversationRecord(_sample_id(obj, "id"), images, turns)


def parse_pair(obj: dict) -> PairRecord:
    images = _images(obj, "image", "image_path")
    sample_id = _sample_id(obj, "id", "idx")
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        chosen, rejected = _turns(obj.get("chosen"), "chosen"), _turns(obj.get("rejected"), "rejected")
        if [t.question for t in chosen] != [t.question for t in rejected] or chosen[:-1] != rejected[:-1]:
            raise SampleError("chosen and rejected must share their questions and all answers but the last")
    else:
        question, answers = _string(obj, "question"), [_string(obj, "chosen"), _string(obj, "rejected")]
        for name, answer in zip(("chosen", "rejected"), answers):
            if not answer.strip():
                raise SampleError(f"empty {name} answer")
            if IMAGE_TOKEN in answer:
                raise SampleError(f"{IMAGE_TOKEN} placeholder in the {name} answer")
        if images and IMAGE_TOKEN not in question:
            question = f"{IMAGE_TOKEN}\n" * len(images) + question
        chosen, rejected = [Turn(question, answers[0])], [Turn(question, answers[1])]
    _check_placeholders(chosen, images)
    if chosen[-1].answer == rejected[-1].answer:
        raise SampleError("chosen and rejected answers are identical")
    return PairRecord(sample_id, images, chosen, rejected)
