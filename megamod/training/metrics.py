"""Step metrics: model FLOPs, peak memory, and the rank-0 log (console line, TensorBoard, progress bar).

FLOPs follow the usual dense-matmul count (Megatron / PaLM): a forward pass costs 2 FLOPs per weight per token for
every weight a token goes through (the activated experts only), plus 4*S*h per layer per token for the attention
scores and weighted values (full S x S, as Megatron-LM counts). Backward costs twice the forward. A distillation
step counts the student's forward and backward (3x) and the teacher's forward (1x).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time

import torch

from megamod.models.language import LanguageModelConfig

log = logging.getLogger(__name__)


def language_forward_flops_per_token(cfg: LanguageModelConfig, seq_length: int) -> float:
    h, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.num_query_groups * cfg.head_dim
    attn_weights = h * cfg.num_attention_heads * cfg.head_dim * 2 + h * kv * 2  # q, o, k, v
    dense_ffn = 3 * h * cfg.ffn_hidden_size
    n_moe = sum(1 for x in cfg.moe_layer_pattern if x) if cfg.num_experts else 0
    if cfg.num_experts and not cfg.moe_layer_pattern:
        n_moe = L
    moe_ffn = cfg.moe_router_topk * 3 * h * (cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size) + h * (
        cfg.num_experts or 0)
    matmul = L * attn_weights + (L - n_moe) * dense_ffn + n_moe * moe_ffn + h * cfg.vocab_size
    return 2.0 * matmul + 4.0 * seq_length * h * L


def vision_forward_flops_per_image(vision) -> float:
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    h, layers = vision.hidden_size, vision.layers_to_run
    per_layer = 2.0 * tokens * (4 * h * h + 2 * h * vision.intermediate_size) + 4.0 * tokens * tokens * h
    return layers * per_layer + 2.0 * tokens * 3 * vision.patch_size ** 2 * h


def step_flops(loaded, tokens: int, seq_length: int, images: int, passes: float) -> float:
    """FLOPs of `passes` x forward of `loaded` (a training.models.LoadedModel) on `tokens` tokens and `images`."""
    flops = tokens * language_forward_flops_per_token(loaded.language, seq_length)
    if loaded.kind == "llava" and images:
        v = loaded.cfg.vision
        flops += images * (vision_forward_flops_per_image(v) + 2.0 * v.num_image_tokens * (
            v.hidden_size * loaded.language.hidden_size + loaded.language.hidden_size ** 2))
    return passes * flops


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class StepLogger:
    """Rank 0 only (the others get enabled=False and do nothing). Every step's metrics also go, one JSON object per
    line, to `jsonl_path` (appended: a resumed run repeats the steps after its checkpoint; readers keep the last)."""

    def __init__(self, enabled: bool, total_steps: int, start_step: int, log_every: int = 1,
                 tensorboard_dir: str | None = None, progress: bool = True, title: str = "train",
                 jsonl_path: str | None = None):
        self.enabled, self.log_every, self.total = enabled, max(1, log_every), total_steps
        self.writer = self.bar = self.jsonl = None
        if not enabled:
            return
        if jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl_path)), exist_ok=True)
            self.jsonl = open(jsonl_path, "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(tensorboard_dir, exist_ok=True)
            self.writer = SummaryWriter(tensorboard_dir)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=title, dynamic_ncols=True, leave=True)
        self.history: list[dict] = []

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.history.append({"step": step, **metrics})
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr") if k in metrics}, refresh=False)
        if step % self.log_every == 0 or step == self.total:
            line = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            (self.bar.write if self.bar is not None else print)(f"step {step}/{self.total} | {line}")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def lap(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return elapsed
