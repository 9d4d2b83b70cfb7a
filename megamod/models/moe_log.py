"""megatron-core's process-global MoE state, owned by whoever runs the models: the aux-loss log and scale.

megatron-core keeps the per-layer load-balancing-loss log in one process-wide place (a dict on 0.16, a
MoEMetricsTracker on 0.19), sized by the first sparse model that writes to it, and the aux-loss gradient scale in a
class attribute. Building a model leaves both alone; a training run starts its own (`start_aux_loss_log`), and code
that runs a sparse model beside a run (benchmarks, tests) does so inside `own_aux_loss_log`, which puts the run's back.
"""
from __future__ import annotations

import contextlib


def _log() -> dict:
    """The live log: 0.19's tracker metrics (its legacy getter returns only a copy), else 0.16's dict."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:  # 0.16
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        return get_moe_layer_wise_logging_tracker()
    return get_moe_metrics_tracker().metrics


def start_aux_loss_log() -> None:
    """An empty log and no gradient scale: what a training run starts with. A model with another layer count than
    the last one to write would otherwise index past the log, and a MoE backward outside the pipeline schedule
    leaves a 0-d scale that the schedule's copy_ of its [1]-shaped one cannot broadcast into."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    _log().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


@contextlib.contextmanager
def own_aux_loss_log():
    """Run sparse models with a log and scale of their own; the previous log and scale are restored after."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    log = _log()
    saved_log, saved_scale = dict(log), MoEAuxLossAutoScaler.main_loss_backward_scale
    start_aux_loss_log()
    try:
        yield
    finally:
        log.clear()
        log.update(saved_log)
        MoEAuxLossAutoScaler.main_loss_backward_scale = saved_scale
