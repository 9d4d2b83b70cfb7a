"""A teacher cache written by one process (DP=1) read by a 2-rank data-parallel run (DP=2).

Each rank records the cached rows the trainer attaches to its micro-batches; every sample's rows must be that
sample's teacher: checked against the online teacher run on the sample alone in the pytest process. The 2-rank
training losses from the cache must equal the one-process ones.
"""
import os

import pytest
import torch

from tests.helpers import run_jobs
from tests.training_setup import base_recipe

TOPK, BATCHES, STEPS = 16, 3, 2


def _write(p, out):
    from megamod import distributed
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource

    distributed.initialize(distributed.ParallelConfig())
    write_cache(CacheJob(ckpt=p["teacher"], data=[DataSource(os.path.join(p["data"], "conversations.json"))],
                         out=out, topk=TOPK, dtype="float32", shard_size=7, batch_size=4, max_length=256,
                         progress=False))


def _recipe(p, cache, out, **extra):
    return base_recipe(p["root"], "d2d", p["student"], out, teacher={"cache": cache}, schedule={"steps": STEPS},
                       **extra)


def _online_rows(p, sample_ids):
    """sample id -> (answer labels, teacher log-probs [n, V]) from the teacher run on that sample alone."""
    from megamod.data.datasets import MixedDataset
    from megamod.training.config import DataSource
    from megamod.loading.data import build_collator, build_datasets, load_model_tokenizer
    from megamod.loading.models import load_frozen_teacher
    from megamod.families.llava import LLAVA
    from megamod.loading.microbatch import from_batch, run_model

    teacher = load_frozen_teacher(p["teacher"], torch.float32)
    tok = load_model_tokenizer(teacher, None, p["teacher"])
    datasets = build_datasets(teacher, tok, [DataSource(os.path.join(p["data"], "conversations.json"))],
                              "conversations", 256)
    collator, ds = build_collator(teacher, tok, 1), MixedDataset(datasets)
    where = {datasets[0].sample_id(k): k for k in range(len(ds))}
    out = {}
    for sid in sample_ids:
        mb = from_batch(collator([ds[where[sid]]]), True)
        with torch.no_grad():
            logits_BSV = run_model(teacher.model, mb, LLAVA)
        m = mb.loss_mask[0].bool()
        out[sid] = (mb.labels[0][m], torch.log_softmax(logits_BSV[0][m][:, :teacher.language.vocab_size].double(), -1))
    return out


@pytest.fixture(scope="module")
def dp_run(engine_setup, tmp_path_factory):
    from megamod import distributed
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    p, tmp = engine_setup, tmp_path_factory.mktemp("cache_dp")
    cache = str(tmp / "cache")
    distributed.initialize(distributed.ParallelConfig())
    _write(p, cache)  # this process: DP=1
    reference = Trainer(load_config(base=_recipe(p, cache, str(tmp / "ref")))).train()
    jobs = [{"kind": "cached_rows", "recipe": _recipe(p, cache, str(tmp / "rows_run")), "batches": BATCHES,
             "out": str(tmp / "rows")},
            {"kind": "trainer", "recipe": _recipe(p, cache, str(tmp / "dp2")), "out": str(tmp / "dp2.json")}]
    run_jobs(2, jobs, str(tmp))
    ranks = [torch.load(tmp / "rows" / f"rank{r}.pt") for r in range(2)]
    import json

    return p, ranks, reference, json.load(open(tmp / "dp2.json"))


def test_dp2_reads_every_samples_own_rows(dp_run):
    p, ranks, _, _ = dp_run
    assert [r["dp"] for r in ranks] == [2, 2]
    ids = [set(r["rows"]) for r in ranks]
    assert not ids[0] & ids[1]  # the two ranks train on different samples
    # BATCHES micro-batches of micro_batch_size 2 per rank
    assert len(ids[0]) == len(ids[1]) == 2 * BATCHES
    online = _online_rows(p, ids[0] | ids[1])
    for r in ranks:
        for sid, (labels_N, ids_NK, logprobs_NK) in r["rows"].items():
            ref_labels_N, ref_NV = online[sid]
            assert torch.equal(labels_N, ref_labels_N), sid
            # the cached log-probs are the teacher's at the cached ids, and those are its top-k
            assert (ref_NV.gather(-1, ids_NK) - logprobs_NK.double()).abs().max().item() <= 1e-5, sid
            kth_N = ref_NV.topk(TOPK, dim=-1).values[:, -1]
            assert torch.all(logprobs_NK.double().min(-1).values >= kth_N - 1e-5), sid


def test_dp2_training_from_the_cache_matches_one_process(dp_run):
    _, _, reference, dp2 = dp_run
    assert [h["step"] for h in dp2] == [h["step"] for h in reference] == list(range(1, STEPS + 1))
    for h, r in zip(dp2, reference):
        for k in ("loss", "kd", "grad_norm"):
            assert h[k] == pytest.approx(r[k], rel=1e-5), (h["step"], k)
