"""Training stages as `megamod train` runs them, in-job teacher or teacher on its own ranks, several in one torchrun
launch (start-up is most of a small job's time on 2 cores).

argv: a JSON list of jobs {"recipe": dict, "out": history JSON, "grads": folder, "idle": k?, "hang_after": n?,
"resume": [run directory, step]?}.
A job whose recipe has teacher.ranks splits the world as `megamod train` does; one with an in-job teacher and
"idle": k runs on the last world - k ranks (the first k wait), so that a launch of teacher + student ranks also runs
the in-job reference on as many ranks as the student has. Rank 0 of the student's world writes the per-step history;
every student rank writes its parameters' gradients of the first step (main_grad, as the optimizer saw them: both
runs start from the same weights) to grads/rank{student rank}.pt. "hang_after": n makes every teacher rank stop
answering after n steps (a teacher that hangs), without leaving the process. "resume" starts the job from a copy
of that run as a crash right after its checkpoint of that step left it (tests/training_setup.run_as_of).
"""
import faulthandler
import json
import os
import sys
import time

import torch


def _train(cfg, job) -> None:
    from megamod.training.models import unwrap
    from megamod.training.trainer import Trainer

    trainer = Trainer(cfg)
    grads = {}
    update_metrics = trainer._update_metrics

    def keep_first_grads(result):  # called right after the optimizer step, before the next step zeroes them
        if not grads:
            grads.update({n: p.main_grad.detach().clone() for n, p in unwrap(trainer.ddp).named_parameters()
                          if getattr(p, "main_grad", None) is not None})
        return update_metrics(result)

    trainer._update_metrics = keep_first_grads
    history = trainer.train()
    rank = torch.distributed.get_rank()
    if job.get("grads"):
        os.makedirs(job["grads"], exist_ok=True)
        torch.save(grads, os.path.join(job["grads"], f"rank{rank}.pt"))
    if rank == 0:
        with open(job["out"], "w") as f:
            json.dump(history, f)


def _serve(cfg, split, job) -> None:
    from megamod.training.teacher_ranks.server import TeacherServer

    server = TeacherServer(cfg, split)
    if job.get("hang_after") is not None:
        serve_one, served = server._serve_one, []

        def hanging(d):
            if len(served) >= job["hang_after"]:
                time.sleep(3600)
            served.append(d)
            return serve_one(d)

        server._serve_one = hanging
    status = server.serve()
    assert status == 0, status


def run(job) -> None:
    from megatron.core import parallel_state

    from megamod import split_world as world
    from megamod.training.teacher_ranks import launch
    from megamod.training.config import TeacherRanksConfig, load_config

    cfg = load_config(base=job["recipe"])
    if job.get("resume"):  # a copy of a run as a crash right after its checkpoint of step n left it
        from tests.training_setup import run_as_of

        if torch.distributed.get_rank() == 0:
            run_as_of(job["resume"][0], cfg.out, job["resume"][1])
        torch.distributed.barrier()
    if isinstance(cfg.teacher, TeacherRanksConfig):
        split = launch.start(cfg)
        (_serve(cfg, split, job) if split.teacher else _train(cfg, job))
    elif job.get("idle"):
        split = world.split(job["idle"], cfg.parallel.timeout_s)
        if not split.teacher:
            _train(cfg, job)
    else:
        _train(cfg, job)
    world.unsplit()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    torch.distributed.barrier()


def main(path: str) -> int:
    from megamod import distributed

    faulthandler.dump_traceback_later(int(os.environ.get("MEGAMOD_WORKER_TIMEOUT", "400")), exit=True)
    with open(path) as f:
        jobs = json.load(f)
    # the launcher's world is the link between the sides: its timeout is the shortest a job asks for
    distributed.start_process_group(min(j["recipe"].get("parallel", {}).get("timeout_s", 600) for j in jobs))
    for job in jobs:
        run(job)
    distributed.shutdown()
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
