"""The question texts evaluation sends, and the template that wraps them, shared by scoring and generation.

Yes/no: "<image>\\n{question}" (the synthetic conversations ask existence questions bare). Multiple choice: LLaVA's
MMBench prompt, "<image>\\n{hint}\\n{question}\\nA. ...\\nB. ...\\n" + MCQ_SUFFIX. Open answers: "<image>\\n{question}".
`instruction`, e.g. LLaVA's SHORT_ANSWER, goes after a yes/no or open question on its own line, as LLaVA's
question files write it. The text without the <image> line is what LLaVA's answer files record as "prompt".
"""
from __future__ import annotations

from megamod.data.templates import TEMPLATES, Template, conv_mode_template, get_template
from megamod.data.tokenizer import IMAGE_TOKEN
from megamod.eval.formats import LETTERS, ChoiceItem

# LLaVA's MMBench single-prediction prompt (model_vqa_mmbench.py); the synthetic data set trains on the same line.
MCQ_SUFFIX = "Answer with the option's letter from the given choices directly."
# LLaVA-1.5's short-answer prompt for VQA-style and yes/no questions.
SHORT_ANSWER = "Answer the question using a single word or phrase."


def template(name: str) -> Template:
    """A megamod template by name, or the one rendering LLaVA's conversation mode `name` (vicuna_v1, qwen_2 ...)."""
    return get_template(name) if name in TEMPLATES else conv_mode_template(name)


def with_image(text: str, has_image: bool) -> str:
    """The question as training saw it: the <image> placeholder on its own line first, unless already there."""
    return f"{IMAGE_TOKEN}\n{text}" if has_image and IMAGE_TOKEN not in text else text


def with_instruction(question: str, instruction: str | None) -> str:
    """The question, then `instruction` on a new line when given (the answer file's "prompt")."""
    return f"{question}\n{instruction}" if instruction else question


def question_text(item, instruction: str | None = None) -> str:
    """What the model is asked about a yes/no or open item, with its image line."""
    return with_image(with_instruction(item.question, instruction), item.image is not None)


def choice_text(item: ChoiceItem) -> str:
    """Hint, question and lettered options: LLaVA's MMBench "prompt" (no image line, no letter instruction)."""
    lines = ([item.hint] if item.hint else []) + [item.question]
    return "\n".join(lines + [f"{letter}. {option}" for letter, option in zip(LETTERS, item.options)])


def choice_question(item: ChoiceItem) -> str:
    """What the model is asked about a multiple-choice item: LLaVA's MMBench prompt with the letter instruction."""
    return with_image(f"{choice_text(item)}\n{MCQ_SUFFIX}", item.image is not None)
