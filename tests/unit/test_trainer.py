"""The engine in one process: stages, teacher handling, loss sanity at equal weights, NaN stop, resume."""
import math
import os
import signal
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.training_setup import base_recipe, recipe


def _trainer(cfg: dict):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=cfg))


def _plain(directory: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(directory)


def test_d2s_trains_only_its_set_and_leaves_the_teacher_alone(engine_setup, tmp_path):
    p = engine_setup
    trainer = _trainer(base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / "run"), teacher=p["teacher"],
                                   schedule={"steps": 3}, log={"tensorboard": True}))
    teacher_before = {n: t.clone() for n, t in trainer.teacher.model.named_parameters()}
    student_before = {n: t.clone() for n, t in trainer.student.model.named_parameters()}
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(h["kd"] > 0 and h["ce"] > 0 and h["aux"] > 0 for h in history)
    assert all(h["tokens_per_s"] > 0 and h["tflops_per_rank"] > 0 and h["peak_mem_gb"] > 0 for h in history)
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)

    for n, t in trainer.teacher.model.named_parameters():
        assert torch.equal(t, teacher_before[n]), n
        assert not t.requires_grad and t.grad is None
    assert not trainer.teacher.model.training
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(t) for t in trainer.teacher.model.parameters()}
    assert all(id(t) not in {id(k) for k in trainer.optimizer.state} for t in trainer.teacher.model.parameters())

    changed = {n for n, t in trainer.student.model.named_parameters() if not torch.equal(t, student_before[n])}
    trainable = set(trainer.trainable)
    assert changed == trainable  # every trainable tensor moved, nothing else did
    assert any(".mlp.router." in n for n in changed) and any("local_experts" in n for n in changed)
    assert any(n.startswith("vision_projection.") for n in changed)
    frozen_kinds = ("self_attention", "layernorm", "word_embeddings", "output_layer", "vision_model.")
    assert not any(k in n for n in changed for k in frozen_kinds)


def test_teacher_equal_to_student_gives_zero_kd_and_zero_gradient(engine_setup, tmp_path):
    p = engine_setup
    cfg = base_recipe(p["root"], "d2d", p["teacher"], str(tmp_path / "run"), teacher=p["teacher"],
                      schedule={"steps": 1})
    step1 = _trainer(cfg).train()[0]
    assert abs(step1["kd"]) <= 1e-6
    assert step1["grad_norm"] <= 1e-6


def test_dpo_starts_at_log_2_with_the_teacher_as_reference(engine_setup, tmp_path):
    p = engine_setup
    cfg = base_recipe(p["root"], "preference", p["teacher"], str(tmp_path / "run"), teacher=p["teacher"],
                      schedule={"steps": 1})
    step1 = _trainer(cfg).train()[0]
    assert step1["preference"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(step1["reward_margin"]) <= 1e-6
    kto = base_recipe(p["root"], "preference", p["teacher"], str(tmp_path / "kto"), teacher=p["teacher"],
                      schedule={"steps": 1}, loss={"preference": "kto_pair"})
    assert _trainer(kto).train()[0]["preference"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0)


def test_untrained_or_mismatched_teachers_are_refused(engine_setup, tmp_path):
    p = engine_setup
    with pytest.raises(ValueError, match="freshly initialised"):
        _trainer(base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "a"), teacher=p["teacher_init"]))
    with pytest.raises(ValueError, match="sparse student.*upcycle"):
        _trainer(base_recipe(p["root"], "d2s", p["student"], str(tmp_path / "b"), teacher=p["teacher"]))
    with pytest.raises(ValueError, match="needs a teacher"):
        _trainer(base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "c")))
    # A teacher whose tokenizer gives ids other tokens cannot teach this student, whatever rows either has.
    import json

    from megamod import checkpoint
    from megamod.data.tokenizer import TokenizerError, load_tokenizer
    from megamod.families.factory import init_checkpoint
    from tests.helpers import swap_token_ids
    from tests.training_setup import TEACHER_LM, llava_config

    tok_dir = os.path.join(p["data"], "tokenizer")
    tok, other_tok = load_tokenizer(tok_dir), swap_token_ids(tok_dir, str(tmp_path / "other_tok"))
    other = str(tmp_path / "other_teacher")
    init_checkpoint(llava_config(tok.vocab_size + 7, tok.image_id, **TEACHER_LM), other,
                    tokenizer_dir=other_tok)
    meta = checkpoint.read_metadata(other)
    with open(os.path.join(other, checkpoint.METADATA), "w") as f:
        json.dump({**meta, "source": {"trained": "elsewhere"}}, f)
    with pytest.raises(TokenizerError, match=f"teacher {other}: tokenizer {other}/tokenizer .* and the student's "
                                             f"tokenizer {p['student']}/tokenizer .* different tokenizers: id 100"):
        _trainer(base_recipe(p["root"], "d2d", p["student"], str(tmp_path / "d"), teacher=other))


