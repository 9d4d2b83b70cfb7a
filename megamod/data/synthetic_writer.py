"""Writes the synthetic data set (synthetic.py) to a directory, in exactly the formats real data comes in.

    images/{train,eval}/NNNNNN.png   64 x 64 RGB scenes; every path below is relative to the data set directory
    scenes.jsonl        ground truth, one line per image: {"split", "image", "objects": [{"shape", "color", "row",
                        "col", "center": [x, y], "size", "position"}]}
    captions.json       align data (plain template), LLaVA JSON list: {"id", "image", "conversations": [{"from":
                        "human", "value": "<image>\\n<prompt>"}, {"from": "gpt", "value": "<caption>"}]}
    conversations.json  instruction data (llava_mod / chatml templates), LLaVA JSON list, 1-3 turns per image
                        (colour, count, position, existence, description, A/B/C/D questions) plus ~5 % text-only
                        samples without "image"
    conversations_single.json
                        the conversations of the train images with a single object, for a curriculum: a small
                        model learns to read the image tokens there first (nothing to pick among)
    pairs.jsonl         preference pairs, RLAIF-V field names: {"id", "image", "question", "chosen", "rejected"};
                        the rejected answer hallucinates a colour, count, position or object
    eval/pope_random.jsonl, eval/pope_adversarial.jsonl
                        held-out images, POPE's format {"question_id", "image", "text": "Is there a(n) <color> <shape>
                        in the image?", "label": "yes"|"no"}, balanced; adversarial negatives share the shape or
                        the colour of an object in the image
    eval/mmbench.jsonl  held-out images, MMBench-like {"index", "question", "A", "B", "C", "D", "answer", "category",
                        "image"}
    eval/captions.jsonl held-out images, LLaVA question lines {"question_id", "image", "text": "Describe the image.",
                        "answer": the reference description}
    tokenizer/          byte-level BPE trained on all the text but the pairs' (Qwen2 pre-tokenizer and NFC; specials
                        <|endoftext|>, <|im_start|>, <|im_end|>, <image>, <|pad|>): tokenizer.json +
                        tokenizer_config.json (transformers' AutoTokenizer loads it as Qwen2Tokenizer)
    info.json           seed, sizes and file counts
Same seed -> the same bytes in every file.
"""
from __future__ import annotations

import json
import os
import random

from tqdm import tqdm

from megamod.data import synthetic as syn
from megamod.data.templates import QWEN_SYSTEM, VICUNA_SYSTEM
from megamod.data.tokenizer import QWEN_PATTERN

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|pad|>"]
CAPTION_PROMPTS = ("Describe the image briefly.", "Give a short description of the image.",
                   "What does the image show? Be brief.", "Summarize the visual content of the image.")


def _with_image(question: str, rng: random.Random) -> str:
    """LLaVA data puts the placeholder at the start or at the end of the first question."""
    return f"<image>\n{question}" if rng.random() < 0.7 else f"{question}\n<image>"


def _conversation(sample_id: str, image: str | None, turns: list[tuple[str, str]]) -> dict:
    values = []
    for q, a in turns:
        values += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": sample_id, **({"image": image} if image else {}), "conversations": values}


QUESTION_KINDS = tuple(q.__name__[2:] for q in syn.QUESTIONS) + ("mcq",)  # color, count, position, exist, describe


def _turn(scene: syn.Scene, rng: random.Random, mix: dict | None) -> tuple[str, str]:
    """One question and its answer; `mix` weights the kinds (QUESTION_KINDS), default 20 % A/B/C/D questions and
    the rest uniform (drawn so that the default writes the same bytes as before `mix` existed)."""
    if mix is None:
        kind = "mcq" if rng.random() < 0.2 else rng.choice(syn.QUESTIONS).__name__[2:]
    else:
        kind = rng.choices(QUESTION_KINDS, weights=[mix.get(k, 0.0) for k in QUESTION_KINDS])[0]
    if kind == "mcq":
        item = syn.mcq(scene, rng)
        return syn.mcq_prompt(item), item["answer"]
    return getattr(syn, f"q_{kind}")(scene, rng)


def _train_items(scene: syn.Scene, rng: random.Random, i: int, mix: dict | None = None,
                 turns: tuple[int, int] = (1, 3)):
    caption_q = _with_image(rng.choice(CAPTION_PROMPTS), rng)
    caption = _conversation(f"cap-{i:06d}", scene.image, [(caption_q, syn.describe(scene.objects))])
    qa = [_turn(scene, rng, mix) for _ in range(rng.randint(*turns))]
    qa[0] = (_with_image(qa[0][0], rng), qa[0][1])
    conversation = _conversation(f"conv-{i:06d}", scene.image, qa)
    question, chosen, rejected = syn.preference(scene, rng)
    pair = {"id": f"pair-{i:06d}", "image": scene.image, "question": question, "chosen": chosen,
            "rejected": rejected}
    return caption, conversation, pair


def _pope(scene: syn.Scene, rng: random.Random, adversarial: bool) -> list[tuple[str, str, str]]:
    present = [(o.color, o.shape) for o in scene.objects]
    k = min(len(present), 3)
    positives = rng.sample(present, k)
    absent = scene.absent()
    if adversarial:  # negatives that share a shape or a colour with something in the image
        near = scene.confusable()
        absent = near if len(near) >= k else absent
    negatives = rng.sample(absent, k)
    items = [(c, s, "yes") for c, s in positives] + [(c, s, "no") for c, s in negatives]
    rng.shuffle(items)
    return items


