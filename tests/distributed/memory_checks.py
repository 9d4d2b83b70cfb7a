"""Worker side of tests/distributed/test_plan_memory.py: the measured peak memory of student training steps.

Job: {"kind": "memory", "layout": {"tp", "ep"}, "model": LanguageModelConfig dict, "mbs", "seq", "out"}.
Measured: the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) over model build,
optimizer and two training steps, minus the resident memory just before the build. Launched with
MALLOC_MMAP_THRESHOLD_ fixed, so that glibc returns freed tensors to the system instead of keeping them in its
heap: the peak is then that of live tensors plus a little, as torch.cuda.max_memory_allocated on a GPU.
Every rank writes out/rank{r}.json: {"measured": bytes, "params": its parameter count}.
"""
import gc
import json
import os
import re

import torch


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+)", f.read()).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _batches(vocab: int, mbs: int, seq: int, n: int):
    g = torch.Generator().manual_seed(0)
    return [{"tokens": torch.randint(0, vocab, (mbs, seq), generator=g),
             "labels": torch.randint(0, vocab, (mbs, seq), generator=g),
             "loss_mask": torch.ones(mbs, seq)} for _ in range(n)]


def _steps(cfg, job, steps: int) -> int:
    """Builds and trains a model; returns its parameter count on this rank."""
    from megamod.models.language import build_language_model
    from megamod.training.step import build_optimizer, lm_forward_step, train_step, wrap_ddp

    torch.manual_seed(0)
    model = build_language_model(cfg, init_weights=True)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], lr=1e-4)
    for _ in range(steps):
        train_step([ddp], optimizer, lm_forward_step(cfg.vocab_size), _batches(cfg.vocab_size, job["mbs"],
                   job["seq"], 1), job["seq"], job["mbs"])
    return sum(p.numel() for p in model.parameters())


def run(job):
    from megamod import distributed
    from megamod.models.language import LanguageModelConfig

    distributed.initialize(distributed.ParallelConfig(**job["layout"]))
    cfg = LanguageModelConfig.from_dict(job["model"])
    _steps(cfg, job, 1)  # warm-up: lazy imports, kernels and thread pools are not the model's memory
    gc.collect()
    torch.distributed.barrier()
    before = _status("VmRSS")
    _reset_peak()
    params = _steps(cfg, job, 2)
    measured = _status("VmHWM") - before
    os.makedirs(job["out"], exist_ok=True)
    with open(os.path.join(job["out"], f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump({"measured": measured, "params": params}, f)
