"""The chunked losses (megamod/losses/chunked.py) against today's reference losses and float64, at TP=1, and the
Objective running them by default. (TP=2: tests/distributed/test_losses_tp.py, the "@chunk3" checks.)"""
import types

import pytest
import torch

from megamod.losses.ce import cross_entropy_BS, masked_mean
from megamod.losses.chunked import (chunked_cross_entropy_BS, chunked_kd_loss_BS, chunked_losses_BS,
                                    chunked_sequence_logprobs_B, chunked_topk_kd_loss_BS)
from megamod.losses.kd import kd_loss_BS
from megamod.losses.preference import sequence_logprobs_B
from megamod.losses.topk_kd import teacher_topk_BSK, topk_kd_loss_BS

B, S, V, PADDED = 2, 7, 251, 256  # 14 tokens: chunks of 3 leave a short last chunk


def _inputs(seed, vocab=V):
    g = torch.Generator().manual_seed(seed)
    student, teacher = torch.randn(B, S, PADDED, generator=g), torch.randn(B, S, PADDED, generator=g)
    student[..., vocab:] = teacher[..., vocab:] = 1e4  # garbage in the padding columns: any leak shows
    labels = torch.randint(0, vocab, (B, S), generator=g)
    labels[0, 2] = -100
    w_kd, w_lp = torch.rand(B, S, generator=g), torch.rand(B, S, generator=g)
    w_kd[1, :4] = w_lp[1, :4] = 0  # tokens 7..10: the chunk [9, 12) of 3 is fully masked
    w_lp[0, 2] = 0  # the -100 label
    return student, teacher, labels, w_kd, w_lp


