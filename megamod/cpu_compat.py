"""The one place that lets megatron-core (0.16 and 0.19, see mcore_version) run on CPU + gloo.

megatron-core targets CUDA + NCCL. megamod's tests and CPU quickstart run it on CPU, so the few places where it
assumes a GPU are adjusted here, and only when CUDA is unavailable (`distributed.initialize` calls `apply()`; a GPU
run never does). Each adjustment names the megatron-core function it stands in for and why, is reversible (tests
show the unadjusted call fails), and is covered by tests/unit/test_cpu_compat.py. Each names the megatron-core series
that need it: `apply()` installs only those of the installed series, and the tests, run on both, prove each one needed
where it applies and absent where it is not (0.19 defines te_general_gemm itself).

Not here, because they are about a missing TransformerEngine rather than a missing GPU, and a spec or config does
them without patching: sequence parallelism with torch norms (megamod's local spec uses
`models.specs.SequenceParallelTorchNorm`); CLIPViTModel's default torch LayerNorm, LLaVAModel's TE-attention
assertion with TP > 1 and its `vision_model_type` config field (the LLaVA model's spec and config set them).
`models.common.mark_tensor_parallel_weights` is a fix for GPU runs too.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from megamod import mcore_version

log = logging.getLogger(__name__)


@dataclass
class Adjustment:
    name: str
    stands_in_for: str
    why: str
    install: Callable[[], Callable[[], None]]  # installs the adjustment, returns its undo
    series: tuple[str, ...] = mcore_version.SERIES  # the megatron-core series that need it


def _setattr(module_name: str, attr: str, value) -> Callable[[], None]:
    """Replace module.attr and return the undo."""
    module = importlib.import_module(module_name)
    old = getattr(module, attr, _MISSING)

    def undo():
        if old is _MISSING:
            delattr(module, attr)
        else:
            setattr(module, attr, old)

    setattr(module, attr, value)
    return undo


def _chain(*undos: Callable[[], None]) -> Callable[[], None]:
    def undo():
        for u in reversed(undos):
            u()

    return undo


_MISSING = object()


# 1. RNG tracker ------------------------------------------------------------------------------------------------
_cpu_tracker_cls = None
_kept_tracker = None  # the seeded tracker, kept across revert()/apply() so its named streams survive


def _cpu_rng_tracker_class():
    """One class for the process: megatron's get_all_rng_states checks isinstance against the installed name."""
    global _cpu_tracker_cls
    if _cpu_tracker_cls is not None:
        return _cpu_tracker_cls
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG streams (data-parallel, tensor-parallel, expert) forked from the CPU default generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    _cpu_tracker_cls = CpuRNGStatesTracker
    return _cpu_tracker_cls


