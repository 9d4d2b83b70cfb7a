"""megatron-core's MoE aux-loss log and gradient scale are process-wide; models/moe_log.py gives them an owner:
building a model leaves them alone, a training run starts its own, and a side run (benchmark, test) borrows one and
puts the run's back."""
import torch

from megamod.models.language import LanguageModelConfig, build_language_model


def _cfg(num_layers):
    return LanguageModelConfig(vocab_size=64, hidden_size=16, num_layers=num_layers, num_attention_heads=2,
                               num_query_groups=1, ffn_hidden_size=32, num_experts=2, moe_router_topk=2)


def _aux_log():
    # The legacy getter: a dict on 0.16, a copy of the MoEMetricsTracker's entries on 0.19.
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    return None if entry is None else entry["values"].clone()


def _forward(model):
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(tokens, torch.arange(8).expand(2, 8), None)


def test_building_a_model_leaves_a_runs_log_alone(world1):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megamod.models.moe_log import start_aux_loss_log

    start_aux_loss_log()
    torch.manual_seed(0)
    _forward(build_language_model(_cfg(1)))
    run_log = _aux_log()
    assert run_log is not None and run_log.shape == (1,) and run_log.item() > 0  # the forward logged its aux loss
    scale = MoEAuxLossAutoScaler.main_loss_backward_scale = torch.ones(1)
    build_language_model(_cfg(3))  # e.g. an evaluation model built while a run trains
    assert torch.equal(_aux_log(), run_log)
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is scale


def test_a_side_run_gets_its_own_log_and_gives_the_run_its_own_back(world1):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megamod.models.moe_log import own_aux_loss_log, start_aux_loss_log

    start_aux_loss_log()
    assert _aux_log() is None and MoEAuxLossAutoScaler.main_loss_backward_scale is None
    torch.manual_seed(0)
    _forward(build_language_model(_cfg(1)))
    run_log, scale = _aux_log(), torch.full((1,), 0.5)
    MoEAuxLossAutoScaler.main_loss_backward_scale = scale
    with own_aux_loss_log():
        assert _aux_log() is None and MoEAuxLossAutoScaler.main_loss_backward_scale is None
        torch.manual_seed(0)
        _forward(build_language_model(_cfg(3)))  # more layers than the run's log was sized for: no index error
        side = _aux_log()
        assert side.shape == (3,) and bool((side > 0).all())
    assert torch.equal(_aux_log(), run_log)
    assert MoEAuxLossAutoScaler.main_loss_backward_scale is scale


def test_a_run_starts_an_empty_log(world1):
    """What the Trainer does first: without it a 2-layer model would index past a log a 1-layer one sized."""
    from megamod.models.moe_log import start_aux_loss_log

    start_aux_loss_log()
    torch.manual_seed(0)
    _forward(build_language_model(_cfg(1)))
    start_aux_loss_log()
    torch.manual_seed(0)
    _forward(build_language_model(_cfg(2)))
    assert _aux_log().shape == (2,)
    start_aux_loss_log()
    assert _aux_log() is None