def _f64_BS(student, teacher, labels, mode, t, vocab=V):
    lpS = torch.log_softmax(student[..., :vocab] / t, -1)
    lpT = torch.log_softmax(teacher[..., :vocab].double() / t, -1)
    kl = (lpT.exp() * (lpT - lpS)) if mode == "forward" else (lpS.exp() * (lpS - lpT))
    lp = torch.log_softmax(student[..., :vocab], -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return kl.sum(-1) * t**2, lp


@pytest.mark.parametrize("chunk", [3, 1, 100])
@pytest.mark.parametrize("vocab", [V, 100])
@pytest.mark.parametrize("mode,t", [("forward", 1.0), ("reverse", 1.0), ("forward", 2.0), ("reverse", 0.5)])
def test_kd_and_logprobs_match_reference_and_float64(world1, mode, t, vocab, chunk):
    student, teacher, labels, w_kd, w_lp = _inputs(0, vocab)
    ours = student.clone().requires_grad_()
    kd_BS, logp_BS = chunked_losses_BS(ours, vocab, teacher_logits_BSv=teacher, labels_BS=labels, mode=mode,
                                       temperature=t, chunk_tokens=chunk)
    ((kd_BS * w_kd).sum() + (logp_BS * w_lp).sum()).backward()
    ref = student.clone().requires_grad_()
    ref_kd_BS = kd_loss_BS(ref, teacher, vocab, mode, t)
    ref_logp_BS = -cross_entropy_BS(ref, labels.clamp(min=0), vocab)
    ((ref_kd_BS * w_kd).sum() + (ref_logp_BS * w_lp).sum()).backward()
    f64 = student.double().requires_grad_()
    f64_kd_BS, f64_lp_BS = _f64_BS(f64, teacher, labels, mode, t, vocab)
    ((f64_kd_BS * w_kd).sum() + (f64_lp_BS * w_lp).sum()).backward()

    valid = labels >= 0
    tol = 1e-6 * max(1.0, t**2)  # Hinton's t**2 scales fp32 rounding too
    assert kd_BS.dtype == logp_BS.dtype == torch.float32 and kd_BS.shape == logp_BS.shape == (B, S)
    assert (kd_BS - ref_kd_BS).abs().max().item() <= tol
    assert ((logp_BS - ref_logp_BS)[valid]).abs().max().item() <= 1e-6 * ref_logp_BS.abs().max().item()
    assert torch.all(logp_BS[~valid] == 0)
    assert (kd_BS.double() - f64_kd_BS).abs().max().item() <= tol
    assert (ours.grad - ref.grad).abs().max().item() <= 1e-6
    assert (ours.grad.double() - f64.grad).abs().max().item() <= 1e-6
    assert torch.all(ours.grad[..., vocab:] == 0)
    assert torch.all(ours.grad[1, 2:4] == 0)  # the fully masked chunk: not recomputed, zero


@pytest.mark.parametrize("mode,t", [("forward", 1.0), ("reverse", 2.0)])
def test_each_output_alone(world1, mode, t):
    student, teacher, labels, w_kd, w_lp = _inputs(1)
    x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
    (chunked_kd_loss_BS(x, teacher, V, mode, t, chunk_tokens=4) * w_kd).sum().backward()
    (kd_loss_BS(y, teacher, V, mode, t) * w_kd).sum().backward()
    assert (x.grad - y.grad).abs().max().item() <= 1e-6
    x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
    ce_BS = chunked_cross_entropy_BS(x, labels, V, chunk_tokens=4)
    ref_BS = cross_entropy_BS(y, labels.clamp(min=0), V)
    (ce_BS * w_lp).sum().backward()
    (ref_BS * w_lp).sum().backward()
    assert (masked_mean(ce_BS, w_lp) - masked_mean(ref_BS, w_lp)).abs().item() <= 1e-6
    assert (x.grad - y.grad).abs().max().item() <= 1e-6
    # a backward through one output of the pair only
    x = student.clone().requires_grad_()
    kd_BS, _ = chunked_losses_BS(x, V, teacher_logits_BSv=teacher, labels_BS=labels, mode=mode, temperature=t,
                                 chunk_tokens=5)
    (kd_BS * w_kd).sum().backward()
    assert (x.grad - y.grad).abs().max().item() > 1e-3  # sanity: a different gradient than CE's
    z = student.clone().requires_grad_()
    (kd_loss_BS(z, teacher, V, mode, t) * w_kd).sum().backward()
    assert (x.grad - z.grad).abs().max().item() <= 1e-6


def test_sequence_logprobs_and_inputs_untouched(world1):
    student, teacher, labels, _, _ = _inputs(2)
    mask_BS = (labels >= 0).float()
    x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
    before = x.detach().clone()
    ours_B = chunked_sequence_logprobs_B(x, labels, mask_BS, V, chunk_tokens=3)
    ref_B = sequence_logprobs_B(y, labels, mask_BS, V)
    assert torch.equal(x.detach(), before)  # fp32 input: no chunk work happens in place on the caller's logits
    w_B = torch.tensor([1.0, -0.5])
    (ours_B * w_B).sum().backward()
    (ref_B * w_B).sum().backward()
    assert ((ours_B - ref_B).abs() / ref_B.abs().clamp(min=1)).max().item() <= 1e-6
    assert (x.grad - y.grad).abs().max().item() <= 1e-6


def test_bf16_inputs_give_bf16_gradient_and_fp32_values(world1):
    student, teacher, labels, w_kd, _ = _inputs(3)
    x, y = student.bfloat16().requires_grad_(), student.bfloat16().requires_grad_()
    kd_BS = chunked_kd_loss_BS(x, teacher.bfloat16(), V, chunk_tokens=3)
    ref_BS = kd_loss_BS(y, teacher.bfloat16(), V)
    (kd_BS * w_kd).sum().backward()
    (ref_BS * w_kd).sum().backward()
    assert kd_BS.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert (kd_BS - ref_BS).abs().max().item() <= 1e-6
    assert torch.equal(x.grad, y.grad)  # one loss: the same fp32 gradient, rounded once to bf16


def test_empty_sequence(world1):
    x = torch.randn(1, 0, PADDED, requires_grad=True)
    kd_BS, logp_BS = chunked_losses_BS(x, V, teacher_logits_BSv=torch.randn(1, 0, PADDED),
                                       labels_BS=torch.zeros(1, 0, dtype=torch.long), chunk_tokens=4)
    assert kd_BS.shape == logp_BS.shape == (1, 0)
    (kd_BS.sum() + logp_BS.sum()).backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("vocab,k,store", [(V, 16, torch.bfloat16), (V, V, torch.float32), (100, 8, torch.float32)])
@pytest.mark.parametrize("chunk", [3, 100])
def test_topk_kd_matches_reference(world1, vocab, k, store, chunk):
    student, teacher, _, w_kd, _ = _inputs(4, vocab)
    ids_BSK, logprobs_BSK, log_tail_BS = teacher_topk_BSK(teacher, vocab, k)
    logprobs_BSK = logprobs_BSK.to(store)
    ids_BSK[1, 3] = 0  # a masked position holding zeros (repeated ids), as the cache may
    x, y = student.clone().requires_grad_(), student.clone().requires_grad_()
    ours_BS = chunked_topk_kd_loss_BS(x, ids_BSK, logprobs_BSK, log_tail_BS, vocab, chunk_tokens=chunk)
    ref_BS = topk_kd_loss_BS(y, ids_BSK, logprobs_BSK, log_tail_BS, vocab)
    (ours_BS * w_kd).sum().backward()
    (ref_BS * w_kd).sum().backward()
    assert (ours_BS - ref_BS).abs().max().item() <= 1e-6
    assert (x.grad - y.grad).abs().max().item() <= 1e-6
    assert torch.all(x.grad[..., vocab:] == 0)


def test_errors(world1):
    x = torch.zeros(B, S, 128)
    with pytest.raises(ValueError, match="differ in shape"):
        chunked_kd_loss_BS(x, torch.zeros(B, S, 256), 100)
    with pytest.raises(ValueError, match="unknown mode"):
        chunked_kd_loss_BS(x, x, 100, mode="sideways")
    with pytest.raises(ValueError, match="temperature"):
        chunked_kd_loss_BS(x, x, 100, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_kd_loss_BS(x, x, 100, chunk_tokens=0)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_kd_loss_BS(x, x, 129)
    with pytest.raises(ValueError, match="give a teacher"):
        chunked_losses_BS(x, 100)


# --- the Objective ---

def _micro_batch(pairs=0, cached=None):
    from megamod.loading.microbatch import MicroBatch

    _, _, labels, _, w = _inputs(5)
    mask = (w > 0).float()
    labels = labels.masked_fill(mask == 0, -100)
    return MicroBatch(tokens=torch.zeros(B, S, dtype=torch.long), position_ids=torch.zeros(B, S, dtype=torch.long),
                      labels=labels, loss_mask=mask, images=None, num_tokens=B * S, num_images=0,
                      padding=torch.zeros(B, S, dtype=torch.bool), pairs=pairs, cached=cached)


def _cached(teacher):
    ids_BSK, logprobs_BSK, log_tail_BS = teacher_topk_BSK(teacher, V, 8)
    return types.SimpleNamespace(ids_BSK=ids_BSK, logprobs_BSK=logprobs_BSK, log_tail_BS=log_tail_BS,
                                 reference_2B=torch.tensor([-30.0, -31.0]))


@pytest.mark.parametrize("case", ["d2s", "preference", "cached", "reverse_t2"])
def test_objective_runs_chunked_path_by_default(world1, monkeypatch, case):
    from megamod.training import objective as objective_module
    from megamod.families.language import LANGUAGE
    from megamod.training.objective import Objective

    student, teacher, _, _, _ = _inputs(6)
    weights = {"ce": 1.0, "kd": 0.5} if case != "preference" else {"ce": 0.2, "preference": 1.0}
    kw = dict(kd_mode="reverse", temperature=2.0) if case == "reverse_t2" else {}
    mb = _micro_batch(pairs=1 if case == "preference" else 0, cached=_cached(teacher) if case == "cached" else None)

    x_ref = student.clone().requires_grad_()
    total_ref, report_ref = Objective(weights, V, family=LANGUAGE, chunk_tokens=0, **kw).loss(x_ref, teacher, mb)
    total_ref.backward()

    calls = {"chunked": 0}
    real = objective_module.chunked_losses_BS

    def spy(*args, **kwargs):
        calls["chunked"] += 1
        return real(*args, **kwargs)

    def forbidden(*args, **kwargs):
        raise AssertionError("the default Objective ran a reference loss")

    monkeypatch.setattr(objective_module, "chunked_losses_BS", spy)
    for name in ("kd_loss_BS", "cross_entropy_BS", "sequence_logprobs_B", "topk_kd_loss_BS"):
        monkeypatch.setattr(objective_module, name, forbidden)
    objective = Objective(weights, V, family=LANGUAGE, **kw)
    assert objective.chunk_tokens > 0
    x = student.clone().requires_grad_()
    total, report = objective.loss(x, teacher, mb)
    total.backward()
    assert calls["chunked"] == (2 if case == "preference" else 1)  # policy (+ the teacher's reference log-probs)
    assert set(report) == set(report_ref)
    for key in report:
        assert (report[key] - report_ref[key]).abs().item() <= 1e-6 * report_ref[key].abs().clamp(min=1).item(), key
    assert (x.grad - x_ref.grad).abs().max().item() <= 1e-6


def test_config_chunk_tokens():
    import os

    from megamod.training.config import ConfigError, load_config

    recipe = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "llava_mod_2b", "d2s.yaml")
    assert load_config(recipe).loss.chunk_tokens == 256
    assert load_config(recipe, ["loss.chunk_tokens=0"]).loss.chunk_tokens == 0  # the reference losses
    with pytest.raises(ConfigError, match="loss.chunk_tokens must be a whole number of tokens >= 0"):
        load_config(recipe, ["loss.chunk_tokens=-1"])
    with pytest.raises(ConfigError, match="chunk_tokens: expected int"):
        load_config(recipe, ["loss.chunk_tokens=2.5"])
