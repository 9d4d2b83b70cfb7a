"""One d2s training step on one GPU with the teacher online: the Trainer as a user runs it (bf16 by default)."""
import math

import pytest
import torch

from tests.training_setup import base_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_d2s_step_with_online_teacher(engine_setup, tmp_path):
    from megamod.models.moe import AlltoAllTokenDispatcher
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    p = engine_setup
    trainer = Trainer(load_config(base=base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / "run"),
                                                   teacher=p["teacher"], schedule={"steps": 1})))
    student, teacher = trainer.student.model, trainer.teacher.model
    assert trainer.dtype == torch.bfloat16  # dtype "auto" on a GPU
    for model in (student, teacher):
        assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in model.parameters())
    dispatchers = [m.token_dispatcher for m in student.modules() if hasattr(m, "token_dispatcher")]
    assert dispatchers and all(type(d) is AlltoAllTokenDispatcher for d in dispatchers)  # megamod's CUDA kernels
    student_before = {n: t.detach().clone() for n, t in student.named_parameters()}
    teacher_before = {n: t.detach().clone() for n, t in teacher.named_parameters()}

    (metrics,) = trainer.train()

    assert metrics["step"] == 1
    for key in ("loss", "kd", "ce", "grad_norm"):
        assert math.isfinite(metrics[key]) and metrics[key] > 0, (key, metrics[key])
    assert metrics["peak_mem_gb"] > 0 and metrics["tokens_per_s"] > 0
    changed = {n for n, t in student.named_parameters() if not torch.equal(t, student_before[n])}
    # One Adam step moves every weight by about lr; a tensor all of whose entries are too large for bf16 to show
    # that could stay put, so: nothing outside the trainable set moved, and each trainable kind did.
    assert changed and changed <= set(trainer.trainable)
    assert any(".mlp.router." in n for n in changed) and any("local_experts" in n for n in changed)
    assert any(n.startswith("vision_projection.") for n in changed)
    for n, t in teacher.named_parameters():
        assert torch.equal(t, teacher_before[n]), n
