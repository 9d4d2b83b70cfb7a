"""`megamod eval`: score a checkpoint on yes/no (POPE, MME), multiple-choice (MMBench) or open-answer data.

Yes/no and multiple choice: one forward per batch; the answer is the candidate first token (Yes/No, or the option
letter) with the largest logit after the training template's prompt (megamod/eval/scoring.py). Open answers
(--task caption): greedy generation with a KV cache (megamod/eval/generate.py), exact match and token F1 against
the file's references. Data formats: POPE JSON Lines as published and the synthetic eval/pope_*.jsonl; the MME
release directory; MMBench TSV (base64 images) and the synthetic eval/mmbench.jsonl; LLaVA question JSON Lines for
captions/VQA, e.g. the synthetic eval/captions.jsonl (megamod/eval/formats.py, mme.py).
Run under torchrun for --tp/--pp/--ep; the last pipeline stage's tensor- and data-parallel rank 0 prints the table and
writes --out.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="megamod LLaVA checkpoint directory (dense or sparse)")
    p.add_argument("--task", required=True, choices=("pope", "mme", "mcq", "caption"),
                   help="pope/mme: yes/no questions; mcq: multiple choice; caption: open answers, generated")
    p.add_argument("--data", required=True,
                   help="POPE .json/.jsonl; MME release directory; MMBench .tsv or synthetic mmbench.jsonl; LLaVA "
                        "question .jsonl (caption)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="caption: longest answer generated")
    p.add_argument("--image-folder", default=None,
                   help="folder the image paths are relative to (default: the data file's folder, or its parent)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--circular", action="store_true",
                   help="mcq: MMBench circular evaluation (every rotation of the options must be answered right)")
    p.add_argument("--template", default="llava_mod", help="conversation template, as in training")
    p.add_argument("--instruction", default=None,
                   help="pope: a line appended to each question, e.g. 'Answer the question using a single word or "
                        "phrase.' (default: none, as in the synthetic training data)")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer/ folder")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--out", default=None, help="write the metrics and per-item predictions to this JSON file")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (sparse checkpoints)")


def table(result: dict) -> str:
    keys = ["count", "accuracy", "precision", "recall", "f1", "yes_ratio", "circular_accuracy", "with_references",
            "exact_match", "token_f1", "perception", "cognition"]
    rows = [(k, result[k]) for k in keys if k in result]
    rows += [(f"  {c}", v["score"] if isinstance(v, dict) else v) for c, v in result.get("categories", {}).items()]
    lines = [f"{result['task']} on {result.get('data', '?')}"]
    lines += [f"{name:20} {value:>8}" if isinstance(value, int) else f"{name:20} {value:8.4f}" for name, value in rows]
    return "\n".join(lines)


def run(args) -> int:
    from megamod import distributed
    from megamod.eval.runner import is_writer
    from megamod.eval.scoring import evaluate

    result = evaluate(args.ckpt, args.task, args.data, image_folder=args.image_folder, batch_size=args.batch_size,
                      limit=args.limit, circular=args.circular, tp=args.tp, pp=args.pp, ep=args.ep,
                      template=args.template, instruction=args.instruction, tokenizer=args.tokenizer,
                      dtype=args.dtype, progress=True, max_new_tokens=args.max_new_tokens)
    if is_writer():
        print(table(result), flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
                f.write("\n")
            log.info("wrote %s", args.out)
    distributed.shutdown()
    return 0
