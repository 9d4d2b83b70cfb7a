"""KD (vocab-parallel KL) and preference losses against float64 references, in a world of one (TP=1)."""
import math

import pytest
import torch

from megamod.losses.kd import kd_loss_BS
from megamod.losses.preference import dpo_loss, kto_pair_loss, preference_loss, sequence_logprobs_B

B, S, V, PADDED = 2, 5, 251, 256


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    # Unit-scale logits keep the KL near 1, where fp32 resolves 1e-6 (at KL ~ 8 one ulp is ~1e-6).
    x = torch.randn(B, S, PADDED, generator=g)
    x[..., V:] = 1e4  # garbage in the padding columns: any leak shows
    return x


def _ref_kl_BS(student, teacher, mode, t):
    lpS = torch.log_softmax(student[..., :V].double() / t, -1)
    lpT = torch.log_softmax(teacher[..., :V].double() / t, -1)
    kl = (lpT.exp() * (lpT - lpS)) if mode == "forward" else (lpS.exp() * (lpS - lpT))
    return kl.sum(-1) * t**2


@pytest.mark.parametrize("mode,t", [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0), ("reverse", 2.0)])
def test_kd_matches_float64_reference(world1, mode, t):
    student, teacher = _logits(0), _logits(1)
    w_BS = torch.rand(B, S, generator=torch.Generator().manual_seed(2))  # weights: every position's gradient counts
    ours = student.clone().requires_grad_()
    loss_BS = kd_loss_BS(ours, teacher, V, mode=mode, temperature=t)
    (loss_BS * w_BS).sum().backward()
    ref = student.double().requires_grad_()
    ref_BS = _ref_kl_BS(ref, teacher, mode, t)
    (ref_BS * w_BS.double()).sum().backward()
    assert loss_BS.dtype == torch.float32 and loss_BS.shape == (B, S)
    # Hinton's t**2 multiplies fp32 rounding too (~3e-7 on the unscaled KL at t=2): the bound scales with it.
    assert (loss_BS.double() - ref_BS).abs().max().item() <= 1e-6 * t**2
    assert (ours.grad.double() - ref.grad).abs().max().item() <= 1e-6
    assert torch.all(ours.grad[..., V:] == 0)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_kd_zero_when_teacher_equals_student(world1, mode):
    x = _logits(3).requires_grad_()
    loss_BS = kd_loss_BS(x, x, V, mode=mode)
    loss_BS.sum().backward()
    assert loss_BS.abs().max().item() <= 1e-6
    assert x.grad.abs().max().item() <= 1e-7


def test_kd_bf16_input_computes_in_fp32(world1):
    student, teacher = _logits(4), _logits(5)
    loss_BS = kd_loss_BS(student.bfloat16(), teacher.bfloat16(), V)
    assert loss_BS.dtype == torch.float32
    ref_BS = _ref_kl_BS(student.bfloat16().float(), teacher.bfloat16().float(), "forward", 1.0)
    assert (loss_BS.double() - ref_BS).abs().max().item() <= 1e-5