def _dump_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _dump_json(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")


def train_tokenizer(texts: list[str], out_dir: str, vocab_size: int = 1024) -> None:
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer, saved for `tokenizers` and transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
              "bos_token": None, "unk_token": None, "model_max_length": 4096, "errors": "replace",
              "clean_up_tokenization_spaces": False, "split_special_tokens": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


def _texts(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        for turn in row.get("conversations", []):
            out.append(turn["value"])
        out += [row[k] for k in ("question", "chosen", "rejected", "text") if k in row]
    return out


def write_dataset(out: str, size: int = 2000, seed: int = 0, eval_size: int | None = None,
                  vocab_size: int = 1024, progress: bool = True, mix: dict | None = None,
                  turns: tuple[int, int] = (1, 3)) -> dict:
    """Writes the data set to `out`; returns the counts written (also saved as info.json). `mix`: relative weights
    of the question kinds in conversations (QUESTION_KINDS; default 20 % multiple choice, the rest uniform); `turns`:
    the least and most question-answer turns per conversation."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if mix is not None:
        unknown = sorted(set(mix) - set(QUESTION_KINDS))
        if unknown or not any(v > 0 for v in mix.values()) or any(v < 0 for v in mix.values()):
            raise ValueError(f"mix {mix}: weights must be >= 0, not all zero, for kinds among {QUESTION_KINDS}")
    if not 1 <= turns[0] <= turns[1]:
        raise ValueError(f"turns {turns}: expected 1 <= least <= most")
    eval_size = max(10, size // 10) if eval_size is None else eval_size
    for d in ("images/train", "images/eval", "eval", "tokenizer"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    scenes, captions, conversations, pairs, single = [], [], [], [], []
    pope = {"random": [], "adversarial": []}
    mmbench, captions_eval = [], []
    jobs = [("train", i) for i in range(size)] + [("eval", i) for i in range(eval_size)]
    for split, i in tqdm(jobs, desc="synthetic images", disable=not progress, mininterval=1.0):
        rng = random.Random(f"{seed}-{split}-{i}")
        scene = syn.make_scene(rng, f"images/{split}/{i:06d}.png")
        syn.render(scene).save(os.path.join(out, scene.image), format="PNG")
        scenes.append({"split": split, **scene.to_json()})
        if split == "train":
            caption, conversation, pair = _train_items(scene, rng, i, mix, tuple(turns))
            captions.append(caption)
            conversations.append(conversation)
            pairs.append(pair)
            if len(scene.objects) == 1:
                single.append(conversation)
            continue
        for kind in ("random", "adversarial"):
            for color, shape, label in _pope(scene, rng, kind == "adversarial"):
                pope[kind].append({"question_id": len(pope[kind]) + 1, "image": scene.image,
                                   "text": syn.exist_question(color, shape), "label": label})
        for _ in range(2):
            item = syn.mcq(scene, rng)
            mmbench.append({"index": len(mmbench), "question": item["question"],
                            **dict(zip(syn.LETTERS, item["options"])), "answer": item["answer"],
                            "category": item["category"], "image": scene.image})
        captions_eval.append({"question_id": len(captions_eval) + 1, "image": scene.image,
                              "text": "Describe the image.", "answer": syn.describe(scene.objects)})
    for j in range(max(1, size // 20)):
        rng = random.Random(f"{seed}-text-{j}")
        conversations.append(_conversation(f"text-{j:06d}", None, [syn.text_only(rng)]))

    _dump_jsonl(os.path.join(out, "scenes.jsonl"), scenes)
    _dump_json(os.path.join(out, "captions.json"), captions)
    _dump_json(os.path.join(out, "conversations.json"), conversations)
    _dump_json(os.path.join(out, "conversations_single.json"), single)
    _dump_jsonl(os.path.join(out, "pairs.jsonl"), pairs)
    for kind, rows in pope.items():
        _dump_jsonl(os.path.join(out, "eval", f"pope_{kind}.jsonl"), rows)
    _dump_jsonl(os.path.join(out, "eval", "mmbench.jsonl"), mmbench)
    _dump_jsonl(os.path.join(out, "eval", "captions.jsonl"), captions_eval)

    templates = [VICUNA_SYSTEM + " USER: ASSISTANT:", f"system\n{QWEN_SYSTEM}", "user\n", "assistant\n",
                 syn.MCQ_SUFFIX, "A. B. C. D."]
    # Repeated so that the template words become tokens even in a tiny data set (BPE min_frequency 2).
    # Not the preference pairs: they reuse the conversations' words, and a change to them should not move every
    # token id (and with them the teacher's initialisation).
    texts = templates * 10 + _texts(captions + conversations + pope["random"] + mmbench)
    train_tokenizer(texts, os.path.join(out, "tokenizer"), vocab_size)

    info = {"seed": seed, "size": size, "eval_size": eval_size, "image_size": syn.IMAGE_SIZE, "mix": mix,
            "turns": list(turns),
            "counts": {"images": len(scenes), "captions.json": len(captions),
                       "conversations.json": len(conversations), "conversations_single.json": len(single),
                       "pairs.jsonl": len(pairs),
                       "eval/pope_random.jsonl": len(pope["random"]),
                       "eval/pope_adversarial.jsonl": len(pope["adversarial"]), "eval/mmbench.jsonl": len(mmbench),
                       "eval/captions.jsonl": len(captions_eval)}}
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    return info
