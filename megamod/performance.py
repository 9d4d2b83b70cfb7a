"""Performance paths that change how a step is computed, not what: resolved once per process from the recipe's
`performance:` section and what the device can do, and logged as a table at start-up.

Each option is None (auto: on where the device runs it, off on CPU, whose path is the exact one the tests compare
with megatron-core), true or false. An option forced on where it cannot run is an error naming it. Set by the
entry point (`configure`), read where models are built.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch

log = logging.getLogger(__name__)


@dataclass
class PerformanceConfig:
    # All local experts of a MoE layer in two grouped GEMMs (models/grouped_experts.py) instead of megatron's
    # per-expert loop; same parameters and checkpoints.
    grouped_experts: bool | None = None


@dataclass(frozen=True)
class Probe:
    """What the device offers (tests pass their own)."""
    cuda: bool
    capability: tuple[int, int] | None
    has_grouped_mm: bool

    @staticmethod
    def current() -> "Probe":
        cuda = torch.cuda.is_available()
        return Probe(cuda, torch.cuda.get_device_capability() if cuda else None, hasattr(torch, "_grouped_mm"))


@dataclass(frozen=True)
class Choice:
    on: bool
    why: str


def _grouped_experts(wanted: bool | None, probe: Probe, dtype: torch.dtype) -> Choice:
    if not probe.has_grouped_mm:
        runs, why = False, "this torch has no _grouped_mm"
    elif probe.cuda:
        runs = dtype == torch.bfloat16 and probe.capability >= (9, 0)
        why = (f"CUDA {probe.capability[0]}.{probe.capability[1]}, {str(dtype).removeprefix('torch.')}: "
               f"torch._grouped_mm {'runs' if runs else 'needs bf16 on compute capability >= 9.0'}")
    else:
        runs, why = True, "CPU: torch._grouped_mm runs"
    if wanted is None:
        on = runs and probe.cuda
        return Choice(on, why if probe.cuda else "CPU: megatron's per-expert loop, the exact reference path")
    if wanted and not runs:
        raise ValueError(f"performance.grouped_experts: true, but {why}")
    return Choice(wanted, "set in the recipe")


RESOLVERS: dict[str, Callable[[bool | None, Probe, torch.dtype], Choice]] = {
    "grouped_experts": _grouped_experts,
}

_config = PerformanceConfig()


def configure(cfg: PerformanceConfig) -> None:
    """The entry point's settings for this process (the defaults until called)."""
    global _config
    _config = cfg


def resolve(dtype: torch.dtype, cfg: PerformanceConfig | None = None, probe: Probe | None = None) -> dict:
    """name -> Choice for every option."""
    cfg = _config if cfg is None else cfg
    probe = Probe.current() if probe is None else probe
    return {f.name: RESOLVERS[f.name](getattr(cfg, f.name), probe, dtype) for f in dataclasses.fields(cfg)}


def enabled(name: str, dtype: torch.dtype) -> bool:
    return resolve(dtype)[name].on


def forced(name: str) -> bool:
    """The recipe asked for it explicitly (a model it cannot serve is then an error, not a fallback)."""
    return getattr(_config, name) is True


def log_table(dtype: torch.dtype) -> None:
    rows = resolve(dtype)
    width = max(map(len, rows))
    lines = [f"  {name:<{width}}  {'on ' if c.on else 'off'}  {c.why}" for name, c in rows.items()]
    log.info("performance paths (%s):\n%s", str(dtype).removeprefix("torch."), "\n".join(lines))
