"""Tokenize a large data file once into megatron-core's indexed format, for corpora of millions of samples.

    python tools/preprocess_data.py --data llava_v1_5_mix665k.json --image-folder /data/llava \\
        --tokenizer /models/qwen2-0.5b --template llava_mod --max-length 2048 --num-image-tokens 576 \\
        --out /data/mix665k --workers 16

writes /data/mix665k.{bin,idx,samples.jsonl,lengths.npy,meta.json} (layout: megamod/data/indexed.py); a recipe
trains on it with `data.train: [{prefix: /data/mix665k, weight: ...}]`, mixed freely with JSON sources, and gets
the same samples as the JSON path. --template, --max-length and --num-image-tokens (the model's image tokens,
576 for CLIP-336/14) must be the run's: training refuses a prefix made with other settings or another tokenizer.

Work is cut into chunks of --chunk-size samples, tokenized by --workers processes (a progress bar counts samples).
Each finished chunk is kept in PREFIX.partial/ until the end, so a run that was killed resumes where it stopped:
run the same command again (other arguments or a changed data file start over). The chunks are then merged into
the final files, PREFIX.meta.json written last: a prefix without it is incomplete. The output does not depend on
--workers.

Every sample is checked here once, as training would find it: the record (JSON, fields, placeholders), its length,
and that each image file exists and reads (PIL verify). All bad samples are listed (file:line, id, reason) on the
terminal and in PREFIX.bad_samples.txt; with --on-bad-sample error (default) no prefix is written, with skip they
are left out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_DATASET = None  # the FileDataset, inherited by forked workers
_CHECK_IMAGES = True


def check_image(path: str) -> str | None:
    """None when the image file exists and PIL reads it through (verify), else the reason."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        return f"image not found: {path}"
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"unreadable image: {path} ({type(e).__name__}: {e})"
    return None


def _chunk_prefix(partial: str, c: int) -> str:
    return os.path.join(partial, f"chunk-{c:06d}")


def _write_chunk(task):
    """Tokenizes samples [start, end) of the data set into one chunk; returns (c, samples written, bad samples)."""
    from megamod.data.datasets import BadSample, Skipped
    from megamod.data.indexed import IndexedWriter

    c, start, end, partial = task
    prefix = _chunk_prefix(partial, c)
    writer, bad = IndexedWriter(prefix, _DATASET.kind), []
    for k in range(start, end):
        item = _DATASET.text_item(k)
        if isinstance(item, Skipped):
            bad.append(item.bad)
            continue
        record, encoded = item
        location = _DATASET.location(k)
        reasons = [r for r in (check_image(os.path.join(_DATASET.image_folder, p)) for p in record.images)
                   if r] if _CHECK_IMAGES else []
        if reasons:
            bad.append(BadSample(location, reasons[0], record.sample_id))
            continue
        writer.add(record.sample_id, list(record.images), location, encoded, length=int(_DATASET.lengths[k]))
    writer.finalize({})
    with open(prefix + ".bad.json", "w") as f:
        json.dump([[b.location, b.reason, b.sample_id] for b in bad], f)
    with open(prefix + ".done.tmp", "w") as f:
        f.write(str(writer.count))
    os.replace(prefix + ".done.tmp", prefix + ".done")  # the chunk is complete only with this marker
    return c, end - start, writer.count, bad


def _read_chunk(partial: str, c: int):
    from megamod.data.datasets import BadSample

    prefix = _chunk_prefix(partial, c)
    with open(prefix + ".done") as f:
        count = int(f.read())
    with open(prefix + ".bad.json") as f:
        bad = [BadSample(*b) for b in json.load(f)]
    return count, bad


