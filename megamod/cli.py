"""`python -m megamod <command>`: the user-facing entry points."""
from __future__ import annotations

import argparse
import logging
import sys


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input-ids must be comma-separated integers, got {text!r}")
    if not ids:
        raise argparse.ArgumentTypeError("--input-ids is empty")
    return ids


def _add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (sparse checkpoints)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamod", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("logits", help="one forward pass; saves fp32 logits [S, V] of every position")
    p.add_argument("--ckpt", required=True, help="megamod checkpoint directory")
    p.add_argument("--input-ids", required=True, type=_ids, help="comma-separated token ids, e.g. 3,17,5")
    p.add_argument("--out", required=True, help="output .pt file")
    _add_parallel(p)

    p = sub.add_parser("demo", help="the main job on CPU")
    p.add_argument("--out", default="runs/demo", help="output directory")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "logits":
        from megamod.commands.logits import run
    elif args.command == "demo":
        from megamod.commands.demo import run
    return run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