def test_all_zero_teacher_weights_are_an_error():
    from megamod.loading.models import check_weights_loaded

    layer = torch.nn.Linear(4, 4)
    check_weights_loaded(layer, "ok")
    torch.nn.init.zeros_(layer.weight)
    with pytest.raises(ValueError, match="all zero"):
        check_weights_loaded(layer, "teacher-dir")


def test_non_finite_loss_stops_with_step_and_rank(engine_setup, tmp_path, monkeypatch):
    from megamod.training.objective import Objective

    real = Objective.loss

    def poisoned(self, student, teacher, mb):
        total, report = real(self, student, teacher, mb)
        return total * float("nan"), {**report, "loss": torch.tensor(float("nan"))}

    monkeypatch.setattr(Objective, "loss", poisoned)
    p = engine_setup
    trainer = _trainer(base_recipe(p["root"], "sft", p["student"], str(tmp_path / "run")))
    with pytest.raises(FloatingPointError, match=r"step 1 on rank\(s\) \[0\]"):
        trainer.train()


def test_recipe_errors_name_the_key(tmp_path):
    from megamod.training.config import ConfigError, load_config

    good = {"stage": "sft", "student": "s", "out": "o", "data": {"train": [{"path": "x.json"}]}}
    cfg = load_config(base=good, overrides=["optim.lr=3e-4", "parallel.tp=2", "schedule.steps=7"])
    assert (cfg.optim.lr, cfg.parallel.tp, cfg.schedule.steps) == (3e-4, 2, 7)
    path = recipe(str(tmp_path / "r.yaml"), **{**good, "optim": {"lrr": 1}})
    with pytest.raises(ConfigError, match=r"r.yaml.optim: unknown key\(s\) \['lrr'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match="schedule.steps: expected int"):
        load_config(base=good, overrides=["schedule.steps=many"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(base={**good, "stage": "d2s"})
    with pytest.raises(ValueError, match="unknown stage 'd3s'"):
        load_config(base={**good, "stage": "d3s"})


def _run_cli(config: str, env_extra: dict, log_path: str) -> tuple[int, str]:
    """`megamod train` in a process of its own, with the fault in env_extra (tests/faults.py); no process of it may
    outlive it (megatron's checkpoint writers included)."""
    from tests.faults import run_watched

    # Same thread count as this process (the uninterrupted run is in-process): float sums are then bitwise equal.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": REPO, **env_extra}
    rc, out, survivors = run_watched([sys.executable, os.path.join(REPO, "tests", "faults.py"), "train", "--config",
                                      config], env, log_path, timeout_s=300, cwd=REPO)
    assert not survivors, f"processes outlived the run: {survivors}"
    return rc, out


def test_sigkill_then_resume_is_bitwise_equal_to_an_uninterrupted_run(engine_setup, tmp_path, caplog):
    from megamod.training import checkpoint as train_checkpoint
    from tests.faults import FAULT_ENV

    p = engine_setup
    common = dict(schedule={"steps": 4}, checkpoint={"every": 2, "keep": None})
    _trainer(base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / "straight"), teacher=p["teacher"],
                         **common)).train()

    config = recipe(str(tmp_path / "d2s.yaml"), **base_recipe(p["root"], "d2s", p["sparse"],
                                                              str(tmp_path / "killed"), teacher=p["teacher"], **common))
    rc, out = _run_cli(config, {FAULT_ENV: '{"kill": "after_save", "step": 2}'}, str(tmp_path / "killed.log"))
    assert rc == -signal.SIGKILL, out[-3000:]
    assert not os.path.exists(tmp_path / "killed" / "model")
    rc, out = _run_cli(config, {}, str(tmp_path / "resumed.log"))
    assert rc == 0, out[-3000:]
    assert "resumed from" in out and "step_0000002" in out
    straight, after = _plain(str(tmp_path / "straight" / "model")), _plain(str(tmp_path / "killed" / "model"))
    assert straight.keys() == after.keys()
    for k in straight:
        assert torch.equal(straight[k], after[k]), k

    # A checkpoint truncated mid-write is skipped with a message; the previous one is used and gives the same end.
    root = str(tmp_path / "straight" / "checkpoints")
    shards = [f for f in os.listdir(os.path.join(root, "step_0000004")) if f.endswith(".distcp")]
    with open(os.path.join(root, "step_0000004", shards[0]), "r+b") as f:
        f.truncate(100)
    with caplog.at_level("WARNING"):
        assert train_checkpoint.find_resume(root).endswith("step_0000002")
    assert "step_0000004 is incomplete" in caplog.text and "ignored" in caplog.text
    trainer = _trainer(base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / "straight"),
                                   teacher=p["teacher"], **common))
    assert trainer.step == 2
    trainer.train()
    again = _plain(str(tmp_path / "straight" / "model"))
    for k in straight:
        assert torch.equal(straight[k], again[k]), k


