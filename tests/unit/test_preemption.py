"""Stopping on a signal (training/preemption.py) in one process: a checkpoint at the step the signal interrupted, a
second signal during that save, the exit status, the handlers given back, and a resume that ends bitwise where an
uninterrupted run ends. Several ranks, torchrun and SLURM: tests/distributed/test_faults.py, tests/slurm/."""
import json
import os
import signal

import pytest
import torch

from tests.training_setup import base_recipe


def _trainer(cfg: dict):
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    return Trainer(load_config(base=cfg))


def _plain(directory: str) -> dict:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(directory)


def test_a_signal_stops_at_a_checkpoint_of_the_step_it_interrupted(engine_setup, tmp_path, monkeypatch):
    from megamod.training import checkpoint as train_checkpoint
    from megamod.training.preemption import EXIT_PREEMPTED, Preempted
    from megamod.training.trainer import Trainer

    p = engine_setup

    def cfg(name):
        return base_recipe(p["root"], "d2d", p["student"], str(tmp_path / name), teacher=p["teacher"],
                           schedule={"steps": 4}, optim={"distributed_optimizer": True}, checkpoint={"keep": None})

    straight = _trainer(cfg("straight")).train()

    real_train_one, real_save = Trainer._train_one, train_checkpoint.save

    def train_one(self, *args):
        real_train_one(self, *args)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # as SLURM's warning before the time limit, mid-run

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, during the save it caused
        return real_save(*args, **kwargs)

    monkeypatch.setattr(Trainer, "_train_one", train_one)
    monkeypatch.setattr(train_checkpoint, "save", save)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(Preempted) as stop:
        _trainer(cfg("stopped")).train()
    assert (stop.value.code, stop.value.step, stop.value.signal_name) == (EXIT_PREEMPTED, 2, "SIGUSR1")
    # the process is expected to end now: a launcher's signal must not turn the clean stop into a kill
    assert {s: signal.getsignal(s) for s in handlers} == {s: signal.SIG_IGN for s in handlers}
    for s, handler in handlers.items():
        signal.signal(s, handler)
    root = tmp_path / "stopped" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_0000002"]  # one save, despite the second signal
    assert train_checkpoint.verify(str(root / "step_0000002")) is None
    with open(tmp_path / "stopped" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert not os.path.exists(tmp_path / "stopped" / "model")

    monkeypatch.undo()
    resumed = _trainer(cfg("stopped")).train()
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # given back after a run to the end
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(resumed, straight[2:]):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
    expected, found = _plain(str(tmp_path / "straight" / "model")), _plain(str(tmp_path / "stopped" / "model"))
    assert expected.keys() == found.keys()
    for k in expected:
        assert torch.equal(expected[k], found[k]), k


def test_signal_and_timeout_keys_are_checked():
    from megamod.training.config import ConfigError, load_config

    good = {"stage": "sft", "student": "s", "out": "o", "data": {"train": [{"path": "x.json"}]}}
    cfg = load_config(base=good, overrides=["checkpoint.signals=[SIGUSR2]", "parallel.timeout_s=30"])
    assert (cfg.checkpoint.signals, cfg.parallel.timeout_s) == (["SIGUSR2"], 30.0)
    assert load_config(base=good).checkpoint.signals == ["SIGTERM", "SIGUSR1"]
    with pytest.raises(ConfigError, match=r"checkpoint.signals \['SIGKILL'\] must name distinct signals among"):
        load_config(base=good, overrides=["checkpoint.signals=[SIGKILL]"])
    with pytest.raises(ConfigError, match="checkpoint.signals: expected a list"):
        load_config(base=good, overrides=["checkpoint.signals=SIGTERM"])
    with pytest.raises(ConfigError, match="parallel.timeout_s must be a positive number of seconds, got 0"):
        load_config(base=good, overrides=["parallel.timeout_s=0"])
