"""`megamod make-data`: write the embedded synthetic multimodal data set (coloured shapes).

Captions (align stage, plain template), instruction conversations and preference pairs for training, POPE-style and
MMBench-style evaluation files on held-out images, the ground-truth scenes, and a small BPE tokenizer trained on the
text, all in the formats real data uses (see megamod/data/synthetic_writer.py). Same seed -> same bytes.
"""
from __future__ import annotations

import os
import time


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", type=int, default=2000, help="number of training images (default 2000)")
    p.add_argument("--eval-size", type=int, default=None, help="number of held-out images (default size/10, >= 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size cap (default 1024)")


def run(args) -> int:
    from megamod.data.synthetic_writer import write_dataset
    from megamod.data.tokenizer import load_tokenizer

    start = time.time()
    info = write_dataset(args.out, size=args.size, seed=args.seed, eval_size=args.eval_size,
                         vocab_size=args.vocab_size)
    tokenizer = load_tokenizer(os.path.join(args.out, "tokenizer"))
    print(f"\nsynthetic data set (seed {info['seed']}) in {os.path.abspath(args.out)}:")
    for name, count in info["counts"].items():
        print(f"  {name:30} {count:7d}")
    print(f"  tokenizer/                     vocab size {tokenizer.vocab_size}")
    print(f"{_dir_size(args.out) / 1e6:.1f} MB written in {time.time() - start:.1f}s")
    return 0
