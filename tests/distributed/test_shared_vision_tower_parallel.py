"""The shared CLIP tower (one forward per micro-batch for teacher and student) at TP=2 and PP=2 against one process.

A student around the teacher's tower shares it at every layout: every rank agrees (each compares its own shard),
the tower to run lives on the first pipeline stage only, and the losses and gradient norms of a d2d run agree with
the single-process run at rtol 1e-5 (the layouts' own tolerance, tests/distributed/test_engine_parallel.py).
"""
import json

import pytest

from tests.helpers import run_jobs
from tests.training_setup import base_recipe, student_with_teacher_tower

KEYS = ("loss", "kd", "grad_norm")


def test_shared_tower_at_tp2_and_pp2_matches_one_process(engine_setup, tmp_path):
    from megamod import distributed
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    p = engine_setup
    distributed.initialize(distributed.ParallelConfig())
    student = student_with_teacher_tower(p, str(tmp_path / "student"))

    def recipe(name, **extra):
        return base_recipe(p["root"], "d2d", student, str(tmp_path / name), teacher=p["teacher"],
                           schedule={"steps": 2}, **extra)

    reference = Trainer(load_config(base=recipe("one")))
    assert reference.shared_vision
    reference = reference.train()
    layouts = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}
    run_jobs(2, [{"kind": "trainer", "recipe": recipe(name, parallel=layout), "out": str(tmp_path / f"{name}.json"),
                  "tower_out": str(tmp_path / f"{name}_tower.json")} for name, layout in layouts.items()],
             str(tmp_path))
    for name in layouts:
        with open(tmp_path / f"{name}_tower.json") as f:
            towers = json.load(f)
        # TP: both ranks hold a shard of the tower; PP: only the first stage holds it.
        assert towers == ([[True, True], [True, True]] if name == "tp2" else [[True, True], [True, False]]), name
        with open(tmp_path / f"{name}.json") as f:
            history = json.load(f)
        assert [h["step"] for h in history] == [r["step"] for r in reference]
        for h, r in zip(history, reference):
            for k in KEYS:
                assert h[k] == pytest.approx(r[k], rel=1e-5), (name, h["step"], k, h[k], r[k])
