"""`megamod eval`: score a checkpoint on yes/no (POPE, MME), multiple-choice (MMBench) or open-answer data.

Yes/no and multiple choice: one forward per batch; the answer is the candidate first token (Yes/No, or the option
letter) with the largest logit after the training template's prompt (megamod/eval/scoring.py). Open answers
(--task caption): greedy generation with a KV cache (megamod/eval/generate.py), exact match and token F1 against
the file's references. Data formats: POPE JSON Lines as published and the synthetic eval/pope_*.jsonl; LLaVA's POPE
question file with --annotation-dir (POPE's coco_pope_<category>.json files: scores per category); the MME release
directory; MMBench TSV (base64 images) and the synthetic eval/mmbench.jsonl; LLaVA question JSON Lines for
captions/VQA, e.g. the synthetic eval/captions.jsonl (megamod/eval/formats.py, mme.py, pope_llava.py).

As LLaVA's scripts: --answers-file writes LLaVA's answer file (megamod/eval/answers.py), --conv-mode takes LLaVA's
conversation-mode names, --num-chunks/--chunk-idx score one of N pieces, and --merge scores the pieces' answer files
together (no checkpoint; the numbers of the unsplit run).
Run under torchrun for --tp/--pp/--ep; the last pipeline stage's tensor- and data-parallel rank 0 prints the table and
writes --out and --answers-file.
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)

POPE_COLUMNS = ("count", "accuracy", "precision", "recall", "f1", "yes_ratio")


def add_arguments(p) -> None:
    from megamod.data.templates import CONV_MODES

    p.add_argument("--ckpt", default=None,
                   help="megamod LLaVA checkpoint directory (dense or sparse); not with --merge")
    p.add_argument("--task", required=True, choices=("pope", "mme", "mcq", "caption"),
                   help="pope/mme: yes/no questions; mcq: multiple choice; caption: open answers, generated")
    p.add_argument("--data", required=True,
                   help="POPE .json/.jsonl (or LLaVA's llava_pope_test.jsonl with --annotation-dir); MME release "
                        "directory; MMBench .tsv or synthetic mmbench.jsonl; LLaVA question .jsonl (caption)")
    p.add_argument("--annotation-dir", default=None,
                   help="pope: POPE's label files (coco_pope_<category>.json) for LLaVA's question file --data")
    p.add_argument("--max-new-tokens", type=int, default=128, help="caption: longest answer generated")
    p.add_argument("--image-folder", default=None,
                   help="folder the image paths are relative to (default: the data file's folder, or its parent)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    p.add_argument("--circular", action="store_true",
                   help="mcq: MMBench circular evaluation (every rotation of the options must be answered right)")
    templates = p.add_mutually_exclusive_group()
    templates.add_argument("--template", default="llava_mod", help="conversation template, as in training")
    templates.add_argument("--conv-mode", default=None, choices=sorted(CONV_MODES),
                           help="LLaVA's name of the conversation template (in place of --template)")
    p.add_argument("--instruction", default=None,
                   help="pope/mme/caption: a line appended to each question, e.g. 'Answer the question using a "
                        "single word or phrase.' (default: none, as in the synthetic training data)")
    p.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer/ folder")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--out", default=None, help="write the metrics and per-item predictions to this JSON file")
    p.add_argument("--answers-file", default=None, help="write LLaVA's answer file (JSON Lines) here")
    p.add_argument("--model-id", default=None, help="the answer file's model_id (default: the checkpoint's name)")
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into N pieces as LLaVA does ...")
    p.add_argument("--chunk-idx", type=int, default=0, help="... and score piece I (0-based)")
    p.add_argument("--merge", nargs="+", default=None, metavar="ANSWERS",
                   help="score these answer files (the chunks' --answers-file, in order) on --data instead of a "
                        "checkpoint; --answers-file then writes their concatenation")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (sparse checkpoints)")


def _value(value) -> str:
    return f"{value:>8}" if isinstance(value, int) else f"{value:8.4f}"


def table(result: dict) -> str:
    lines = [f"{result['task']} on {result.get('data', '?')}"]
    categories = result.get("categories", {})
    if result["task"] == "pope" and categories:  # one row per POPE split, then all of them
        lines.append(f"{'category':20} " + " ".join(f"{c:>9}" for c in POPE_COLUMNS))
        for name, m in [*categories.items(), ("all", result)]:
            lines.append(f"{name:20} " + " ".join(f"{m[c]:>9}" if isinstance(m[c], int) else f"{m[c]:9.4f}"
                                                  for c in POPE_COLUMNS))
        return "\n".join(lines)
    keys = ["count", "accuracy", "precision", "recall", "f1", "yes_ratio", "circular_accuracy", "with_references",
            "exact_match", "token_f1", "perception", "cognition"]
    rows = [(k, result[k]) for k in keys if k in result]
    rows += [(f"  {c}", v["score"] if isinstance(v, dict) else v) for c, v in categories.items()]
    lines += [f"{name:20} {_value(value)}" for name, value in rows]
    return "\n".join(lines)


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    log.info("wrote %s", path)


def _report(args, result: dict, answer_rows: list[dict] | None) -> None:
    from megamod.eval import answers

    print(table(result), flush=True)
    if args.out:
        _write_json(args.out, result)
    if args.answers_file:
        answers.write(args.answers_file, answer_rows)
        log.info("wrote %d answers to %s", len(answer_rows), args.answers_file)


def merge(args) -> int:
    """Score the answer files of a split run (--merge) as one run."""
    from megamod.eval import answers
    from megamod.eval.scoring import load_items

    items = load_items(args.task, args.data, image_folder=args.image_folder, limit=args.limit,
                       annotation_dir=args.annotation_dir)
    found = answers.read(args.merge)
    result = {**answers.score(args.task, items, found, args.data), "data": args.data, "merged": args.merge}
    _report(args, result, [record for _, record in found])
    return 0


def run(args) -> int:
    if args.merge:
        if args.ckpt or args.num_chunks != 1 or args.chunk_idx != 0:
            args._parser.error("--merge scores answer files: --ckpt, --num-chunks and --chunk-idx do not apply")
        return merge(args)
    if not args.ckpt:
        args._parser.error("--ckpt is required (or --merge answer files)")
    from megamod import distributed
    from megamod.eval import answers
    from megamod.eval.runner import is_writer
    from megamod.eval.scoring import evaluate_items, load_items

    template = args.conv_mode or args.template
    distributed.initialize(distributed.ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep))
    try:
        items = load_items(args.task, args.data, image_folder=args.image_folder, limit=args.limit,
                           annotation_dir=args.annotation_dir, num_chunks=args.num_chunks, chunk_idx=args.chunk_idx)
        result = evaluate_items(args.ckpt, args.task, items, batch_size=args.batch_size, circular=args.circular,
                                template=template, instruction=args.instruction, tokenizer=args.tokenizer,
                                dtype=args.dtype, progress=True, max_new_tokens=args.max_new_tokens)
        result = {**result, "ckpt": args.ckpt, "data": args.data}
        if args.num_chunks > 1:
            result["chunk"] = {"index": args.chunk_idx, "of": args.num_chunks}
        if is_writer():
            model_id = args.model_id or os.path.basename(os.path.normpath(args.ckpt))
            rows = answers.records(args.task, items, result, model_id, args.instruction) if args.answers_file \
                else None
            _report(args, result, rows)
    finally:
        distributed.shutdown()
    return 0