def _merge(out: str, partial: str, counts: list[int], meta: dict) -> int:
    """The chunks into out.{bin,idx,samples.jsonl,lengths.npy}, then out.meta.json; each replaced atomically."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megamod.data.indexed import write_meta

    tmp = out + ".merging"
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.int32)
    lengths = []
    with open(tmp + ".samples.jsonl", "wb") as samples:
        for c, count in enumerate(counts):
            if not count:
                continue
            prefix = _chunk_prefix(partial, c)
            builder.add_index(prefix)
            with open(prefix + ".samples.jsonl", "rb") as f:
                shutil.copyfileobj(f, samples)
            lengths.append(np.load(prefix + ".lengths.npy"))
    builder.finalize(tmp + ".idx")
    np.save(tmp + ".lengths.npy", np.concatenate(lengths).astype(np.int64))
    if os.path.exists(out + ".meta.json"):
        os.remove(out + ".meta.json")  # an older prefix at `out` is incomplete from here until the new meta
    for suffix in (".bin", ".idx", ".samples.jsonl", ".lengths.npy"):
        os.replace(tmp + suffix, out + suffix)
    total = sum(counts)
    write_meta(out, {**meta, "num_samples": total})
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data file: LLaVA JSON list or JSONL")
    p.add_argument("--kind", choices=("conversations", "pairs"), default="conversations")
    p.add_argument("--image-folder", default=None, help="folder the image paths are relative to (default: data dir)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or file")
    p.add_argument("--template", choices=("llava_mod", "plain", "chatml"), default="llava_mod")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--num-image-tokens", type=int, default=1, help="positions per <image> counted in --max-length "
                   "(the model's: 576 for CLIP-336/14)")
    p.add_argument("--truncate-answer", action="store_true")
    p.add_argument("--on-bad-sample", choices=("error", "skip"), default="error")
    p.add_argument("--no-image-check", action="store_true", help="do not open the images (their files must exist)")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.bin, .idx, .samples.jsonl, .lengths.npy, "
                   ".meta.json)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_argument("--chunk-size", type=int, default=2000, help="samples per resumable chunk")
    p.add_argument("--keep-partial", action="store_true", help="keep PREFIX.partial/ after the merge")
    args = p.parse_args(argv)
    if args.workers < 1 or args.chunk_size < 1:
        p.error("--workers and --chunk-size must be >= 1")

    global _DATASET, _CHECK_IMAGES
    from tqdm import tqdm

    from megamod.data.datasets import BadSampleReport, FileDataset
    from megamod.data.indexed import tokenizer_info
    from megamod.data.parquet import is_parquet
    from megamod.data.records import DataError
    from megamod.data.tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers each tokenize on one thread
    if is_parquet(args.data):  # the indexed format names image files; a parquet row's image is its bytes
        print(f"preprocess_data: {args.data} is parquet (images embedded); train on it directly", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.tokenizer)
    try:  # every bad sample is collected (skip) and the mode decides at the end, so that one run lists them all
        _DATASET = FileDataset(args.data, tokenizer, kind=args.kind, image_folder=args.image_folder,
                               template=args.template, max_length=args.max_length,
                               num_image_tokens=args.num_image_tokens, truncate_answer=args.truncate_answer,
                               on_bad_sample="skip")
    except DataError as e:
        print(f"preprocess_data: {e}", file=sys.stderr)
        return 1
    _CHECK_IMAGES = not args.no_image_check
    _DATASET.lengths  # the grouping lengths, computed here once before the workers fork
    meta = {"template": args.template, "max_length": args.max_length, "num_image_tokens": args.num_image_tokens,
            "truncate_answer": args.truncate_answer, "image_folder": os.path.abspath(_DATASET.image_folder),
            "sources": [os.path.abspath(args.data)], "tokenizer": tokenizer_info(tokenizer), "kind": args.kind}
    stat = os.stat(args.data)
    state = {**meta, "data_size": stat.st_size, "data_mtime_ns": stat.st_mtime_ns, "chunk_size": args.chunk_size,
             "scanned_samples": len(_DATASET), "image_check": _CHECK_IMAGES, "format": 1}

    partial = args.out + ".partial"
    state_path = os.path.join(partial, "state.json")
    if os.path.exists(state_path):
        with open(state_path) as f:
            if json.load(f) != state:
                print(f"preprocess_data: {partial} is from other arguments or another version of {args.data}; "
                      f"starting over", file=sys.stderr)
                shutil.rmtree(partial)
    if not os.path.exists(state_path):
        os.makedirs(partial, exist_ok=True)
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(state_path + ".tmp", state_path)

    n = len(_DATASET)
    tasks = [(c, start, min(start + args.chunk_size, n), partial)
             for c, start in enumerate(range(0, n, args.chunk_size))]
    counts, bad = [0] * len(tasks), {}
    todo = []
    for task in tasks:
        if os.path.exists(_chunk_prefix(partial, task[0]) + ".done"):
            counts[task[0]], bad[task[0]] = _read_chunk(partial, task[0])
        else:
            todo.append(task)
    if len(todo) < len(tasks):
        print(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} chunks already done in {partial}")
    pool = multiprocessing.get_context("fork").Pool(min(args.workers, len(todo))) if args.workers > 1 and todo else None
    results = pool.imap_unordered(_write_chunk, todo) if pool else map(_write_chunk, todo)
    done_samples = sum(t[2] - t[1] for t in tasks) - sum(t[2] - t[1] for t in todo)
    try:
        with tqdm(total=n, initial=done_samples, desc="tokenizing", unit="sample", mininterval=2.0) as bar:
            for c, size, count, chunk_bad in results:
                counts[c], bad[c] = count, chunk_bad
                bar.update(size)
    finally:
        if pool:
            pool.terminate()

    report = BadSampleReport(_DATASET.report)
    for c in range(len(tasks)):
        for b in bad[c]:
            report.add(b)
    if report:
        with open(args.out + ".bad_samples.txt", "w") as f:
            f.write("\n".join(str(b) for b in report) + "\n")
    if report and args.on_bad_sample == "error":
        print(f"preprocess_data: {args.data}: {report.summary()}\n(also in {args.out}.bad_samples.txt; fix them, or "
              f"rerun with --on-bad-sample skip to leave them out: the finished chunks are reused)", file=sys.stderr)
        return 1
    if not sum(counts):
        print(f"preprocess_data: {args.data}: no usable samples\n{report.summary()}", file=sys.stderr)
        return 1
    total = _merge(args.out, partial, counts, meta)
    if not args.keep_partial:
        shutil.rmtree(partial)
    print(f"{total} samples -> {args.out}.{{bin,idx,samples.jsonl,lengths.npy,meta.json}}")
    if report:
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
