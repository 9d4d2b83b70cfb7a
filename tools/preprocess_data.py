"""Tokenize a large data file once into megatron-core's indexed format, for corpora of millions of samples.

    python tools/preprocess_data.py --data llava_v1_5_mix665k.json --image-folder /data/llava \\
        --tokenizer /models/qwen2-0.5b --template llava_mod --max-length 2048 --out /data/mix665k --workers 16

writes /data/mix665k.{bin,idx,samples.jsonl,meta.json} (layout: megamod/data/indexed.py); training reads them with
megamod.data.indexed.IndexedSampleDataset, which yields the same samples as the JSON path. Records are checked as
training checks them (bad ones stop the run, or with --on-bad-sample skip are left out and listed at the end);
images are not opened here (run `megamod check-data` for that), their files must exist.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DATASET = None  # inherited by forked workers


def _encode(k: int):
    from megamod.data.datasets import Skipped

    item = _DATASET.text_item(k)
    if isinstance(item, Skipped):
        return k, item.bad
    record, encoded = item
    return k, (record.sample_id, record.images, encoded)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data file: LLaVA JSON list or JSONL")
    p.add_argument("--kind", choices=("conversations", "pairs"), default="conversations")
    p.add_argument("--image-folder", default=None, help="folder the image paths are relative to (default: data dir)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--template", choices=("llava_mod", "plain", "chatml"), default="llava_mod")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--num-image-tokens", type=int, default=1, help="positions per <image> counted in --max-length")
    p.add_argument("--truncate-answer", action="store_true")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.bin, .idx, .samples.jsonl, .meta.json)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    args = p.parse_args(argv)

    global _DATASET
    from tqdm import tqdm

    from megamod.data.datasets import BadSample, BadSampleError, BadSampleReport, FileDataset
    from megamod.data.indexed import IndexedWriter, tokenizer_info
    from megamod.data.records import DataError
    from megamod.data.tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    from megamod.data.parquet import is_parquet

    if is_parquet(args.data):  # the indexed format names image files; a parquet row's image is its bytes
        print(f"preprocess_data: {args.data} is parquet (images embedded); train on it directly", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.tokenizer)
    try:
        _DATASET = FileDataset(args.data, tokenizer, kind=args.kind, image_folder=args.image_folder,
                               template=args.template, max_length=args.max_length,
                               num_image_tokens=args.num_image_tokens, truncate_answer=args.truncate_answer,
                               on_bad_sample=args.on_bad_sample)
    except DataError as e:
        print(f"preprocess_data: {e}", file=sys.stderr)
        return 1
    report = BadSampleReport(_DATASET.report)
    writer = IndexedWriter(args.out, args.kind)
    indices = range(len(_DATASET))
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    results = pool.imap(_encode, indices, chunksize=256) if pool else map(_encode, indices)
    try:
        for k, result in tqdm(results, total=len(_DATASET), desc="tokenizing", mininterval=2.0):
            if isinstance(result, BadSample):
                report.add(result)
                continue
            sample_id, images, encoded = result
            writer.add(sample_id, images, _DATASET.location(k), encoded)
    except BadSampleError as e:
        print(f"preprocess_data: {e}", file=sys.stderr)
        return 1
    finally:
        if pool:
            pool.terminate()
    writer.finalize({"template": args.template, "max_length": args.max_length,
                     "num_image_tokens": args.num_image_tokens, "truncate_answer": args.truncate_answer,
                     "image_folder": os.path.abspath(_DATASET.image_folder), "sources": [os.path.abspath(args.data)],
                     "tokenizer": tokenizer_info(tokenizer)})
    print(f"{writer.count} samples -> {args.out}.{{bin,idx,samples.jsonl,meta.json}}")
    if report:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
