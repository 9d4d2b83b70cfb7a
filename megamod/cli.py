"""`python -m megamod <command>`: the user-facing entry points.

Each command lives in megamod/commands/<name>.py with a docstring (its help), `add_arguments(parser)` and
`run(args) -> int`; modules are imported only when their command runs, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {  # name -> (module, help)
    "train": ("megamod.commands.train", "run one training stage from a YAML recipe (under torchrun or srun)"),
    "logits": ("megamod.commands.logits", "one forward pass; saves fp32 logits [S, V] of every position"),
    "demo": ("megamod.commands.demo", "the main job on CPU"),
    "upcycle": ("megamod.commands.upcycle", "turn a dense checkpoint into a sparse (MoE) one"),
    "prune": ("megamod.commands.prune", "keep a subset of a checkpoint's decoder layers (depth pruning)"),
    "make-data": ("megamod.commands.make_data", "write the embedded synthetic multimodal data set"),
    "check-data": ("megamod.commands.check_data",
                   "read a whole data file as training would and report every bad sample"),
    "eval": ("megamod.commands.eval", "score a checkpoint on POPE-style yes/no or multiple-choice data"),
    "cache-teacher": ("megamod.commands.cache_teacher",
                      "run a teacher alone and store its top-k log-probs / pair log-probs for training"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megamod", description="LLaVA-MoD distillation on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module, _parser=p)
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Two passes: the first finds the command, whose module then declares its own arguments.
    known, _ = parser.parse_known_args(argv[:1])
    module = importlib.import_module(known._module)
    module.add_arguments(known._parser)
    args = parser.parse_args(argv)
    return module.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
