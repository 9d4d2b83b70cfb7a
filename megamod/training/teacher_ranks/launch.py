"""Starting a job whose teacher runs on its own ranks: every rank calls `start`; a teacher rank then `serve`s, a
student rank builds the Trainer (which finds the split made)."""
from __future__ import annotations

from megamod import split_world as world


def start(cfg) -> world.Split:
    """The process group, the split (teacher.ranks first ranks: teacher), and on a teacher rank megatron's parallel
    state at teacher.parallel (a student rank's is the Trainer's, at `parallel`)."""
    from megamod import distributed

    timeout_s = cfg.parallel.timeout_s
    distributed.start_process_group(timeout_s)
    split = world.split(cfg.teacher.ranks, timeout_s)
    if split.teacher:
        t = cfg.teacher.parallel
        distributed.initialize(distributed.ParallelConfig(tp=t.tp, pp=t.pp), seed=cfg.seed, timeout_s=timeout_s)
    return split


def serve(cfg, split: world.Split) -> int:
    """A teacher rank's whole run; returns the student's exit status (0: done; the job then ends together)."""
    from megamod import distributed
    from megamod.training.teacher_ranks.server import TeacherServer

    status = TeacherServer(cfg, split).serve()
    if status == 0:
        distributed.shutdown()
    return status
