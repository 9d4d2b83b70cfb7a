"""Conversation templates: question/answer turns -> token ids, next-token labels and a loss mask.

A template renders the whole conversation to one string and records the character spans the assistant must produce
(its answers and their closing token). The string is tokenized in one piece, so the ids are exactly what the
tokenizer gives for the prompt at inference, and a token is trained when its characters overlap an answer span.

Labels follow the next-token convention, correctly shifted: for tokens [S], `labels[t]` is the token to predict at
position t, i.e. `tokens[t + 1]` when that token belongs to an answer, else -100; `loss_mask[t] = labels[t] != -100`.
(METHOD.md: the reference code masks unshifted labels against next-token logits, an off-by-one not copied here.)

Templates (`<image>` placeholders stay where the data put them; LLaVA data has "<image>\\n" at the start or end of the
first question; each one becomes `num_image_tokens` positions in the model):
- `llava_mod`: LLaVA-MoD's Qwen template, vicuna-v1 style with the tokenizer's end-of-text token (Qwen's
  <|endoftext|>): "{system} USER: {q1} ASSISTANT: {a1}<|endoftext|>USER: {q2} ASSISTANT: {a2}<|endoftext|>";
  trained: " {a}<|endoftext|>" (the space after "ASSISTANT:" is the first thing the model generates).
- `plain`: the align stage, one turn: "<image>" per image + caption + "\\n"; the question text is dropped as LLaVA does;
  trained: caption + "\\n".
- `chatml`: Qwen ChatML: "<|im_start|>system\\n{system}<|im_end|>\\n" then per turn
  "<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n"; trained: "{a}<|im_end|>".
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from megamod.data.tokenizer import IMAGE_TOKEN, Tokenizer, TokenizerError

IGNORE_INDEX = -100
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN_SYSTEM = "You are a helpful assistant."


class SampleError(ValueError):
    """What is wrong with one sample; the dataset adds where the sample is."""


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass
class Rendered:
    text: str
    answer_spans: list[tuple[int, int]]  # character spans [start, end) of `text` that are trained


@dataclass
class Encoded:
    tokens: np.ndarray   # int64 [S]
    targets: np.ndarray  # bool [S]: tokens[t] belongs to an answer (the model is trained to produce it)
    truncated: bool = False

    def labels(self) -> np.ndarray:
        """int64 [S]: labels[t] = tokens[t+1] if that token is trained, else IGNORE_INDEX."""
        labels = np.full(len(self.tokens), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(self.targets[1:], self.tokens[1:], IGNORE_INDEX)
        return labels

    def loss_mask(self) -> np.ndarray:
        """float32 [S]: 1 where labels[t] is a trained token."""
        mask = np.zeros(len(self.tokens), dtype=np.float32)
        mask[:-1] = self.targets[1:]
        return mask


class _Builder:
    def __init__(self):
        self.parts, self.spans, self.pos = [], [], 0

    def add(self, text: str, trained: bool = False) -> None:
        if trained:
            self.spans.append((self.pos, self.pos + len(text)))
        self.parts.append(text)
        self.pos += len(text)

    def done(self) -> Rendered:
        return Rendered("".join(self.parts), self.spans)


def _trained(i: int, n: int, train_on: str) -> bool:
    return train_on == "all" or i == n - 1


class Template(ABC):
    name: str

    @abstractmethod
    def render(self, turns: list[Turn], tokenizer: Tokenizer, train_on: str = "all") -> Rendered:
        """The conversation as one string and the character spans to train."""


class LlavaModTemplate(Template):
    name = "llava_mod"

    def __init__(self, system: str = VICUNA_SYSTEM):
        self.system = system

    def render(self, turns, tokenizer, train_on="all"):
        eod = tokenizer.eod_token
        b = _Builder()
        b.add(self.system + " ")
        for i, turn in enumerate(turns):
            b.add(f"USER: {turn.question} ASSISTANT:")
            b.add(f" {turn.answer}{eod}", _trained(i, len(turns), train_on))
        return b.done()


class PlainTemplate(Template):
    name = "plain"

    def render(self, turns, tokenizer, train_on="all"):
        if len(turns) != 1:
            raise SampleError(f"the plain template takes one question/answer turn, got {len(turns)}")
        n_images = turns[0].question.count(IMAGE_TOKEN)
        if n_images == 0:
            raise SampleError("the plain template (align stage) needs an image, the question has no <image>")
        b = _Builder()
        b.add(IMAGE_TOKEN * n_images)
        b.add(turns[0].answer + "\n", trained=True)
        return b.done()


class ChatMLTemplate(Template):
    name = "chatml"

    def __init__(self, system: str = QWEN_SYSTEM):
        self.system = system

    def render(self, turns, tokenizer, train_on="all"):
        for token in ("<|im_start|>", "<|im_end|>"):
            tokenizer.require(token)
        b = _Builder()
        b.add(f"<|im_start|>system\n{self.system}<|im_end|>\n")
        for i, turn in enumerate(turns):
            b.add(f"<|im_start|>user\n{turn.question}<|im_end|>\n<|im_start|>assistant\n")
            b.add(f"{turn.answer}<|im_end|>", _trained(i, len(turns), train_on))
            b.add("\n")
        return b.done()


TEMPLATES = {"llava_mod": LlavaModTemplate, "plain": PlainTemplate, "chatml": ChatMLTemplate}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]()


# LLaVA's `--conv-mode` names whose conversations megamod renders to the same string (llava/conversation.py in LLaVA,
# LLaVA-NeXT and LLaVA-MoD). vicuna_v1/v1/llava_v1 close an answer with "</s>" where llava_mod writes the tokenizer's
# end-of-text token: the same text for LLaMA/Vicuna tokenizers; with any tokenizer the prompt up to "ASSISTANT:",
# all that evaluation sends, is LLaVA's. LLaVA-MoD's "qwen" (its conv_phi: sep2 "<|endoftext|>") is llava_mod with
# Qwen's tokenizer; LLaVA-NeXT's qwen_1_5/qwen_2/qwen_2_5 are ChatML.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
QWEN_2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CONV_MODES = {
    "vicuna_v1": LlavaModTemplate,
    "v1": LlavaModTemplate,
    "llava_v1": lambda: LlavaModTemplate(LLAVA_V1_SYSTEM),
    "qwen": LlavaModTemplate,
    "qwen_1_5": ChatMLTemplate,
    "qwen_2": ChatMLTemplate,
    "qwen_2_5": lambda: ChatMLTemplate(QWEN_2_5_SYSTEM),
}


def conv_mode_template(name: str) -> Template:
    """The template that renders LLaVA's conversation mode `name` (CONV_MODES)."""
    if name not in CONV_MODES:
        raise ValueError(f"unknown LLaVA conversation mode {name!r}; megamod renders {sorted(CONV_MODES)}")
    return CONV_MODES[name]()


