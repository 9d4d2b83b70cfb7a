"""Checkpoints written in the background (`checkpoint.async_save`), in the pytest process (one rank, gloo): the same
files as a synchronous save, published only once written, and a failed write that leaves the previous checkpoint as
the newest complete one. The 2-rank case (distributed optimizer, resumed bitwise) is in test_resume_distopt.py."""
import functools
import multiprocessing as mp
import os
import queue

import pytest
import torch

from tests.training_setup import base_recipe


def _recipe(p, out, async_save, steps=3):
    return base_recipe(p["root"], "d2d", p["student"], out, teacher=p["teacher"], schedule={"steps": steps},
                       checkpoint={"every": 1, "keep": None, "async_save": async_save},
                       optim={"distributed_optimizer": True})


def _plain(directory):
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(directory)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {key: leaf for k, v in tree.items() for key, leaf in _flat(v, f"{prefix}{k}/").items()}
    return {prefix: tree}


def test_background_writes_equal_synchronous_ones(engine_setup, tmp_path, monkeypatch):
    from megamod.training import checkpoint, checkpoint_writers
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    forked = []
    real_start = checkpoint_writers.BackgroundWriter.start

    def start(self, step, request, publish):
        real_start(self, step, request, publish)
        forked.append((step, self._pending.process.pid))  # a writer process per save

    monkeypatch.setattr(checkpoint_writers.BackgroundWriter, "start", start)
    sync = Trainer(load_config(base=_recipe(engine_setup, str(tmp_path / "sync"), False))).train()
    assert forked == []
    background = Trainer(load_config(base=_recipe(engine_setup, str(tmp_path / "async"), True))).train()
    assert [step for step, _ in forked] == [1, 2, 3] and len({pid for _, pid in forked}) == 3
    assert not [p for p in mp.active_children() if p.name.startswith("megamod-checkpoint")]  # all joined
    assert [h["loss"] for h in background] == [h["loss"] for h in sync]
    for step in (1, 2, 3):
        name = f"step_{step:07d}"
        found = _flat(_plain(str(tmp_path / "async" / "checkpoints" / name)))
        expected = _flat(_plain(str(tmp_path / "sync" / "checkpoints" / name)))
        assert found.keys() == expected.keys() and any("exp_avg_sq" in k for k in found)
        for k, v in expected.items():
            assert torch.equal(found[k], v) if isinstance(v, torch.Tensor) else found[k] == v, (step, k)
        assert checkpoint.verify(str(tmp_path / "async" / "checkpoints" / name)) is None
    assert checkpoint.find_resume(str(tmp_path / "async" / "checkpoints")).endswith("step_0000003")
    assert not [n for n in os.listdir(tmp_path / "async" / "checkpoints") if n.startswith(".tmp")]


def test_a_failed_background_write_keeps_the_previous_checkpoint(engine_setup, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megamod.training import checkpoint
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    trainer = Trainer(load_config(base=_recipe(engine_setup, str(tmp_path / "run"), True, steps=4)))
    real_write_item, parent = filesystem_async._write_item, os.getpid()

    @functools.wraps(real_write_item)  # megatron reads its signature
    def write_item(*args, **kwargs):  # in a file writer below the background writer of the second checkpoint
        if os.getpid() != parent and trainer.step == 2:
            raise OSError("disk full (injected)")
        return real_write_item(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", write_item)
    failed = "(?s)checkpoint of step 2: the background write failed .*(disk full|OSError)"  # 0.19 names the class
    with pytest.raises(RuntimeError, match=failed):
        trainer.train()
    root = str(tmp_path / "run" / "checkpoints")
    assert checkpoint.find_resume(root).endswith("step_0000001")
    assert not os.path.exists(os.path.join(root, "step_0000002"))
    assert os.path.exists(os.path.join(root, ".tmp-step_0000002"))


def test_file_queue_crosses_a_fork():
    from megamod.training.checkpoint_writers import _FileQueue

    q = _FileQueue()
    try:
        with pytest.raises(queue.Empty):
            q.get_nowait()
        child = mp.get_context("fork").Process(target=q.put, args=({"rank": 0, "results": list(range(100_000))},))
        child.start()
        child.join()
        assert child.exitcode == 0
        q.put("second")
        assert q.get_nowait() == {"rank": 0, "results": list(range(100_000))}  # > a pipe's 64 KiB buffer
        assert q.get_nowait() == "second"
    finally:
        q.close()
    assert not os.path.exists(q.directory)
