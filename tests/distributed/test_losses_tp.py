"""KD, sequence log-probs, CE and the cached top-k KD on TP=2 vocabulary shards (251 true ids in 256 columns, so one
shard has padding) equal the single-process full-vocabulary float64 computation: values and the concatenated
gradients, on the reference losses and on the chunked ones (which also equal the reference losses on every rank); the teacher's top-k taken on the shards equals the float64 top-k of the whole vocabulary."""
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
    inp = {"student": student, "teacher": teacher, "labels": labels, "loss_mask": loss_mask}
    for name, spec in CHECKS.items():
        if spec["loss"] == "topk":
            ids_BSK, logprobs_BSK, log_tail_BS = _teacher_topk64(teacher, spec["vocab"], spec["k"])
            inp[name] = (ids_BSK, logprobs_BSK.to(getattr(torch, spec["store"])), log_tail_BS.float())
    return inp


def _teacher_topk64(teacher_BSP, V, k):
    """float64 over the whole vocabulary: top-k ids, their log-probs, log of the mass of the other ids."""
    lp_BSV = torch.log_softmax(teacher_BSP[..., :V].double(), -1)
    logprobs_BSK, ids_BSK = lp_BSV.topk(k, dim=-1)
    rest_BSV = torch.ones_like(lp_BSV, dtype=torch.bool).scatter(-1, ids_BSK, False)
    log_tail_BS = torch.logsumexp(lp_BSV.masked_fill(~rest_BSV, float("-inf")), -1)
    return ids_BSK, logprobs_BSK, log_tail_BS


def _topk_kd64(x_BSP, V, ids_BSK, logprobs_BSK, log_tail_BS):
    """The bucketed KL (docs/TEACHER_CACHE.md) in float64: stored buckets renormalised, the tail one bucket."""
    lq_BSn = torch.cat([logprobs_BSK.double(), log_tail_BS.double().unsqueeze(-1)], -1)
    lq_BSn = lq_BSn - torch.logsumexp(lq_BSn, -1, keepdim=True)
    lq_BSK, lq_tail_BS = lq_BSn[..., :-1], lq_BSn[..., -1]
    lp_BSV = torch.log_softmax(x_BSP[..., :V], -1)
    kl_BS = (lq_BSK.exp() * (lq_BSK - lp_BSV.gather(-1, ids_BSK))).sum(-1)
    if ids_BSK.shape[-1] == V:  # no tail bucket
        assert torch.all(lq_tail_BS == float("-inf"))
        return kl_BS
    rest_BSV = torch.ones_like(lp_BSV, dtype=torch.bool).scatter(-1, ids_BSK, False)
    lp_tail_BS = torch.logsumexp(lp_BSV.masked_fill(~rest_BSV, float("-inf")), -1)
    return kl_BS + lq_tail_BS.exp() * (lq_tail_BS - lp_tail_BS)


def _reference(name, inp):
    """float64, full vocabulary, plain torch."""
    spec = CHECKS[name]
    V, mask = spec["vocab"], inp["loss_mask"].double()
    x = inp["student"].double().requires_grad_()
    if spec["loss"] == "kd":
        t = spec["temperature"]
        lpS = torch.log_softmax(x[..., :V] / t, -1)
        lpT = torch.log_softmax(inp["teacher"][..., :V].double() / t, -1)
        kl = (lpT.exp() * (lpT - lpS)) if spec["mode"] == "forward" else (lpS.exp() * (lpS - lpT))
        value = objective = (kl.sum(-1) * t**2 * mask).sum() / mask.sum()
    elif spec["loss"] == "topk":
        value = objective = (_topk_kd64(x, V, *inp[name]) * mask).sum() / mask.sum()
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
    ref_value, ref_grad = _reference(name, inp)
    value = ranks[0][name][0].double()
    for r in range(1, TP):  # every TP rank holds the same loss
        assert torch.equal(ranks[r][name][0], ranks[0][name][0])
    # fp32 rounding grows with the magnitude (sums of log-probs ~ -20) and with Hinton's t**2
    tol = 1e-6 * CHECKS[name].get("temperature", 1.0) ** 2 * ref_value.abs().max().clamp(min=1).item()
    assert (value - ref_value).abs().max().item() <= tol
    grad = torch.cat([ranks[r][name][1] for r in range(TP)], dim=-1).double()
    assert grad.shape == ref_grad.shape
    assert (grad - ref_grad).abs().max().item() <= 1e-6


CHUNKED = [name for name in CHECKS if CHECKS[name].get("chunk")]


@pytest.mark.parametrize("name", CHUNKED)
def test_tp2_chunked_losses_match_reference_losses(tp_run, name):
    """The chunked losses (the Objective's default) give today's values and gradients on every rank."""
    _, ranks = tp_run
    reference = name.split("@")[0]
    for r in range(TP):
        value, grad = ranks[r][name]
        ref_value, ref_grad = ranks[r][reference]
        assert (value.double() - ref_value.double()).abs().max().item() <= 1e-6 * ref_value.abs().max().clamp(min=1)
        assert grad.dtype == ref_grad.dtype and (grad.double() - ref_grad.double()).abs().max().item() <= 1e-6


TOPK = [name for name, spec in CHECKS.items() if spec["loss"] == "topk"]


def test_topk_ids_fall_on_both_shards(tp_run):
    """The top-k checks exercise the cross-shard sums: ids on both shards at every position (251 of 256 columns),
    all on rank 0 where the vocabulary ends inside it (100 columns)."""
    inp, _ = tp_run
    shard = PADDED // TP
    for name in TOPK:
        on_rank0_BSK = inp[name][0] < shard
        if CHECKS[name]["vocab"] > shard:
            assert torch.all(on_rank0_BSK.any(-1)) and torch.all((~on_rank0_BSK).any(-1)), name
        else:
            assert torch.all(on_rank0_BSK), name


@pytest.mark.parametrize("name", TOPK)
def test_tp2_teacher_topk_matches_full_vocab_float64(tp_run, name):
    """What cache-teacher stores, taken on TP=2 shards: the same ids, log-probs and tail mass as float64."""
    inp, ranks = tp_run
    spec = CHECKS[name]
    ids_BSK, logprobs_BSK, log_tail_BS = _teacher_topk64(inp["teacher"], spec["vocab"], spec["k"])
    for r in range(1, TP):  # every TP rank of the group gets the same result
        assert all(torch.equal(a, b) for a, b in zip(ranks[r][name + "/teacher"], ranks[0][name + "/teacher"]))
    got_ids_BSK, got_logprobs_BSK, got_log_tail_BS = ranks[0][name + "/teacher"]
    assert torch.equal(got_ids_BSK, ids_BSK)
    # fp32 log-probs down to ~ -8 (whole vocabulary): one ulp is ~ 1e-6 there
    tol = 1e-6 * logprobs_BSK.abs().max().clamp(min=1).item()
    assert (got_logprobs_BSK.double() - logprobs_BSK).abs().max().item() <= tol
    if spec["k"] == spec["vocab"]:
        assert torch.all(got_log_tail_BS == float("-inf"))
    else:
        assert (got_log_tail_BS.double() - log_tail_BS).abs().max().item() <= tol
