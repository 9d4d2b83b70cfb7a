"""Performance paths that change how a step is computed, not what: resolved once per process from the recipe's
`performance:` section and what the device can do, and logged as a table at start-up.

Each option is None (auto: on where the device runs it, off on CPU, whose path is the exact one the tests compare
with megatron-core), true or false. An option forced on where it cannot run is an error naming it. Set by the
entry point (`configure`), read where models are built.
"""
from __future__ import annotations

import dataclasses
import importlib.util
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
    # megatron-core's fused SwiGLU (with the routing probabilities in MoE experts) in the language models
    bias_activation_fusion: bool | None = None
    # megatron-core's fused bias-dropout-add after attention and MLP in the language models
    bias_dropout_fusion: bool | None = None
    # weight gradients accumulated into the fp32 main_grad by the GEMM itself (TransformerEngine or Apex kernels)
    gradient_accumulation_fusion: bool | None = None
    # DDP reduces (or reduce-scatters) gradient buckets during the backward instead of after it
    overlap_grad_reduce: bool | None = None


@dataclass(frozen=True)
class Probe:
    """What the device offers (tests pass their own)."""
    cuda: bool
    capability: tuple[int, int] | None
    has_grouped_mm: bool
    wgrad_kernels: str | None = None  # "transformer_engine" or "apex" when a fused weight-gradient kernel exists

    @staticmethod
    def current() -> "Probe":
        cuda = torch.cuda.is_available()
        return Probe(cuda, torch.cuda.get_device_capability() if cuda else None, hasattr(torch, "_grouped_mm"),
                     _wgrad_kernels() if cuda else None)


def _wgrad_kernels() -> str | None:
    for module, name in (("transformer_engine", "transformer_engine"), ("fused_weight_gradient_mlp_cuda", "apex")):
        if importlib.util.find_spec(module) is not None:
            return name
    return None


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


def _choose(name: str, wanted: bool | None, runs: bool, why: str, auto: bool) -> Choice:
    if wanted is None:
        return Choice(auto and runs, why)
    if wanted and not runs:
        raise ValueError(f"performance.{name}: true, but {why}")
    return Choice(wanted, "set in the recipe")


def _gpu_default(name: str, what: str) -> Callable[[bool | None, Probe, torch.dtype], Choice]:
    """An option that runs everywhere (torch code) and is on by default with CUDA; off on CPU, the exact path."""
    def resolve(wanted, probe, dtype):
        why = f"CUDA: {what}" if probe.cuda else "CPU: unfused, the exact reference path"
        return _choose(name, wanted, True, why, probe.cuda)
    return resolve


def _gradient_accumulation_fusion(wanted, probe, dtype) -> Choice:
    runs = probe.cuda and probe.wgrad_kernels is not None
    why = (f"CUDA: {probe.wgrad_kernels}'s fused weight-gradient GEMM" if runs else
           "needs CUDA and TransformerEngine or Apex's fused_weight_gradient_mlp_cuda")
    return _choose("gradient_accumulation_fusion", wanted, runs, why, True)


def _overlap_grad_reduce(wanted, probe, dtype) -> Choice:
    # megatron-core launches a bucket's reduction once every parameter in it has its gradient in the last
    # micro-batch, counted against the first step; a parameter without one (the adapter, in a micro-batch without
    # images) stops the step with an assertion. So it is on only where the recipe knows its data always uses
    # every trainable parameter.
    why = "off unless set: every trainable parameter must get a gradient in every step's last micro-batch " \
          "(a micro-batch without images leaves the adapter without one)"
    return _choose("overlap_grad_reduce", wanted, True, why, False)


RESOLVERS: dict[str, Callable[[bool | None, Probe, torch.dtype], Choice]] = {
    "grouped_experts": _grouped_experts,
    "bias_activation_fusion": _gpu_default("bias_activation_fusion", "megatron's fused SwiGLU (torch.jit)"),
    "bias_dropout_fusion": _gpu_default("bias_dropout_fusion", "megatron's fused bias-dropout-add (torch.jit)"),
    "gradient_accumulation_fusion": _gradient_accumulation_fusion,
    "overlap_grad_reduce": _overlap_grad_reduce,
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


def config_kwargs(dtype: torch.dtype) -> dict:
    """The options that are TransformerConfig fields, for the language models (the CLIP tower keeps the exact path:
    its quick-GELU has no fused kernel)."""
    rows = resolve(dtype)
    return {name: rows[name].on for name in ("bias_activation_fusion", "bias_dropout_fusion",
                                             "gradient_accumulation_fusion")}


def forced(name: str) -> bool:
    """The recipe asked for it explicitly (a model it cannot serve is then an error, not a fallback)."""
    return getattr(_config, name) is True


def log_table(dtype: torch.dtype) -> None:
    rows = resolve(dtype)
    width = max(map(len, rows))
    lines = [f"  {name:<{width}}  {'on ' if c.on else 'off'}  {c.why}" for name, c in rows.items()]
    log.info("performance paths (%s):\n%s", str(dtype).removeprefix("torch."), "\n".join(lines))
