"""One CLIP forward per micro-batch when teacher and student hold the same frozen tower (LLaVA-MoD's case).

The decision is made at start-up by content (training/models.py shared_vision_tower); shared, the teacher's tower
runs once under no_grad and both adapters get its features. Checked against today's path (each model runs its own
tower) on one trainer and the same micro-batches: losses and gradients bitwise equal in fp32.
"""
import pytest
import torch

from tests.training_setup import base_recipe, student_with_teacher_tower

TOWER_WEIGHT = "patch_embedding.weight"  # the one weight the "other tower" student changes (by one ulp)


def _trainer(cfg: dict):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=cfg))


@pytest.fixture(scope="module")
def students(engine_setup, tmp_path_factory):
    """Fresh students around the trained teacher's CLIP tower (as the recipe's students start): one with it as is,
    one with a single weight of it one ulp off."""
    from megamod import distributed

    distributed.initialize(distributed.ParallelConfig())
    root = tmp_path_factory.mktemp("shared_tower")
    return {"same": student_with_teacher_tower(engine_setup, str(root / "same")),
            "other": student_with_teacher_tower(engine_setup, str(root / "other"), nudge=TOWER_WEIGHT)}


@pytest.fixture
def tower_calls(monkeypatch):
    """How many times a CLIP tower ran (teacher's and student's together)."""
    from megamod.models.vision import CLIPVisionTower

    calls = []
    forward = CLIPVisionTower.forward

    def counted(self, images_NCHW):
        calls.append(images_NCHW.shape[0])
        return forward(self, images_NCHW)

    monkeypatch.setattr(CLIPVisionTower, "forward", counted)
    return calls


def _losses_and_grads(trainer, mbs, shared_tower):
    """One step's forward and backward over `mbs` (without the optimizer): per-micro-batch losses and the
    student's accumulated gradients, with `shared_tower` (None: each model runs its own tower, today's path)."""
    from megamod.training.models import unwrap
    from megamod.training.step import forward_backward

    trainer.shared_tower = shared_tower
    trainer.ddp.train()
    losses = forward_backward([trainer.ddp], trainer._forward_step(), mbs, mbs[0].seq_length,
                              trainer.micro_batch_size)
    grads = {n: p.main_grad.detach().clone() for n, p in unwrap(trainer.ddp).named_parameters() if p.requires_grad}
    return losses, grads


@pytest.mark.parametrize("stage", ["d2d", "preference"])
def test_shared_tower_runs_once_per_micro_batch_and_is_bitwise_today(engine_setup, students, tmp_path, stage,
                                                                       tower_calls, caplog):
    p = engine_setup
    with caplog.at_level("INFO", logger="megamod.training.trainer"):
        trainer = _trainer(base_recipe(p["root"], stage, students["same"], str(tmp_path / "run"),
                                       teacher=p["teacher"], schedule={"steps": 1}))
    assert trainer.shared_vision and trainer.shared_tower is trainer.teacher.model.vision_model
    assert "vision tower: shared" in caplog.text and "same vision config and weights" in caplog.text

    mbs = trainer._micro_batches(iter(trainer.loader))
    assert all(mb.images is not None and mb.num_images > 0 for mb in mbs)
    tower = trainer.shared_tower
    tower_calls.clear()
    shared_losses, shared_grads = _losses_and_grads(trainer, mbs, tower)
    assert len(tower_calls) == len(mbs)  # once per micro-batch, for both models
    assert tower_calls == [mb.num_images for mb in mbs]
    tower_calls.clear()
    two_losses, two_grads = _losses_and_grads(trainer, mbs, None)
    assert len(tower_calls) == 2 * len(mbs)  # today: the student's tower and the teacher's

    assert len(shared_losses) == len(two_losses) == len(mbs)
    for a, b in zip(shared_losses, two_losses):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (k, a[k], b[k])
    assert shared_grads.keys() == two_grads.keys()
    assert any(n.startswith("vision_projection.") for n in shared_grads)  # the adapter trains on the features
    for n in shared_grads:
        assert torch.equal(shared_grads[n], two_grads[n]), n
    assert any(bool(g.abs().sum() > 0) for g in shared_grads.values())

    trainer.shared_tower = tower  # a whole step through the trainer, the shared path as built
    tower_calls.clear()
    history = trainer.train()
    assert len(tower_calls) == trainer.num_micro and history[0]["kd" if stage == "d2d" else "preference"] > 0


def test_a_tower_one_weight_apart_is_not_shared(engine_setup, students, tmp_path, tower_calls, caplog):
    p = engine_setup
    with caplog.at_level("INFO", logger="megamod.training.trainer"):
        trainer = _trainer(base_recipe(p["root"], "d2d", students["other"], str(tmp_path / "run"),
                                       teacher=p["teacher"], schedule={"steps": 1}))
    assert not trainer.shared_vision and trainer.shared_tower is None
    assert "vision tower: not shared" in caplog.text and TOWER_WEIGHT in caplog.text
    tower_calls.clear()
    history = trainer.train()
    assert len(tower_calls) == 2 * trainer.num_micro and history[0]["kd"] > 0


def test_other_towers_and_a_trainable_tower_are_not_shared(engine_setup, students, tmp_path, caplog):
    p = engine_setup
    with caplog.at_level("INFO", logger="megamod.training.trainer"):
        other = _trainer(base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "a"), teacher=p["teacher"]))
    assert not other.shared_vision and "weights differ" in caplog.text  # the fixture's student: its own CLIP
    caplog.clear()
    with caplog.at_level("INFO", logger="megamod.training.trainer"):
        trains = _trainer(base_recipe(p["root"], "d2d", students["same"], str(tmp_path / "b"), teacher=p["teacher"],
                                      trainable=["projector", "language", "vision"]))
    assert not trains.shared_vision and "the student's vision tower trains" in caplog.text


def test_image_features_replace_the_tower_in_the_model(engine_setup):
    from megamod.loading.models import load

    p = engine_setup
    model = load(p["teacher"], torch.float32).model
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.vision_model(images)
        assert torch.equal(model.image_embeddings(images, features), model.image_embeddings(images))
    with pytest.raises(ValueError, match="image_features for 1 images, 2 given"):
        model.image_embeddings(images, features[:1])
