"""`megamod cache-teacher`: run a teacher alone over a data set and store what the student needs.

Conversations: the teacher's top-k token ids and log-probs at every answer position, plus the log of the mass left
outside the top-k. Preference pairs: the two sequence log-probs per pair (log pi_T(y+|x), log pi_T(y-|x)). Rows are
keyed by sample id; the output is sharded, checksummed and resumable (re-run the same command after an
interruption). Train with `teacher: {cache: DIR}` in the recipe. Run under torchrun for --tp/--pp (the remaining
ranks split the shards data-parallel). docs/TEACHER_CACHE.md has the format and the loss.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="teacher checkpoint (megamod format)")
    p.add_argument("--data", required=True, action="append", help="data file; repeat for several (ids must be unique)")
    p.add_argument("--out", required=True, help="cache directory (resumed if it holds a partial cache)")
    p.add_argument("--kind", default="conversations", choices=("conversations", "pairs"))
    p.add_argument("--topk", type=int, default=64, help="top-k log-probs kept per answer position (conversations)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="storage of the top-k log-probs (tail mass and pair log-probs are always float32)")
    p.add_argument("--template", default="llava_mod", help="conversation template, as in training")
    p.add_argument("--image-folder", default=None, help="default: each data file's folder")
    p.add_argument("--max-length", type=int, default=2048, help="as the training recipe's data.max_length")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer/ folder")
    p.add_argument("--batch-size", type=int, default=4, help="samples per teacher forward")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (the unit of resumption)")
    p.add_argument("--model-dtype", default="auto", help="teacher compute dtype: auto (bf16 on GPU, fp32 on CPU), ...")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    from megamod import distributed
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource

    sources = [DataSource(path=p, template=args.template, image_folder=args.image_folder) for p in args.data]
    job = CacheJob(ckpt=args.ckpt, data=sources, out=args.out, kind=args.kind, topk=args.topk, dtype=args.dtype,
                   shard_size=args.shard_size, batch_size=args.batch_size, max_length=args.max_length,
                   tokenizer=args.tokenizer, model_dtype=args.model_dtype, tp=args.tp, pp=args.pp,
                   progress=not args.no_progress)
    distributed.initialize(distributed.ParallelConfig(tp=args.tp, pp=args.pp))
    manifest = write_cache(job)
    if manifest is not None:
        log.info("teacher cache %s: %d samples in %d shards (%s)", args.out, manifest["num_samples"],
                 len(manifest["shards"]), args.kind)
    distributed.shutdown()
    return 0
