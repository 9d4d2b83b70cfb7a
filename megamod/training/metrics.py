"""Step metrics: model FLOPs, peak memory, and the rank-0 log (console line, TensorBoard, progress bar).

FLOPs are megamod/flops.py's count: what the step computes, frozen weights without their weight gradients, causal
attention scores, the vision towers. A distillation step counts the student's forward and backward and the online
teacher's forward (a teacher on its own ranks counts its forwards there: teacher_ranks/server.py).
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import time

import torch

from megamod.flops import model_flops

log = logging.getLogger(__name__)


def step_flops(loaded, tokens: int, pairs: int, images: int, groups=None) -> float:
    """Model FLOPs (megamod/flops.py's count) of `loaded` (a loading.models.LoadedModel) on a step's `tokens` real
    tokens holding `pairs` causal (query, key) pairs and `images` images: forward only when groups is None (a
    teacher), else forward and backward with those parameter groups trainable."""
    vision = loaded.family.vision(loaded.cfg)
    return model_flops(loaded.language, vision, tokens, pairs, images, groups)["total"]


def micro_batch_counts(mbs: list) -> tuple[int, int, float]:
    """Real tokens, images and causal (query, key) pairs of these micro-batches: what step_flops counts."""
    lengths = [(~m.padding).sum(1).to(torch.float64) for m in mbs]
    return (sum(m.num_tokens for m in mbs), sum(m.num_images for m in mbs),
            sum(float((n * (n + 1) / 2).sum()) for n in lengths))


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
