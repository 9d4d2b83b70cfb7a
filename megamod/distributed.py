"""Process start-up: torchrun or SLURM environment, gloo on CPU / NCCL on GPU, Megatron parallel state, seeds.

One call, `initialize(ParallelConfig(...))`, is all a megamod entry point needs. A plain `python` process with no
launcher becomes a world of one, so every tool also runs without torchrun.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParallelConfig:
    """How the world is split. tp * pp * cp * dp = world size; ep (and etp) split the MoE experts inside it."""

    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    ep: int = 1  # expert parallel (student MoE layers only)
    cp: int = 1  # context parallel (accepted and passed to megatron; no megamod feature relies on it yet)
    etp: int | None = None  # expert tensor parallel; None means equal to tp, as in megatron-core
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved schedule)

    def validate(self, world_size: int) -> None:
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {self.tp}*{self.pp}*{self.cp}"
            )
        etp = self.etp or self.tp
        if world_size % (etp * self.ep * self.pp):
            raise ValueError(f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{self.ep}*{self.pp}")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def _first_host(nodelist: str) -> str:
    """First host of a SLURM node list such as 'gpu[003-005,009],cpu1' -> 'gpu003' (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port free on this host now (for single-host launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000  # srun launches: the rendezvous port is base + job id % span


def read_launch_env(env: dict | None = None) -> LaunchEnv:
    """torchrun's RANK/WORLD_SIZE win; else SLURM's SLURM_PROCID/SLURM_NTASKS; else a world of one."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif "SLURM_JOB_NODELIST" in env or "SLURM_NODELIST" in env:
            addr = _first_host(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
        else:
            raise RuntimeError("SLURM launch without MASTER_ADDR or SLURM_JOB_NODELIST: cannot find the master")
        # A port derived from the job id lets every task agree on it without communication. 20000-29999: below
        # Linux's ephemeral range (32768-60999 by default), from which any outgoing connection on the node (another
        # job's collectives) may hold a port at the moment the rendezvous binds it.
        port = int(env.get("MASTER_PORT", SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % SLURM_PORT_SPAN))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single")


def _use_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGAMOD_FORCE_CPU", "0") != "1"


def collective_device() -> torch.device:
    """Where a tensor must live for a collective on the default group: NCCL reduces device tensors only."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def start_process_group(timeout_s: float = 600) -> LaunchEnv:
    """torch.distributed's default group over the launcher's world (gloo on CPU, NCCL on GPU), once per process;
    megatron-core's version check and CPU or no-TransformerEngine adaptations first."""
    from megamod import cpu_compat, mcore_version, te_absent

    mcore_version.check()  # an unsupported megatron-core stops here, named, not deep inside megatron
    launch = read_launch_env()
    cuda = _use_cuda()
    if not cuda:
        cpu_compat.apply()
    else:
        te_absent.apply()
    if not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
            # NCCL: a timed-out or failed collective aborts the process (else it can block in a kernel forever).
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=launch.rank,
            world_size=launch.world_size,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return launch


def initialize(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234, timeout_s: float = 600) -> LaunchEnv:
    """Start torch.distributed and Megatron's parallel state; seed every rank identically.

    Identical seeding matters on CPU: megatron builds each parameter's full master weight on every rank from the
    default generator before slicing, so ranks must draw the same numbers.
    `timeout_s` bounds every collective of every group (gloo raises; NCCL's watchdog aborts the process), so that
    a rank that died or hangs ends the others instead of leaving them waiting forever.
    In a world split between teacher and student ranks (split_world.py) the default group is this rank's
    side: the layout splits that side.
    """
    launch = start_process_group(timeout_s)
    parallel.validate(torch.distributed.get_world_size())
    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=timeout_s / 60,  # megatron's groups would otherwise wait 30 minutes
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    if torch.distributed.get_rank() == 0:
        log.info(
            "distributed: %s world=%d backend=%s tp=%d pp=%d ep=%d cp=%d",
            launch.launcher, torch.distributed.get_world_size(), torch.distributed.get_backend(),
            parallel.tp, parallel.pp, parallel.ep, parallel.cp,
        )
    return launch


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    """Barrier then tear down, so that no rank exits while a peer still waits on it (gloo hangs are silent)."""
    from megatron.core import parallel_state

    from megamod import split_world as world

    if torch.distributed.is_initialized():
        world.unsplit()  # a job split between teacher and student ranks ends together
        torch.distributed.barrier()
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()
