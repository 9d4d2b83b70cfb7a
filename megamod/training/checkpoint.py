"""Training checkpoints: student weights, optimizer, scheduler, step, RNG and data position, resumable anywhere.

Layout of `<run>/checkpoints/`:
  step_0000040/        dist checkpoint (student model + optimizer, canonical keys: loads at any TP/PP/DP layout),
                       rng/<layout>-rank<r>.pt (per-rank RNG states), train_state.json (rank 0), manifest.json
  latest               the name of the newest complete checkpoint
A checkpoint is written under `.tmp-step_N`, gets its manifest (every file with its size) last, and is renamed
only then; `latest` is replaced atomically after the rename. Resume takes the newest directory whose manifest
matches its files; a directory that does not (a copy truncated mid-write, a file missing) is reported and skipped.
The teacher is not saved: it is loaded from its own checkpoint by every run.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from megamod.distributed import collective_device
from megamod.training.checkpoint_writers import BackgroundWriter, bound_writers

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE = "train_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def _layout_tag() -> str:
    from megatron.core import parallel_state as ps

    return (f"tp{ps.get_tensor_model_parallel_world_size()}pp{ps.get_pipeline_model_parallel_world_size()}"
            f"ep{ps.get_expert_model_parallel_world_size()}dp{ps.get_data_parallel_world_size()}")


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded(model, optimizer, is_loading: bool) -> dict:
    model_sd = model.sharded_state_dict()
    # fully_reshardable: the distributed optimizer's state is saved in the model's canonical layout, so a run can
    # resume at another TP/PP/DP layout (the plain optimizer ignores this).
    metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata)}


def _torch_adam_distributed(optimizer) -> list:
    """The distributed optimizers that `optimizer` chains (one for dense, one for expert parameters) when they run
    torch's Adam (no TransformerEngine or Apex: on CPU, or a GPU without them), else []. megatron-core 0.16.1 cannot
    load their state by itself; `_load_distributed_torch_adam` does."""
    from megatron.core.optimizer import distrib_optimizer

    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if distrib_optimizer.HAVE_APEX_OR_TE or not all(isinstance(o, distrib_optimizer.DistributedOptimizer)
                                                     for o in subs):
        return []
    return subs


def _fresh_adam_state(adam) -> None:
    """torch's Adam state for every parameter that has none yet, as its first step would create it (step 0, zero
    moments). megatron builds a distributed optimizer's checkpoint, and the template a load fills, from that state
    (state_dict() asserts one Adam step across parameters), which an optimizer that has not stepped lacks: a resume
    before any update, or a save after only skipped (fp16 overflow) steps. Unlike an Adam step on zero gradients,
    this changes nothing: the next step proceeds as a fresh optimizer's would."""
    from torch.optim.optimizer import _get_scalar_dtype

    for group in adam.param_groups:
        device_step = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            if p.numel() == 0 or adam.state.get(p):
                continue
            state = adam.state[p]
            state["step"] = (torch.zeros((), dtype=_get_scalar_dtype(is_fused=group.get("fused")), device=p.device)
                             if device_step else torch.tensor(0.0, dtype=_get_scalar_dtype()))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _load_distributed_torch_adam(optimizer, subs: list, state, directory: str) -> None:
    """megatron's DistributedOptimizer.load_state_dict, for torch's Adam, which keeps a `step` tensor per parameter.
    megatron-core 0.16.1 restores that step from the param groups as one tensor shared by all parameters (every
    later Adam step would advance it once per parameter), then copies each parameter's state from the checkpoint
    expecting a `step` there as well (KeyError: the fully_reshardable format keeps it in the param groups). The same
    two calls, with the steps set aside during the copy and given back as one tensor per parameter."""
    states = [state] if len(subs) == 1 else [v for _, v in sorted(state.items())]  # as ChainedOptimizer pairs them
    if len(states) != len(subs):
        raise ValueError(f"{directory}: the optimizer state has {len(states)} parts, this optimizer {len(subs)}")
    for opt, sd in zip(subs, states):
        sd = dict(sd)
        param_state, kind = sd.pop("param_state", None), sd.pop("param_state_sharding_type", None)
        if kind != "fully_reshardable":
            raise ValueError(f"{directory}: distributed optimizer state saved as {kind!r}, expected fully_reshardable")
        opt.load_state_dict(sd)  # param groups (lr, step ...), state tensors allocated
        steps = {p: s.pop("step") for p, s in opt.optimizer.state.items()}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            opt.optimizer.state[p]["step"] = step.clone()
    if len(subs) > 1:
        optimizer._synchronize_steps()


