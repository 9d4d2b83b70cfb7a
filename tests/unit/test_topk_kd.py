"""KD against a cached top-k teacher (losses/topk_kd.py) against the online KD and float64 references (TP=1)."""
import pytest
import torch

from megamod.losses.kd import kd_loss_BS
from megamod.losses.topk_kd import teacher_topk_BSK, topk_kd_loss_BS

B, S, V, PADDED = 2, 6, 251, 256


def _logits(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(B, S, PADDED, generator=g)
    x[..., V:] = 1e4  # garbage in the padding columns: any leak shows
    return x


def _weights():
    return torch.rand(B, S, generator=torch.Generator().manual_seed(9))


def _grad(fn, student):
    x = student.clone().requires_grad_()
    loss_BS = fn(x)
    (loss_BS * _weights().to(loss_BS.dtype)).sum().backward()
    return loss_BS.detach(), x.grad


def test_teacher_topk_matches_float64(world1):
    teacher = _logits(1, scale=3.0)
    ids_BSK, logprobs_BSK, log_tail_BS = teacher_topk_BSK(teacher, V, 16)
    lp_BSV = torch.log_softmax(teacher[..., :V].double(), -1)
    ref_values, ref_ids = lp_BSV.topk(16, dim=-1)
    assert torch.equal(ids_BSK, ref_ids)
    assert (logprobs_BSK.double() - ref_values).abs().max().item() <= 1e-6
    ref_tail_BS = torch.log1p(-ref_values.exp().sum(-1))
    assert (log_tail_BS.double() - ref_tail_BS).abs().max().item() <= 1e-6
    _, _, full_tail_BS = teacher_topk_BSK(teacher, V, V)
    assert torch.all(full_tail_BS == float("-inf"))


def test_whole_vocabulary_equals_online_kd(world1):
    """K = V: the cached loss is the online forward KL, in value and gradient, fp32, <= 1e-6."""
    student, teacher = _logits(2), _logits(3)
    cached = teacher_topk_BSK(teacher, V, V)
    loss_BS, grad = _grad(lambda x: topk_kd_loss_BS(x, *cached, V), student)
    online_BS, online_grad = _grad(lambda x: kd_loss_BS(x, teacher, V), student)
    assert (loss_BS - online_BS).abs().max().item() <= 1e-6
    assert (grad - online_grad).abs().max().item() <= 1e-6
    ref_BS, ref_grad = _grad(lambda x: (torch.log_softmax(teacher[..., :V].double(), -1).exp() * (
        torch.log_softmax(teacher[..., :V].double(), -1) - torch.log_softmax(x[..., :V], -1))).sum(-1),
        student.double())
    assert (loss_BS.double() - ref_BS).abs().max().item() <= 1e-6
    assert (grad.double() - ref_grad).abs().max().item() <= 1e-6
    assert torch.all(grad[..., V:] == 0)


def test_top64_gap_is_bounded_by_the_tail(world1):
    """K = 64 of 251: the loss is short of the full KL by exactly q_R KL(q(.|R) || p(.|R)) >= 0, and the gradient
    differs by at most 2 q_R (L1) per position. Peaky teacher logits, as a trained model's are."""
    student, teacher = _logits(4, scale=2.0), _logits(5, scale=4.0)
    cached = teacher_topk_BSK(teacher, V, 64)
    loss_BS, grad = _grad(lambda x: topk_kd_loss_BS(x, *cached, V), student)
    full_BS, full_grad = _grad(lambda x: kd_loss_BS(x, teacher, V), student)
    q_BSV = torch.softmax(teacher[..., :V].double(), -1)
    p_BSV = torch.softmax(student[..., :V].double(), -1)
    tail_BSV = torch.ones_like(q_BSV, dtype=torch.bool).scatter(-1, cached[0], False)
    q_tail_BS, p_tail_BS = (q_BSV * tail_BSV).sum(-1), (p_BSV * tail_BSV).sum(-1)
    qc, pc = q_BSV / q_tail_BS.unsqueeze(-1), p_BSV / p_tail_BS.unsqueeze(-1)
    gap_BS = q_tail_BS * torch.where(tail_BSV, qc * (qc.log() - pc.log()), torch.zeros_like(qc)).sum(-1)
    full64_BS = (q_BSV * (q_BSV.log() - p_BSV.log())).sum(-1)
    # fp32 resolves ~1e-6 relative: at KL ~ 5 one ulp is ~5e-7
    tol = 1e-6 * full64_BS.abs().max().clamp(min=1).item()
    assert (loss_BS.double() - (full64_BS - gap_BS)).abs().max().item() <= tol
    measured_BS = full_BS.double() - loss_BS.double()
    assert measured_BS.min().item() >= -tol
    l1_BS = (full_grad - grad)[..., :V].double().abs().sum(-1) / _weights().double()
    assert torch.all(l1_BS <= 2 * q_tail_BS + 1e-6)
    print(f"\nK=64/V={V}: tail mass mean {q_tail_BS.mean():.3g}; KL gap mean {measured_BS.mean():.3g} "
          f"(max {measured_BS.max():.3g}) of full KL mean {full_BS.mean():.3g}; grad L1 gap max {l1_BS.max():.3g}")


def test_rounded_storage_is_renormalised(world1):
    """bf16-stored log-probs: the K + 1 buckets are renormalised, so a student equal to the teacher scores ~0."""
    teacher = _logits(6, scale=3.0)
    ids_BSK, logprobs_BSK, log_tail_BS = teacher_topk_BSK(teacher, V, 32)
    loss_BS = topk_kd_loss_BS(teacher, ids_BSK, logprobs_BSK.bfloat16(), log_tail_BS.bfloat16(), V)
    assert loss_BS.abs().max().item() <= 1e-3  # bf16's 3 digits, not the up to 1 % mass error of the raw values
    assert loss_BS.min().item() >= -1e-6


def test_shape_errors(world1):
    x = torch.zeros(B, S, PADDED)
    with pytest.raises(ValueError, match="do not line up"):
        topk_kd_loss_BS(x, torch.zeros(B, S, 4, dtype=torch.long), torch.zeros(B, S, 5), torch.zeros(B, S), V)
    with pytest.raises(ValueError, match="k = 300"):
        teacher_topk_BSK(x, V, 300)