def _install_rng() -> Callable[[], None]:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    undo = _chain(
        _setattr(mrandom.__name__, "CudaRNGStatesTracker", _cpu_rng_tracker_class()),
        _setattr(mrandom.__name__, "_get_cuda_rng_state", get_state),
        _setattr(mrandom.__name__, "_set_cuda_rng_state", set_state),
        # the tracker is a lazily created singleton: ours (seeded earlier, if it was) or a new one on next use
        _setattr(mrandom.__name__, "_CUDA_RNG_STATE_TRACKER", _kept_tracker),
        _setattr(mrandom.__name__, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", _kept_tracker is not None),
    )

    def undo_keeping_tracker():
        global _kept_tracker
        if isinstance(mrandom._CUDA_RNG_STATE_TRACKER, _cpu_rng_tracker_class()):
            _kept_tracker = mrandom._CUDA_RNG_STATE_TRACKER
        undo()

    return undo_keeping_tracker


# 2. torch.cuda.current_device() used as a device ---------------------------------------------------------------
def _install_current_device() -> Callable[[], None]:
    return _setattr("torch.cuda", "current_device", lambda: torch.device("cpu"))


# 3. hard-coded device="cuda" and .cuda() -------------------------------------------------------------------------
def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Maps every cuda device argument to cpu and makes `Tensor.cuda()` a no-op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]) and not torch.is_tensor(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _install_device_mode() -> Callable[[], None]:
    mode = CudaToCpuMode()
    mode.__enter__()
    return lambda: mode.__exit__(None, None, None)


# 4. CUDA streams and events --------------------------------------------------------------------------------------
class NullStream:
    """Stands in for torch.cuda.Stream/Event on CPU, where all work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args):
        pass

    def wait_event(self, *args):
        pass

    def record_event(self, *args):
        return NullStream()

    def record(self, *args):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def wait(self, *args):
        pass

    def elapsed_time(self, other):
        return 0.0


def _install_streams() -> Callable[[], None]:
    return _chain(
        _setattr("torch.cuda", "Stream", NullStream),
        _setattr("torch.cuda", "Event", NullStream),
        _setattr("torch.cuda", "current_stream", lambda *a, **k: NullStream()),
        _setattr("torch.cuda", "stream", lambda *a, **k: contextlib.nullcontext()),
        _setattr("torch.cuda", "synchronize", lambda *a, **k: None),
    )


# 5. missing TransformerEngine names in moe_utils --------------------------------------------------------------------
def _install_te_names() -> Callable[[], None]:
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "te_general_gemm"):
        return lambda: None
    return _setattr(moe_utils.__name__, "te_general_gemm", None)


# 6. alltoall split sizes on CPU tensors ----------------------------------------------------------------------------
def _install_split_sizes() -> Callable[[], None]:
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    return _setattr("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu",
                    maybe_move_tensor_to_cpu)


# 7. uneven all_gather on gloo ------------------------------------------------------------------------------------
def _install_uneven_collectives() -> Callable[[], None]:
    from megatron.core.tensor_parallel import mappings

    orig_gather = mappings._gather_along_first_dim

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig_gather(input_, group, output_split_sizes, use_global_buffer)
        # gloo cannot all_gather tensors of different sizes: pad every piece to the largest, gather, slice.
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        pieces = [torch.empty_like(padded) for _ in output_split_sizes]
        torch.distributed.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([p[:n] for p, n in zip(pieces, output_split_sizes)], dim=0)

    # The uneven reduce-scatter needs nothing: gloo in torch 2.13 has the list reduce_scatter megatron calls.
    return _setattr(mappings.__name__, "_gather_along_first_dim", gather)


# 11. gradient clipping asserts torch.cuda.FloatTensor ---------------------------------------------------------------
def _install_clip_grads() -> Callable[[], None]:
    from megatron.core.optimizer import clip_grads

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            torch._foreach_mul_([clip_grads.to_local_if_dtensor(g).detach() for g in grads], clip_coeff)

    return _chain(
        _setattr(clip_grads.__name__, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32),
        _setattr("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32),
    )


# 12. the distributed optimizer classifies params by CUDA type names ------------------------------------------------------
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


@contextlib.contextmanager
def cuda_type_names():
    """While active, `Tensor.type()` reports CPU float tensors by their CUDA names."""
    orig = torch.Tensor.type

    def type_(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        return _CUDA_TYPE_NAMES.get(out, out) if not args and not kwargs else out

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _install_optimizer_types() -> Callable[[], None]:
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    orig_init = cls.__init__

    def __init__(self, *args, **kwargs):
        with cuda_type_names():
            orig_init(self, *args, **kwargs)

    cls.__init__ = __init__
    return lambda: setattr(cls, "__init__", orig_init)


ADJUSTMENTS: dict[str, Adjustment] = {
    a.name: a
    for a in [
        Adjustment("rng", "tensor_parallel.random.CudaRNGStatesTracker, _get_cuda_rng_state, _set_cuda_rng_state",
                   "the RNG tracker reads and writes torch.cuda RNG states", _install_rng),
        Adjustment("current_device", "torch.cuda.current_device (used ~120 times as device=)",
                   "buffers, gathers and p2p tensors are allocated on the current CUDA device", _install_current_device),
        Adjustment("device_mode", "device='cuda' / .cuda() in pipeline schedules, transformer.utils causal masks, "
                   "clip_grads, clip_vit_model, dist-ckpt exchange", "hard-coded CUDA devices", _install_device_mode),
        Adjustment("streams", "torch.cuda.Stream/Event/current_stream/stream/synchronize",
                   "alltoall dispatcher, p2p communication and the dist-ckpt writer synchronise CUDA streams",
                   _install_streams),
        Adjustment("te_names", "moe.moe_utils.te_general_gemm",
                   "router gating reads te_general_gemm, undefined when TransformerEngine is missing "
                   "(0.19 defines it as None)", _install_te_names, series=("0.16",)),
        Adjustment("split_sizes", "moe.token_dispatcher.maybe_move_tensor_to_cpu",
                   "alltoall split sizes reach torch.distributed as tensors unless they started on CUDA",
                   _install_split_sizes),
        Adjustment("uneven_collectives", "tensor_parallel.mappings._gather_along_first_dim",
                   "gloo has no uneven all_gather (alltoall dispatcher with TP > 1, and reduce-scatter backward)",
                   _install_uneven_collectives),
        Adjustment("clip_grads", "optimizer.clip_grads.clip_grad_by_total_norm_fp32",
                   "asserts torch.cuda.FloatTensor gradients", _install_clip_grads),
        Adjustment("optimizer_types", "optimizer.distrib_optimizer.DistributedOptimizer.__init__",
                   "classifies parameters by the strings torch.cuda.*Tensor", _install_optimizer_types),
    ]
}

_undo: dict[str, Callable[[], None]] = {}


def needed() -> list[str]:
    """The adjustments the installed megatron-core needs (raises for an unsupported one)."""
    series = mcore_version.check()
    return [name for name, a in ADJUSTMENTS.items() if series in a.series]


def apply(names=None) -> None:
    """Install the adjustments (all those the installed megatron-core needs, by default). Idempotent; refuses to run
    where CUDA is available, and refuses a name this megatron-core does not need (patching it would hide that)."""
    if torch.cuda.is_available():
        raise RuntimeError("megamod.cpu_compat is for CPU-only runs; CUDA is available")
    wanted = needed()
    for name in (wanted if names is None else names):
        if name not in wanted:
            series = ", ".join(ADJUSTMENTS[name].series)
            raise ValueError(f"cpu_compat adjustment {name!r} is for megatron-core {series}, "
                             f"not the installed {mcore_version.installed()}")
        if name not in _undo:
            _undo[name] = ADJUSTMENTS[name].install()
            log.debug("cpu_compat: %s stands in for %s", name, ADJUSTMENTS[name].stands_in_for)


def revert(names=None) -> None:
    for name in list(reversed(list(_undo)) if names is None else names):
        if name in _undo:
            _undo.pop(name)()


def applied() -> list[str]:
    return list(_undo)


@contextlib.contextmanager
def without(name: str):
    """Temporarily remove one adjustment (tests use it to show the unadjusted call fails)."""
    was = name in _undo
    revert([name])
    try:
        yield
    finally:
        if was:
            apply([name])
