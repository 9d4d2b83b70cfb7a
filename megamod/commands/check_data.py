"""`megamod check-data`: read a whole data file exactly as training would and report every bad sample.

Every record is parsed and checked, templated and tokenized, and every image opened and preprocessed. Each bad sample
is printed as `file:line (id=...): reason`, then a summary (counts, token lengths). Exit status 1 if any sample is bad.
The tokenizer defaults to `tokenizer/` beside the data file (where make-data puts it), image paths are relative to
--image-folder (default: the data file's directory).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys

import numpy as np

_DATASET = None  # the dataset, inherited by forked workers


def _inspect(k: int):
    """(BadSample, None) or (None, stats) for sample k."""
    from megamod.data.datasets import Sample, Skipped

    item = _DATASET[k]
    if isinstance(item, Skipped):
        return item.bad, None
    encodeds = [item.text] if isinstance(item, Sample) else [item.chosen, item.rejected]
    n_images = item.images.shape[0]
    k_img = _DATASET.num_image_tokens
    lengths = [len(e.tokens) + n_images * (k_img - 1) for e in encodeds]
    return None, (lengths, n_images, int(sum(e.targets.sum() for e in encodeds)), any(e.truncated for e in encodeds))


def _detect_kind(path: str) -> str:
    from megamod.data.parquet import column_kind, is_parquet
    from megamod.data.records import RecordFile
    from megamod.data.templates import SampleError

    if is_parquet(path):
        kind = column_kind(path)
        if kind is None:
            raise SystemExit(f"{path}: cannot tell whether it holds conversations or pairs; pass --kind")
        return kind
    records = RecordFile(path)
    for i in range(len(records)):
        try:
            obj = records.read(i)
        except SampleError:
            continue
        if "conversations" in obj:
            return "conversations"
        if "chosen" in obj:
            return "pairs"
    raise SystemExit(f"{path}: cannot tell whether it holds conversations or pairs; pass --kind")


def _file_order(bad) -> tuple[str, int]:
    """"path:line" (JSON) or "path row N" (parquet) as (path, number), for listing in file order."""
    for separator in (":", " row "):
        path, _, number = bad.location.rpartition(separator)
        if number.isdigit():
            return path, int(number)
    return bad.location, 0


def _stats(name: str, values) -> str:
    v = np.asarray(values)
    return (f"{name}: min {v.min()}  mean {v.mean():.1f}  p50 {np.percentile(v, 50):.0f}  "
            f"p95 {np.percentile(v, 95):.0f}  max {v.max()}")


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="data file: LLaVA JSON list or JSONL, or parquet (file or directory)")
    p.add_argument("--image-folder", default=None, help="folder the image paths are relative to")
    p.add_argument("--kind", choices=("conversations", "pairs"), default=None, help="default: from the first record")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory or file (default: tokenizer/ beside --data)")
    p.add_argument("--template", choices=("llava_mod", "plain", "chatml"), default="llava_mod")
    p.add_argument("--max-length", type=int, default=2048, help="maximum sequence length (default 2048)")
    p.add_argument("--num-image-tokens", type=int, default=1,
                   help="positions each <image> takes in --max-length (576 for CLIP-336/14; default 1: text only)")
    p.add_argument("--truncate-answer", action="store_true", help="cut over-long answers instead of rejecting")
    p.add_argument("--image-size", type=int, default=336, help="CLIP resolution (default 336)")
    p.add_argument("--image-mode", choices=("pad", "crop"), default="pad", help="pad to square (LLaVA) or crop")
    p.add_argument("--workers", type=int, default=1, help="processes reading samples (default 1)")


def run(args) -> int:
    global _DATASET
    from megamod.data.datasets import BadSampleReport, FileDataset
    from megamod.data.images import ImageProcessor
    from megamod.data.records import DataError
    from megamod.data.tokenizer import TokenizerError, load_tokenizer

    tokenizer_path = args.tokenizer or os.path.join(os.path.dirname(os.path.abspath(args.data)), "tokenizer")
    try:
        tokenizer = load_tokenizer(tokenizer_path)
        kind = args.kind or _detect_kind(args.data)
        _DATASET = FileDataset(args.data, tokenizer, kind=kind, image_folder=args.image_folder,
                               template=args.template, image_processor=ImageProcessor(args.image_size, args.image_mode),
                               max_length=args.max_length, num_image_tokens=args.num_image_tokens,
                               truncate_answer=args.truncate_answer, on_bad_sample="skip")
    except (DataError, TokenizerError, ValueError) as e:
        print(f"check-data: {e}", file=sys.stderr)
        return 1
    print(f"checking {args.data}: {len(_DATASET.records)} records, kind {kind}, template {args.template}, "
          f"tokenizer {tokenizer.path} ({tokenizer.kind}, vocab {tokenizer.vocab_size})", flush=True)
    report = BadSampleReport(_DATASET.report)
    lengths, images, trained, truncated = [], 0, 0, 0
    indices = range(len(_DATASET))
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = list(pool.imap(_inspect, indices, chunksize=64))
    else:
        results = [_inspect(k) for k in indices]
    for bad, stats in results:
        if bad is not None:
            report.add(bad)
            continue
        lengths += stats[0]
        images += stats[1]
        trained += stats[2]
        truncated += stats[3]
    for bad in sorted(report, key=_file_order):
        print(f"BAD {bad}")
    good = len(results) - (len(report) - len(_DATASET.report))
    print(f"\n{len(_DATASET.records)} records: {good} good, {len(report)} bad; {images} images; "
          f"{trained} trained tokens; {truncated} truncated")
    if lengths:
        print(_stats(f"sequence length (each image = {args.num_image_tokens})", lengths))
    if report:
        print(report.by_reason())
    print(json.dumps({"records": len(_DATASET.records), "good": good, "bad": len(report)}))
    return 1 if report else 0
