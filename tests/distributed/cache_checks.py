"""Worker side of tests/distributed/test_teacher_cache_dp.py: the cached teacher rows a data-parallel rank attaches
to the micro-batches it trains on.

Job: {"kind": "cached_rows", "recipe": a d2d recipe with teacher: {cache: DIR}, "batches": N, "out": a folder}.
Every rank writes out/rank{r}.pt: {sample id: (answer labels [n], cached ids [n, K], cached log-probs [n, K])}
for the samples of its first N micro-batches, taken the way the trainer takes them (Trainer._micro_batches).
"""
import os

import torch


def run(job):
    from megatron.core import parallel_state as ps

    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    trainer = Trainer(load_config(base=job["recipe"]))
    seen = {}
    real = trainer.teacher_cache.for_micro_batch

    def recording(sample_ids, locations, mb):  # the trainer's own call, observed
        cached = real(sample_ids, locations, mb)
        for b, sid in enumerate(sample_ids):
            m = mb.loss_mask[b].bool()
            seen[sid] = (mb.labels[b][m], cached.ids_BSK[b][m], cached.logprobs_BSK[b][m].float())
        return cached

    trainer.teacher_cache.for_micro_batch = recording
    batches = iter(trainer.loader)
    for _ in range(job["batches"]):
        trainer._micro_batches(batches)
    os.makedirs(job["out"], exist_ok=True)
    torch.save({"dp": ps.get_data_parallel_world_size(), "rows": seen},
               os.path.join(job["out"], f"rank{torch.distributed.get_rank()}.pt"))
