"""`megamod demo`: the whole LLaVA-MoD pipeline on the embedded synthetic data set, on CPU.

Trains a small teacher VLM (adapter alignment, instruction tuning), prunes it into a smaller student whose adapter is
aligned again, distils the student dense-to-dense at TP=2, upcycles it to a Mixture of Experts, distils it
dense-to-sparse and then by preference (DPO against the teacher) at EP=2, evaluates every model on held-out
POPE-style and multiple-choice splits, exports the final student to Hugging Face format and re-scores it with
transformers, and writes `<out>/report.md`. Re-running resumes; see
megamod/demo/pipeline.py for the stages.
"""
from __future__ import annotations

import os
import shutil
import time


def add_arguments(p) -> None:
    from megamod.demo.presets import PRESETS
    from megamod.demo.stages_table import ORDER

    p.add_argument("--out", default="runs/demo", help="run directory (resumed when it exists)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="full: the README's demo (minutes); tiny: seconds per stage, for tests")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first instead of resuming")
    p.add_argument("--until", default=None, choices=ORDER, help="stop after this stage")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: every core)")


def run(args) -> int:
    from megamod.demo.pipeline import Demo
    from megamod.demo.presets import PRESETS

    if args.fresh and os.path.exists(args.out):
        shutil.rmtree(args.out)
    start = time.time()
    demo = Demo(args.out, PRESETS[args.preset], threads=args.threads)
    demo.run(until=args.until)
    print(f"\ndemo finished in {time.time() - start:.0f}s; report: {demo.path('report.md')}")
    return 0
