"""fp16 training: a step whose gradients overflow the loss scale is skipped, as megatron-core intends (the update
is not applied, the learning-rate schedule does not advance), logged as skipped with the loss scale, and training
goes on; not a "non-finite gradient norm" error. CPU runs 16-bit parameters with the distributed optimizer."""
import math

import pytest
import torch

from tests.training_setup import base_recipe


def _run(p, out, monkeypatch, overflow_calls: int, steps: int):
    from megamod.training.config import load_config
    from megamod.training.objective import Objective
    from megamod.training.trainer import Trainer

    real, calls = Objective.loss, []

    def loss(self, student, teacher, mb):  # the first `overflow_calls` micro-batches' gradients overflow fp16
        total, report = real(self, student, teacher, mb)
        calls.append(1)
        return (total * 1e30 if len(calls) <= overflow_calls else total), report

    monkeypatch.setattr(Objective, "loss", loss)
    cfg = base_recipe(p["root"], "sft", p["student"], out, dtype="float16", schedule={"steps": steps},
                      optim={"distributed_optimizer": True, "initial_loss_scale": 1024.0})
    trainer = Trainer(load_config(base=cfg))
    before = {n: t.detach().clone() for n, t in trainer.student.model.named_parameters()}
    history = trainer.train()
    moved = any(not torch.equal(t, before[n]) for n, t in trainer.student.model.named_parameters())
    return history, moved


def test_overflow_step_is_skipped_and_training_goes_on(engine_setup, tmp_path, monkeypatch):
    p = engine_setup
    skipped, moved = _run(p, str(tmp_path / "one"), monkeypatch, overflow_calls=1, steps=1)
    assert skipped[0]["skipped"] == 1 and skipped[0]["loss_scale"] > 0 and math.isnan(skipped[0]["grad_norm"])
    assert not moved  # the update was not applied

    clean, _ = _run(p, str(tmp_path / "clean"), monkeypatch, overflow_calls=0, steps=3)
    poisoned, moved = _run(p, str(tmp_path / "poisoned"), monkeypatch, overflow_calls=1, steps=3)
    assert [h.get("skipped", 0) for h in clean] == [0, 0, 0]
    assert [h.get("skipped", 0) for h in poisoned] == [1, 0, 0] and moved
    assert all(math.isfinite(h["grad_norm"]) for h in poisoned[1:])
    # the schedule did not advance on the skipped step: the poisoned run's learning rates lag the clean run's by one
    assert [h["lr"] for h in poisoned[1:]] == pytest.approx([h["lr"] for h in clean[:2]])
    assert poisoned[0]["lr"] != pytest.approx(clean[0]["lr"])
