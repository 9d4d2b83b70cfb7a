"""KD, sequence log-probs and CE on TP=2 vocabulary shards (251 true ids in 256 columns, so one shard has padding)
equal the single-process full-vocabulary float64 computation: values and the concatenated gradients."""
import pytest
import torch

from tests.distributed.loss_checks import CHECKS, SEQ_WEIGHTS_B
from tests.helpers import run_jobs

B, S, PADDED, TP = 2, 5, 256, 2


def _inputs():
    g = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(B, S, PADDED, generator=g), torch.randn(B, S, PADDED, generator=g)
    student[..., 251:] = teacher[..., 251:] = 1e4  # garbage padding: any leak shows
    loss_mask = (torch.rand(B, S, generator=g) > 0.3).float()
    labels = torch.randint(0, 251, (B, S), generator=g).masked_fill(loss_mask == 0, -100)
    return {"student": student, "teacher": teacher, "labels": labels, "loss_mask": loss_mask}


def _reference(spec, inp):
    """float64, full vocabulary, plain torch."""
    V, mask = spec["vocab"], inp["loss_mask"].double()
    x = inp["student"].double().requires_grad_()
    if spec["loss"] == "kd":
        t = spec["temperature"]
        lpS = torch.log_softmax(x[..., :V] / t, -1)
        lpT = torch.log_softmax(inp["teacher"][..., :V].double() / t, -1)
        kl = (lpT.exp() * (lpT - lpS)) if spec["mode"] == "forward" else (lpS.exp() * (lpS - lpT))
        value = objective = (kl.sum(-1) * t**2 * mask).sum() / mask.sum()
    else:
        lp = torch.log_softmax(x[..., :V], -1).gather(-1, inp["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if spec["loss"] == "seq":
            value = (lp * mask).sum(-1)
            objective = (value * torch.tensor(SEQ_WEIGHTS_B, dtype=torch.float64)).sum()
        else:
            value = objective = -(lp * mask).sum() / mask.sum()
    objective.backward()
    return value.detach(), x.grad


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("losses_tp")
    inp = _inputs()
    torch.save(inp, tmp / "inputs.pt")
    run_jobs(TP, [{"kind": "losses", "layout": {"tp": TP}, "inputs": str(tmp / "inputs.pt"),
                   "out": str(tmp / "out")}], str(tmp))
    return inp, [torch.load(tmp / "out" / f"rank{r}.pt") for r in range(TP)]


@pytest.mark.parametrize("name", list(CHECKS))
def test_tp2_losses_match_full_vocab_float64(tp_run, name):
    inp, ranks = tp_run
    ref_value, ref_grad = _reference(CHECKS[name], inp)
    value = ranks[0][name][0].double()
    for r in range(1, TP):  # every TP rank holds the same loss
        assert torch.equal(ranks[r][name][0], ranks[0][name][0])
    # fp32 rounding grows with the magnitude (sums of log-probs ~ -20) and with Hinton's t**2
    tol = 1e-6 * CHECKS[name].get("temperature", 1.0) ** 2 * ref_value.abs().max().clamp(min=1).item()
    assert (value - ref_value).abs().max().item() <= tol
    grad = torch.cat([ranks[r][name][1] for r in range(TP)], dim=-1).double()
    assert grad.shape == ref_grad.shape
    assert (grad - ref_grad).abs().max().item() <= 1e-6
