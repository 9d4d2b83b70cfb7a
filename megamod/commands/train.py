"""`megamod train --config RECIPE.yaml [key.path=value ...]`: one stage (align, sft, d2d, d2s, preference).

Run it under torchrun or srun for several ranks; a plain `python -m megamod train` is a world of one. Overrides use
the recipe's key paths, e.g. `optim.lr=1e-4 parallel.tp=2 schedule.steps=100`. Re-running the same command resumes
from the newest complete checkpoint in `<out>/checkpoints`.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML recipe (see examples/)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the recipe")


def run(args) -> int:
    from megamod import distributed
    from megamod.training.config import TeacherRanksConfig, load_config
    from megamod.training.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    if isinstance(cfg.teacher, TeacherRanksConfig):  # the first teacher.ranks ranks serve the teacher
        from megamod.training.teacher_ranks import launch

        split = launch.start(cfg)
        if split.teacher:
            status = launch.serve(cfg, split)
            if status:
                raise SystemExit(status)  # the student stopped on a signal (75): the same status, no traceback
            return 0
    trainer = Trainer(cfg)
    history = trainer.train()
    if history:
        last = history[-1]
        log.info("stage %s finished at step %d: loss %.4f; student written to %s/model", cfg.stage, last["step"],
                 last["loss"], cfg.out)
    distributed.shutdown()
    return 0