def expanded_length(num_tokens: int, num_images: int, num_image_tokens: int) -> int:
    """Sequence length in the model, where each <image> id becomes num_image_tokens positions."""
    return num_tokens + num_images * (num_image_tokens - 1)


def _truncate(tokens, targets, num_images, image_id, max_length, num_image_tokens):
    """Cut inside the answers only: keep every image and end on a trained token."""
    budget = max_length - num_images * (num_image_tokens - 1)
    if num_images and np.flatnonzero(tokens == image_id)[-1] >= budget:
        raise SampleError(f"truncating to max length {max_length} would cut an <image>")
    cut = max(budget, 0)
    while cut > 0 and not targets[cut - 1]:
        cut -= 1
    if cut == 0:
        raise SampleError(f"no answer token fits within max length {max_length}")
    return tokens[:cut], targets[:cut]


def encode(template: Template, tokenizer: Tokenizer, turns: list[Turn], *, train_on: str = "all",
           max_length: int | None = None, num_image_tokens: int = 1, truncate_answer: bool = False) -> Encoded:
    """Tokens and trained-token flags of one conversation. `train_on="last"` trains the last answer only (preference
    pairs: earlier turns are context). Longer than `max_length` (counted with images expanded to
    `num_image_tokens`) is a SampleError unless `truncate_answer` allows cutting inside the answers."""
    rendered = template.render(turns, tokenizer, train_on)
    ids, offsets = tokenizer.encode_with_offsets(rendered.text)
    tokens = np.asarray(ids, dtype=np.int64)
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
    targets = np.zeros(len(tokens), dtype=bool)
    for a, b in rendered.answer_spans:
        targets |= (starts < b) & (ends > a) & (ends > starts)

    num_images = rendered.text.count(IMAGE_TOKEN)
    image_id = tokenizer.image_id if num_images else -1
    if num_images and int((tokens == image_id).sum()) != num_images:
        raise TokenizerError(f"tokenizer {tokenizer.path} does not encode each {IMAGE_TOKEN} as one token")
    length = expanded_length(len(tokens), num_images, num_image_tokens)
    truncated = False
    if max_length is not None and length > max_length:
        if not truncate_answer:
            raise SampleError(f"{length} tokens (text {len(tokens)}, {num_images} image(s) x {num_image_tokens}) "
                              f"exceed max length {max_length}")
        tokens, targets = _truncate(tokens, targets, num_images, image_id, max_length, num_image_tokens)
        truncated = True
    return Encoded(tokens, targets, truncated)


def encode_prompt(template: Template, tokenizer: Tokenizer, history: list[Turn], question: str) -> np.ndarray:
    """int64 [P]: the conversation up to where the assistant's answer to `question` starts, e.g. "... ASSISTANT:"
    (generation, and scoring candidate answers by their log-probs, see the same prompt as training)."""
    rendered = template.render(history + [Turn(question, "-")], tokenizer)
    return np.asarray(tokenizer.encode(rendered.text[:rendered.answer_spans[-1][0]]), dtype=np.int64)
