"""Runs a list of checks under torchrun, re-initialising Megatron's parallel state for each layout.

Each job writes its results to files that the pytest process compares against single-process references.
Job kinds:
  logits: {"layout", "ckpt", "input_ids", "out", "images"?}  -> fp32 logits [S, V] (images: a saved [N,3,R,R])
  trainer: {"recipe", "out", "resume"?, "tower_out"?} -> the Trainer's per-step metrics (rank 0); tower_out: each
           rank's [shared vision tower decision, holds the tower to share]
  cached_rows: {"recipe", "batches", "out"} -> the teacher-cache rows each DP rank attaches (cache_checks.py)
  memory: {"layout", "model", "mbs", "seq", "out"} -> peak memory of training steps (memory_checks.py)
  eval:   {"layout", "ckpt", "task", "data", "limit", "out", "max_new_tokens"?} -> scoring.evaluate's result (writer)
  train:  {"layout", "ckpt", "batches", "steps", "lr", "out"}  -> losses per step and micro-batch, gradients of
          step 1 as a dist checkpoint (canonical layout) under out/grads
"""
import dataclasses
import faulthandler
import json
import os
import sys

import torch


def _layout(job):
    from megamod.distributed import ParallelConfig

    return ParallelConfig(**job["layout"])


def run_logits(job):
    from megatron.core import parallel_state as ps

    from megamod.commands.logits import compute_logits

    images = torch.load(job["images"]) if job.get("images") else None
    logits_SV = compute_logits(job["ckpt"], job["input_ids"], **job["layout"], images_NCHW=images)
    if logits_SV is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits_SV, job["out"])


def run_train(job):
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megamod import checkpoint, distributed
    from megamod.models.language import LanguageModelConfig, build_language_model
    from megamod.training.step import build_optimizer, lm_forward_step, train_step, wrap_ddp
    from tests.helpers import grads_sharded_state_dict

    meta = checkpoint.read_metadata(job["ckpt"])
    cfg = LanguageModelConfig.from_dict(meta["model"])
    distributed.initialize(_layout(job))
    model = build_language_model(cfg, init_weights=False)
    checkpoint.load_model(model, job["ckpt"])
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], lr=job["lr"])
    # The global batch is split across data-parallel ranks: rank r takes micro-batches r, r+dp, ...
    batches = torch.load(job["batches"])
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    B, S = batches[0][0]["tokens"].shape
    losses, grad_norms = [], []
    grads_dir = os.path.join(job["out"], "grads")

    def save_grads():
        if torch.distributed.get_rank() == 0:
            os.makedirs(grads_dir, exist_ok=True)
        torch.distributed.barrier()
        dist_checkpointing.save(grads_sharded_state_dict(model), grads_dir)

    for step, micro_batches in enumerate(batches[: job["steps"]]):
        mine = micro_batches[dp_rank::dp]
        result = train_step([ddp], optimizer, lm_forward_step(cfg.vocab_size), mine, S, B,
                            before_optimizer_step=save_grads if step == 0 else None)
        losses.append([float(d["lm loss"]) for d in result.losses])
        grad_norms.append(float(result.grad_norm))
    # Every last-stage rank of every DP group reports its micro-batch losses, keyed by DP rank.
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        with open(os.path.join(job["out"], f"losses-dp{dp_rank}.json"), "w") as f:
            json.dump({"dp": dp, "dp_rank": dp_rank, "losses": losses, "grad_norms": grad_norms}, f)


def run_losses(job):
    from tests.distributed import loss_checks

    loss_checks.run(job)


def run_trainer(job):
    """{"recipe": dict, "out": json path, "resume"?: [run dir, step]}: one stage with megamod's Trainer; rank 0
    writes the step history. With "resume", the run starts from a copy of that run directory as a crash right after
    its step checkpoint would have left it (training_setup.run_as_of)."""
    from megamod import distributed
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer
    from tests.training_setup import run_as_of

    if job.get("resume"):
        distributed.initialize(distributed.ParallelConfig())  # the process group, for the barrier
        if torch.distributed.get_rank() == 0:
            run_as_of(job["resume"][0], job["recipe"]["out"], job["resume"][1])
        torch.distributed.barrier()
    trainer = Trainer(load_config(base=job["recipe"]))
    history = trainer.train()
    if job.get("tower_out"):  # per rank: the shared-tower decision, and whether a tower to share is here
        towers = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(towers, [trainer.shared_vision, trainer.shared_tower is not None])
        if torch.distributed.get_rank() == 0:
            with open(job["tower_out"], "w") as f:
                json.dump(towers, f)
    if torch.distributed.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(history, f)
        if job.get("ddp_out"):  # what the run's DDP wrapper was configured with
            with open(job["ddp_out"], "w") as f:
                json.dump(dataclasses.asdict(trainer.ddp.ddp_config), f, default=str)


def run_eval(job):
    from megamod import distributed
    from megamod.eval.runner import is_writer
    from megamod.eval.scoring import evaluate

    distributed.initialize(distributed.ParallelConfig(**job["layout"]))
    result = evaluate(job["ckpt"], job["task"], job["data"], limit=job["limit"], batch_size=3,
                      max_new_tokens=job.get("max_new_tokens", 8), dtype="float32")
    if is_writer():
        with open(job["out"], "w") as f:
            json.dump(result, f)


def run_memory(job):
    from tests.distributed import memory_checks

    memory_checks.run(job)


def run_cached_rows(job):
    from tests.distributed import cache_checks

    cache_checks.run(job)


_JOBS = {"eval": run_eval, "logits": run_logits, "train": run_train, "losses": run_losses, "trainer": run_trainer,
         "cached_rows": run_cached_rows, "memory": run_memory}


def main():
    timeout = int(os.environ.get("MEGAMOD_WORKER_TIMEOUT", "400"))
    # A gloo hang is silent: dump every thread's stack and exit before the launcher's timeout.
    faulthandler.dump_traceback_later(timeout, exit=True)
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    from megamod import distributed

    for job in jobs:
        _JOBS[job["kind"]](job)
        torch.distributed.barrier()
    distributed.shutdown()
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