def _files(directory: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                out[rel] = os.path.getsize(path)
    return out


def check_writable(root: str) -> None:
    """Collective: every rank can create files in `root`, or every rank raises naming it. Checked before the
    models load: a save that fails on one rank leaves the others waiting for it until the collective timeout."""
    problem = None
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-test-{os.uname().nodename}-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        problem = f"{type(e).__name__}: {e}"
    bad = torch.tensor([0 if problem is None else 1], dtype=torch.int64, device=collective_device())
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if int(bad):
        raise OSError(f"out: cannot write the run's checkpoints to {root} "
                      f"({problem or 'on another rank: see its log'})")


def save(root: str, step: int, model, optimizer, train_state: dict, keep: int | None = None,
         writer: BackgroundWriter | None = None) -> str:
    """Every rank calls this. `model` is the unwrapped student of this rank; `train_state` is JSON (rank 0's is
    written). With a `writer`, the tensors are written in the background: the checkpoint is complete (and `latest`)
    once `writer` has published it (writer.poll or writer.wait); the RNG and training state are taken now."""
    from megatron.core import dist_checkpointing

    if writer is not None:
        writer.wait()  # one write at a time; the previous one is published first
    rank = torch.distributed.get_rank()
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt killed mid-write
        os.makedirs(tmp)
    torch.distributed.barrier()
    for opt in _torch_adam_distributed(optimizer):
        _fresh_adam_state(opt.optimizer)
    background = {}
    if writer is not None:
        background["async_sharded_save"] = True
        if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
            # megatron-core 0.19 defaults to NVIDIA's resiliency extension (nvidia-resiliency-ext) for the
            # background write; "mcore" is its own, the one 0.16 has (and the request megamod's writer runs).
            background["async_strategy"] = "mcore"
    with bound_writers():
        request = dist_checkpointing.save(_sharded(model, optimizer, is_loading=False), tmp, **background)
    if rank == 0:
        os.makedirs(os.path.join(tmp, "rng"))  # after the dist save, which wants an empty directory
    torch.distributed.barrier()
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"{_layout_tag()}-rank{rank}.pt"))
    torch.distributed.barrier()
    if rank == 0:
        with open(os.path.join(tmp, STATE), "w") as f:
            json.dump({**train_state, "step": step, "layout": _layout_tag()}, f, indent=2)
    publish = functools.partial(_publish, root, step, tmp, final, keep)
    if writer is None:
        publish()
    else:
        writer.start(step, request, publish)
    return final


def _publish(root: str, step: int, tmp: str, final: str, keep: int | None) -> None:
    """Collective, once every file is written: the manifest (last, it marks the checkpoint complete), the rename from
    the temporary folder, `latest`, and the pruning of older checkpoints."""
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": step, "files": _files(tmp)}, f, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(root, LATEST + ".tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
        _prune(root, keep)
    torch.distributed.barrier()


def _prune(root: str, keep: int | None) -> None:
    if keep is None:
        return
    steps = sorted(int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m)
    for s in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(step_dir(root, s), ignore_errors=True)


def verify(directory: str) -> str | None:
    """None if the checkpoint is complete, else why not."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return f"no {MANIFEST} (written last: the save did not finish)"
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {e}"
    found = _files(directory)
    for name, size in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, the manifest says {size}"
    return None


def find_resume(root: str) -> str | None:
    """The newest complete checkpoint under `root`, reporting every newer incomplete one."""
    if not os.path.isdir(root):
        return None
    steps = sorted((int(m.group(1)) for m in map(_STEP_DIR.match, os.listdir(root)) if m), reverse=True)
    pointer = os.path.join(root, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        if not os.path.isdir(os.path.join(root, name)):
            log.warning("%s names %s, which does not exist; searching %s", pointer, name, root)
    for step in steps:
        directory = step_dir(root, step)
        problem = verify(directory)
        if problem is None:
            return directory
        log.warning("checkpoint %s is incomplete (%s): ignored, trying the previous one", directory, problem)
    return None


def read_state(directory: str) -> dict:
    """The train state a checkpoint was saved with (stage, recipe, model config, scheduler, sampler, step)."""
    with open(os.path.join(directory, STATE)) as f:
        return json.load(f)


def load(directory: str, model, optimizer) -> dict:
    """Load into this rank's student and optimizer (any layout); RNG states when the layout is the same.
    Returns the train state."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    train_state = read_state(directory)
    torch_adam = _torch_adam_distributed(optimizer)
    for opt in torch_adam:
        _fresh_adam_state(opt.optimizer)  # the loading template is built from it; the load overwrites it
    state = dist_checkpointing.load(_sharded(model, optimizer, is_loading=True), directory,
                                    strict=StrictHandling.RAISE_ALL)
    model.load_state_dict(state["model"], strict=True)
    if torch_adam:
        _load_distributed_torch_adam(optimizer, torch_adam, state["optimizer"], directory)
    else:
        optimizer.load_state_dict(state["optimizer"])
    rng = os.path.join(directory, "rng", f"{_layout_tag()}-rank{torch.distributed.get_rank()}.pt")
    if os.path.exists(rng):
        _set_rng_state(torch.load(rng, weights_only=False))
    else:
        log.info("checkpoint %s was written at layout %s, this run is %s: RNG states start fresh", directory,
                 train_state.get("layout"), _layout_tag())
    return train_state
