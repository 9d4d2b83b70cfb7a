"""Worker side of tests/distributed/test_losses_tp.py: the losses on this TP rank's vocabulary shard.

Job: {"kind": "losses", "layout": {"tp": N}, "inputs": full-vocabulary tensors (torch.save), "out": a folder}.
Rank r writes out/rank{r}.pt: {name: (value, gradient w.r.t. its student-logit shard)} for every check in CHECKS,
and for each top-k KD check also {name + "/teacher": (ids_BSK, logprobs_BSK, log_tail_BS)}: teacher_topk_BSK on
this rank's teacher shard. The top-k KD reads its cached teacher from inputs[name] (ids_BSK, logprobs_BSK,
log_tail_BS over the full vocabulary), so the student side is checked apart from the teacher side.
"""
import os

import torch

# name -> what to compute; vocab 100 inside 256 columns leaves TP rank 1 of 2 with no valid column.
CHECKS = {
    "kd_forward": dict(loss="kd", mode="forward", temperature=1.0, vocab=251),
    "kd_reverse": dict(loss="kd", mode="reverse", temperature=1.0, vocab=251),
    "kd_forward_t2": dict(loss="kd", mode="forward", temperature=2.0, vocab=251),
    "kd_forward_v100": dict(loss="kd", mode="forward", temperature=1.0, vocab=100),
    "kd_reverse_v100": dict(loss="kd", mode="reverse", temperature=1.0, vocab=100),
    "seq_logprobs": dict(loss="seq", vocab=251),
    "ce": dict(loss="ce", vocab=251),
    # cached teacher: top-16 stored in bf16 (renormalised), the whole vocabulary (no tail), and a vocabulary that
    # leaves TP rank 1 without a valid column (every top-k id on rank 0)
    "topk_kd_k16": dict(loss="topk", k=16, store="bfloat16", vocab=251),
    "topk_kd_whole": dict(loss="topk", k=251, store="float32", vocab=251),
    "topk_kd_v100_k8": dict(loss="topk", k=8, store="float32", vocab=100),
}
# Every check again on the chunked losses (losses/chunked.py), 3 tokens a chunk: B * S = 10 tokens, so the last chunk
# is short; the Objective's path, checked against float64 and against the reference losses above.
CHECKS.update({f"{name}@chunk3": {**spec, "chunk": 3} for name, spec in list(CHECKS.items())})
SEQ_WEIGHTS_B = [1.0, -0.5]  # the objective for sequence log-probs: both signs, so no gradient cancels by accident


def _value_and_objective(spec, x, teacher, inp):
    from megamod.losses.ce import cross_entropy_BS, masked_mean
    from megamod.losses.kd import kd_loss_BS
    from megamod.losses.preference import sequence_logprobs_B
    from megamod.losses.topk_kd import topk_kd_loss_BS

    mask_BS, labels_BS, vocab = inp["loss_mask"], inp["labels"], spec["vocab"]
    if spec.get("chunk"):
        return _chunked_value_and_objective(spec, x, teacher, inp)
    if spec["loss"] == "topk":
        value = masked_mean(topk_kd_loss_BS(x, *inp[spec["name"]], vocab), mask_BS)
        return value, value
    if spec["loss"] == "kd":
        value = masked_mean(kd_loss_BS(x, teacher, vocab, spec["mode"], spec["temperature"]), mask_BS)
        return value, value
    if spec["loss"] == "seq":
        value_B = sequence_logprobs_B(x, labels_BS, mask_BS, vocab)
        return value_B, (value_B * torch.tensor(SEQ_WEIGHTS_B)).sum()
    value = masked_mean(cross_entropy_BS(x, labels_BS.clamp(min=0), vocab), mask_BS)
    return value, value


def _chunked_value_and_objective(spec, x, teacher, inp):
    from megamod.losses.ce import masked_mean
    from megamod.losses.chunked import (chunked_cross_entropy_BS, chunked_kd_loss_BS, chunked_sequence_logprobs_B,
                                        chunked_topk_kd_loss_BS)

    mask_BS, labels_BS, vocab, chunk = inp["loss_mask"], inp["labels"], spec["vocab"], spec["chunk"]
    if spec["loss"] == "topk":
        value = masked_mean(chunked_topk_kd_loss_BS(x, *inp[spec["name"]], vocab, chunk), mask_BS)
        return value, value
    if spec["loss"] == "kd":
        value = masked_mean(chunked_kd_loss_BS(x, teacher, vocab, spec["mode"], spec["temperature"], chunk), mask_BS)
        return value, value
    if spec["loss"] == "seq":
        value_B = chunked_sequence_logprobs_B(x, labels_BS, mask_BS, vocab, chunk)
        return value_B, (value_B * torch.tensor(SEQ_WEIGHTS_B)).sum()
    value = masked_mean(chunked_cross_entropy_BS(x, labels_BS, vocab, chunk), mask_BS)  # -100: 0, masked out
    return value, value


def run(job):
    from megatron.core import parallel_state as ps

    from megamod import distributed
    from megamod.losses.topk_kd import teacher_topk_BSK

    distributed.initialize(distributed.ParallelConfig(**job["layout"]))
    inp = torch.load(job["inputs"])
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    shard = inp["student"].shape[-1] // tp
    cols = slice(rank * shard, (rank + 1) * shard)
    results = {}
    for name, spec in CHECKS.items():
        x = inp["student"][..., cols].clone().requires_grad_()  # a fresh leaf per loss
        value, objective = _value_and_objective({**spec, "name": name}, x, inp["teacher"][..., cols], inp)
        objective.backward()
        results[name] = (value.detach(), x.grad)
        if spec["loss"] == "topk":
            results[name + "/teacher"] = teacher_topk_BSK(inp["teacher"][..., cols], spec["vocab"], spec["k"])
    os.makedirs(job["out"], exist_ok=True)
    torch.save(results, os.path.join(job["out"], f"rank{rank}.pt"))
