"""Scoring an exported HF checkpoint with stock transformers: the check that a release reproduces its score.

The prompts and candidate tokens are megamod's (scoring.build_rows, the tokenizer saved with the export); everything
the model computes comes from transformers: `LlavaForConditionalGeneration`, its image processor
(`AutoImageProcessor`, CLIPImageProcessor from the export's preprocessor_config.json), and the number of positions
an <image> takes, read from the HF config. One process, no megatron.
"""
from __future__ import annotations

import os

import torch

from megamod.eval.formats import open_image
from megamod.eval.tasks import read_items


def _image_positions(config) -> int:
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    return patches + (1 if config.vision_feature_select_strategy == "full" else 0)


def _expand(prompt: list[int], image_id: int, n: int) -> list[int]:
    """Each <image> id repeated over the n positions the HF model fills (as its processor writes prompts)."""
    out = []
    for t in prompt:
        out += [t] * n if t == image_id else [t]
    return out


def hf_scores(model, image_processor, rows: list, *, batch_size: int = 8) -> dict:
    """{key: [score per class]} for scoring.build_rows rows, a class's score its best candidate's logit."""
    image_id, n = model.config.image_token_id, _image_positions(model.config)
    pad_id = model.config.text_config.pad_token_id or 0
    scores = {}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids = [_expand(prompt, image_id, n) for _, prompt, _, _ in batch]
        S = max(len(i) for i in ids)
        input_ids_BS = torch.full((len(ids), S), pad_id, dtype=torch.long)
        attention_BS = torch.zeros((len(ids), S), dtype=torch.long)
        for b, row in enumerate(ids):
            input_ids_BS[b, :len(row)] = torch.tensor(row)
            attention_BS[b, :len(row)] = 1
        images = [open_image(item) for _, _, item, _ in batch if item is not None]
        pixels = image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        with torch.no_grad():
            logits_BSV = model(input_ids=input_ids_BS, attention_mask=attention_BS, pixel_values=pixels).logits
        for b, (key, _, _, cands) in enumerate(batch):
            last_V = logits_BSV[b, len(ids[b]) - 1].float()
            scores[key] = [last_V[c].max().item() for c in cands]
    return scores


def hf_generate(model, image_processor, rows: list, *, max_new_tokens: int, stop_ids: list[int]) -> dict:
    """{key: greedy ids, the stop token excluded} by transformers' generate, one row at a time (no padding), for
    rows (key, prompt ids with one <image> id per image, item with the image or None) as eval/generate.py takes them."""
    image_id, n = model.config.image_token_id, _image_positions(model.config)
    out = {}
    for key, prompt, src in rows:
        expanded = _expand(prompt, image_id, n)
        input_ids_BS = torch.tensor([expanded])
        pixels = image_processor(images=[open_image(src)], return_tensors="pt")["pixel_values"] if src else None
        with torch.no_grad():
            ids_BS = model.generate(input_ids=input_ids_BS, attention_mask=torch.ones_like(input_ids_BS),
                                    pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                    eos_token_id=list(stop_ids), pad_token_id=stop_ids[0], suppress_tokens=[image_id])
        new = ids_BS[0, len(expanded):].tolist()
        stops = [i for i, t in enumerate(new) if t in stop_ids]
        out[key] = new[:stops[0]] if stops else new
    return out


def evaluate_hf(hf_dir: str, task: str, data: str, *, image_folder: str | None = None, batch_size: int = 8,
                limit: int | None = None, circular: bool = False, template: str = "llava_mod",
                instruction: str | None = None) -> dict:
    """The metrics `scoring.evaluate` reports, computed by transformers on an exported LLaVA checkpoint."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    from megamod.data.tokenizer import load_tokenizer
    from megamod.eval.scoring import build_rows, metrics

    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        raise FileNotFoundError(f"{hf_dir} has no config.json: not an HF checkpoint")
    items = read_items(task, data, image_folder, limit)
    tokenizer = load_tokenizer(hf_dir)
    model = LlavaForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if tokenizer.token_to_id("<image>") != model.config.image_token_id:
        raise ValueError(f"{hf_dir}: the tokenizer has <image> at id {tokenizer.token_to_id('<image>')}, the model "
                         f"reads images at id {model.config.image_token_id}")
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    rows = build_rows(tokenizer, task, items, circular=circular, template=template, instruction=instruction)
    scores = hf_scores(model, processor, rows, batch_size=batch_size)
    return {**metrics(task, items, scores, circular), "hf": hf_dir, "data": data}