def test_recipe_overrides_the_trainable_groups(engine_setup, tmp_path):
    from megamod.training.config import ConfigError, load_config

    p = engine_setup
    trainer = _trainer(base_recipe(p["root"], "sft", p["student"], str(tmp_path / "run"),
                                   trainable=["vision", "projector"]))
    assert trainer.trainable and all(n.startswith(("vision_model.", "vision_projection.")) for n in trainer.trainable)
    assert any(n.startswith("vision_model.") for n in trainer.trainable)
    with pytest.raises(ConfigError, match="trainable"):
        load_config(base=base_recipe(p["root"], "sft", p["student"], str(tmp_path / "x"), trainable=["visual"]))


def test_moe_backward_outside_the_schedule_does_not_break_later_training(engine_setup, tmp_path):
    """A MoE backward run by hand (a benchmark, a notebook) leaves megatron-core's process-global aux-loss scale as
    a 0-d tensor; the schedule then copies its [1]-shaped scale into it and fails, unless the model build resets it."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    p = engine_setup
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(1.0)  # what such a backward leaves behind
    history = _trainer(base_recipe(p["root"], "d2s", p["sparse"], str(tmp_path / "run"), teacher=p["teacher"],
                                   schedule={"steps": 1})).train()
    assert history[0]["aux"] > 0 and math.isfinite(history[0]["loss"])


def test_resume_refuses_a_checkpoint_of_another_model(engine_setup, tmp_path):
    """A stage re-run on a new student into an out/ that holds the old student's checkpoints must say so, not fail
    deep in the checkpoint loader on a shape."""
    p = engine_setup
    out = str(tmp_path / "run")
    _trainer(base_recipe(p["root"], "sft", p["student"], out, schedule={"steps": 1},
                         checkpoint={"every": 1})).train()
    # the same model resumes (its config survives the JSON round trip, tuples and all)
    history = _trainer(base_recipe(p["root"], "sft", p["student"], out, schedule={"steps": 2},
                                   checkpoint={"every": 1})).train()
    assert [h["step"] for h in history] == [2]
    with pytest.raises(ValueError, match=r"step_0000002 holds a checkpoint of another model \(language\."
                                         r"moe_ffn_hidden_size: None in the checkpoint, 96 here\)"):
        _trainer(base_recipe(p["root"], "sft", p["sparse"], out, schedule={"steps": 2})).train()


def test_length_grouping_regroups_a_step_and_pads_each_micro_batch_to_its_own_longest(engine_setup, tmp_path):
    p = engine_setup

    def first_step(name, **data):
        trainer = _trainer(base_recipe(p["root"], "sft", p["student"], str(tmp_path / name), data=data,
                                       schedule={"global_batch_size": 8, "micro_batch_size": 2, "steps": 1}))
        mbs = trainer._micro_batches(iter(trainer.loader))
        rows = sorted(tuple(mb.tokens[b][~mb.padding[b]].tolist()) for mb in mbs for b in range(2))
        return mbs, rows

    plain, plain_rows = first_step("plain")
    grouped, grouped_rows = first_step("grouped", group_by_length=True)
    assert grouped_rows == plain_rows  # the same samples in the step
    longest = [int((~mb.padding).sum(1).max()) for mb in grouped]
    assert [mb.seq_length for mb in grouped] == longest  # no micro-batch padded to another's length (PP=1)
    assert sum(longest) < sum(mb.seq_length for mb in plain)  # similar lengths share a micro-batch
