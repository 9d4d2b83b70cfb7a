"""The planner's per-rank memory (megamod/planning/memory.py) against the measured peak of real training steps on
CPU: dense and MoE in one process, TP=2 (dense) and EP=2 (MoE) on two ranks. Within 15 %; parameter counts exact.

Measured (tests/distributed/memory_checks.py): the peak resident memory over model build, optimizer and two
steps, minus the resident memory before, with glibc returning freed tensors to the system (MALLOC_MMAP_THRESHOLD_).
"""
import json

import pytest

from tests.helpers import run_jobs

BASE = dict(vocab_size=8000, hidden_size=512, num_layers=4, num_attention_heads=8, num_query_groups=4,
            ffn_hidden_size=1536, max_position_embeddings=1024)
MOE = dict(BASE, num_experts=4, moe_layer_pattern=[1, 0, 1, 0])
CASES = {"dense": (1, {}, BASE), "moe": (1, {}, MOE), "tp2": (2, {"tp": 2}, BASE), "ep2": (2, {"ep": 2}, MOE)}
MBS, SEQ = 4, 256


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("plan_memory")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the launched ranks
    try:
        for nproc in (1, 2):
            jobs = [{"kind": "memory", "layout": layout, "model": model, "mbs": MBS, "seq": SEQ,
                     "out": str(tmp / name)} for name, (n, layout, model) in CASES.items() if n == nproc]
            run_jobs(nproc, jobs, str(tmp))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return {name: [json.load(open(tmp / name / f"rank{r}.json")) for r in range(n)]
            for name, (n, _, _) in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_predicted_memory_within_15_percent_of_measured(measured, name):
    from megamod.models.language import LanguageModelConfig
    from megamod.planning.memory import Layout, param_counts, step_memory

    nproc, layout, model = CASES[name]
    cfg = LanguageModelConfig(**model)
    tp, ep = layout.get("tp", 1), layout.get("ep", 1)
    lay = Layout(tp=tp, ep=ep, dp=nproc // tp, mbs=MBS, seq=SEQ, param_bytes=4, distributed_optimizer=False,
                 loss_chunk_tokens=0)  # lm_forward_step: ce.py, unchunked
    assert all(r["params"] == sum(param_counts(cfg, lay, "first").values()) for r in measured[name])
    peak = max(r["measured"] for r in measured[name])
    predicted = step_memory(cfg, lay, trains="language")["total"]
    print(f"\n{name}: predicted {predicted / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB "
          f"({predicted / peak - 1:+.1%})")
    assert abs(predicted / peak - 1) <= 0.15