def test_sequence_logprobs_match_gather(world1):
    g = torch.Generator().manual_seed(6)
    logits = _logits(6)
    mask_BS = torch.rand(B, S, generator=g) > 0.3
    labels_BS = torch.randint(0, V, (B, S), generator=g).masked_fill(~mask_BS, -100)
    ours = logits.clone().requires_grad_()
    before = ours.detach().clone()
    logp_B = sequence_logprobs_B(ours, labels_BS, mask_BS.float(), V)
    assert torch.equal(ours.detach(), before)  # megatron's CE works in place; the caller's logits must survive
    w_B = torch.tensor([1.0, -0.5])
    (logp_B * w_B).sum().backward()
    ref = logits.double().requires_grad_()
    lp = torch.log_softmax(ref[..., :V], -1).gather(-1, labels_BS.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref_B = (lp * mask_BS.double()).sum(-1)
    (ref_B * w_B.double()).sum().backward()
    assert logp_B.shape == (B,)
    # a sum of a few log-probs is ~ -20, where fp32 spacing is 2e-6: compare relative to the magnitude
    assert ((logp_B.double() - ref_B).abs() / ref_B.abs().clamp(min=1)).max().item() <= 1e-6
    assert (ours.grad.double() - ref.grad).abs().max().item() <= 1e-6


# Log-probs exactly representable in fp32. Case "pos": both batch-mean rewards > 0 (KTO's z's active); "neg": < 0.
CASES = {
    "pos": ([-10.0, -12.5, -8.0, -20.25], [-11.0, -9.0, -8.5, -15.0],
            [-10.5, -12.0, -9.0, -21.0], [-12.0, -9.5, -8.0, -16.5]),
    "neg": ([-10.0, -12.5, -8.0, -20.25], [-11.0, -9.0, -8.5, -15.0],
            [-9.0, -13.0, -7.5, -19.0], [-10.0, -8.0, -8.75, -14.0]),
}
BETA = 0.1


def _sig(z):
    return 1 / (1 + math.exp(-z))


def _hand(case):
    pc, pr, rc, rr = CASES[case]
    rp = [a - b for a, b in zip(pc, rc)]
    rm = [a - b for a, b in zip(pr, rr)]
    n = len(rp)
    dpo = [-math.log(_sig(BETA * (p - m))) for p, m in zip(rp, rm)]
    zp, zm = max(0.0, sum(rp) / n), max(0.0, sum(rm) / n)
    kto = [1 - _sig(BETA * (p - zm)) for p in rp] + [1 - _sig(BETA * (zp - m)) for m in rm]
    metrics = {"reward_chosen": BETA * sum(rp) / n, "reward_rejected": BETA * sum(rm) / n,
               "reward_margin": BETA * sum(p - m for p, m in zip(rp, rm)) / n,
               "reward_accuracy": sum(p > m for p, m in zip(rp, rm)) / n}
    return dpo, kto, metrics


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", ["dpo", "kto_pair"])
def test_preference_values_and_metrics(name, case):
    dpo, kto, metrics = _hand(case)
    loss, ours_metrics = preference_loss(name, *(torch.tensor(v) for v in CASES[case]), beta=BETA)
    expected = dpo if name == "dpo" else kto
    assert loss.shape == (len(expected),)
    assert max(abs(a - b) for a, b in zip(loss.tolist(), expected)) <= 1e-6
    assert set(ours_metrics) == set(metrics)
    for key, value in metrics.items():
        assert ours_metrics[key].dim() == 0 and not ours_metrics[key].requires_grad
        assert abs(ours_metrics[key].item() - value) <= 1e-6, key


def test_dpo_policy_equal_reference_is_log2():
    logp_B = torch.tensor([-3.0, -40.0, -7.5])
    loss_B, metrics = dpo_loss(logp_B, logp_B - 1, logp_B, logp_B - 1)
    assert torch.equal(loss_B, torch.full_like(loss_B, math.log(2)))
    assert metrics["reward_accuracy"].item() == 0.0


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fn", [dpo_loss, kto_pair_loss])
def test_preference_gradients_match_float64(fn, case):
    ours = [torch.tensor(v, requires_grad=True) for v in CASES[case]]
    fn(*ours, beta=BETA)[0].mean().backward()
    ref = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in CASES[case]]
    rp, rm = ref[0] - ref[2], ref[1] - ref[3]
    if fn is dpo_loss:
        ref_loss = -torch.nn.functional.logsigmoid(BETA * (rp - rm))
    else:
        zp, zm = rp.mean().clamp(min=0), rm.mean().clamp(min=0)
        ref_loss = torch.cat([1 - torch.sigmoid(BETA * (rp - zm)), 1 - torch.sigmoid(BETA * (zp - rm))])
    ref_loss.mean().backward()
    for a, b in zip(ours, ref):
        assert (a.grad.double() - b.grad).abs().max().item() <= 1e-7


def test_errors(world1):
    x = torch.zeros(B, S, 128)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss_BS(x, torch.zeros(B, S, 256), 100)
    with pytest.raises(ValueError, match="unknown mode"):
        kd_loss_BS(x, x, 100, mode="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss_BS(x, x, 100, temperature=0.0)
    with pytest.raises(ValueError, match="unknown preference loss 'ipo'"):
        preference_loss("ipo", *(torch.zeros(2) for _ in range(4)))
