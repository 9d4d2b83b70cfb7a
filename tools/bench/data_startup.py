"""Start-up cost of the training data path: time to the first batch and resident memory per rank, for a synthetic
LLaVA JSON list of N samples (~2.6 KB each, as LLaVA-665K's), on the JSON path and the preprocessed one.

    python tools/bench/data_startup.py --samples 100000 400000 [--root DIR] [--json out.json]
        [--preprocessed] [--baseline-rev REV]

Each variant runs in a fresh subprocess (one rank): after the imports and the tokenizer, it builds the data sets as
the trainer's `_build_data` does (loading/data.build_datasets, a stand-in LLaVA model with 576 image tokens,
then MixtureSampler + StatefulLoader + Collator) and reads the first batch. Reported: seconds to the first batch,
peak RSS above the process's RSS before building (VmHWM, reset before building where the kernel allows) and steady
RSS above it after the first batch. Variants:
  json cold            no index cache (removed first), data.check_images=startup, no length grouping (defaults)
  json cached          the same, with the index cached beside the file by the cold run (another rank, a later run)
  json cached, lazy    data.check_images=lazy (no image lookups at start-up)
  json lazy, grouping  + data.group_by_length: the length estimates computed (cold), then read from their cache
  preprocessed         (--preprocessed) a prefix written by tools/preprocess_data.py (written first, not timed)
  before (REV)         (--baseline-rev) the data path of git revision REV, as the cold JSON variant
The data (and its 64 distinct images) are written once under --root and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.environ.get("MEGAMOD_BENCH_SRC", REPO))
sys.path.insert(1, REPO)

WORDS = ("the a red blue green circle square triangle left right top bottom image shows is are there of in on with "
         "and which color how many objects describe position near far large small bright dark shape center").split()


def _status(field: str) -> int:
    """/proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def write_data(root: str, n: int) -> str:
    """root/llava-N.json: N conversations of ~2.6 KB, images among 64 files in root/images (written once)."""
    path = os.path.join(root, f"llava-{n}.json")
    if os.path.exists(path):
        return path
    from PIL import Image

    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    for k in range(64):
        Image.new("RGB", (64, 48), (k * 4, 100, 200 - k)).save(os.path.join(root, "images", f"{k:03d}.png"))
    rng = random.Random(n)
    pool = [" ".join(rng.choices(WORDS, k=rng.randint(20, 90))) for _ in range(4096)]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write("[\n")
        for i in range(n):
            turns = []
            for t in range(rng.randint(2, 3)):
                q = rng.choice(pool) + "?"
                turns += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q},
                          {"from": "gpt", "value": rng.choice(pool) + ". " + rng.choice(pool) + "."}]
            row = {"id": f"{i:09d}", "image": f"images/{rng.randrange(64):03d}.png", "conversations": turns}
            f.write(("" if i == 0 else ",\n") + json.dumps(row, indent=1))
        f.write("\n]\n")
    os.replace(tmp, path)
    return path


def tokenizer_dir(root: str) -> str:
    path = os.path.join(root, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        from tests.data_fixtures.builders import build_hf

        build_hf(path)
    return path


def stand_in_model():
    """What loading.data reads of a LLaVA model (image size 336, 576 image tokens)."""
    from types import SimpleNamespace

    from megamod.data.images import ImageProcessor
    from megamod.families.llava import LLAVA

    p = ImageProcessor()
    vision = SimpleNamespace(image_size=336, image_mean=p.mean, image_std=p.std, num_image_tokens=576)
    return SimpleNamespace(family=LLAVA, cfg=SimpleNamespace(vision=vision), image_token_id=None)


def child(args) -> dict:
    """One variant in this (fresh) process; returns its figures."""
    import inspect

    from megamod.data.sampler import MixtureSampler, StatefulLoader
    from megamod.data.tokenizer import load_tokenizer
    from megamod.loading import data as data_setup
    from megamod.training.config import DataSource

    tok = load_tokenizer(args.tokenizer)
    model = stand_in_model()
    model.image_token_id = tok.token_to_id("<image>")
    source = DataSource(prefix=args.data) if args.child == "preprocessed" else DataSource(path=args.data)
    kw = {}
    if "check_images" in inspect.signature(data_setup.build_datasets).parameters:
        kw["check_images"] = args.check_images
    baseline = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    t0 = time.perf_counter()
    (ds,) = data_setup.build_datasets(model, tok, [source], "conversations", 8192, "error", **kw)
    lengths = ds.lengths if args.group_by_length else None
    sampler = MixtureSampler([len(ds)], seed=0, lengths=lengths, group_size=8 if args.group_by_length else None)
    loader = StatefulLoader(ds, sampler, data_setup.build_collator(model, tok, 8), micro_batch_size=1)
    batch = next(iter(loader))
    seconds = time.perf_counter() - t0
    assert batch.tokens.shape[0] == 1
    peak = _status("VmHWM") - baseline
    import gc

    del batch, loader
    gc.collect()
    steady = _status("VmRSS") - baseline
    return {"seconds": seconds, "peak_mb": peak / 2 ** 20, "steady_mb": steady / 2 ** 20, "samples": len(ds),
            "hwm_reset": hwm_reset, "baseline_mb": baseline / 2 ** 20}


def run_variant(script: str, data: str, tokenizer: str, variant: str, src: str | None = None, **opts) -> dict:
    cmd = [sys.executable, script, "--child", variant, "--data", data, "--tokenizer", tokenizer,
           "--check-images", opts.get("check_images", "startup")] + (["--group-by-length"] if opts.get("group") else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if src:
        env["MEGAMOD_BENCH_SRC"] = src
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def remove_caches(path: str) -> None:
    folder, base = os.path.split(path)
    for name in os.listdir(folder):
        if name.startswith(base + ".megamod-"):
            os.unlink(os.path.join(folder, name))


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--samples", type=int, nargs="+", default=[100_000, 400_000])
    a.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "megamod-bench-data"))
    a.add_argument("--json", default=None, help="write the results as JSON")
    a.add_argument("--preprocessed", action="store_true", help="also the preprocessed path (tokenizes every sample "
                   "once with tools/preprocess_data.py: minutes at 100k on 2 cores)")
    a.add_argument("--baseline-rev", default=None, help="also the JSON path of this git revision")
    a.add_argument("--workers", type=int, default=2, help="tools/preprocess_data.py --workers")
    a.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a.add_argument("--data", default=None, help=argparse.SUPPRESS)
    a.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    a.add_argument("--check-images", default="startup", help=argparse.SUPPRESS)
    a.add_argument("--group-by-length", action="store_true", help=argparse.SUPPRESS)
    args = a.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    os.makedirs(args.root, exist_ok=True)
    script = os.path.abspath(__file__)
    tok = tokenizer_dir(args.root)
    src = None
    if args.baseline_rev:
        src = os.path.join(args.root, f"src-{args.baseline_rev}")
        shutil.rmtree(src, ignore_errors=True)
        os.makedirs(src)
        archive = subprocess.run(["git", "-C", REPO, "archive", args.baseline_rev, "megamod"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    rows = []
    for n in args.samples:
        t = time.perf_counter()
        data = write_data(args.root, n)
        size_mb = os.path.getsize(data) / 2 ** 20
        print(f"[{n} samples: {data}, {size_mb:.0f} MiB, written in {time.perf_counter() - t:.0f} s]", flush=True)
        variants = []
        if src:
            variants.append((f"before ({args.baseline_rev})", "json", {}, src))
        variants += [("json cold", "json", {}, None), ("json cached", "json", {}, None),
                     ("json cached, lazy", "json", {"check_images": "lazy"}, None),
                     ("json lazy, grouping (cold)", "json", {"check_images": "lazy", "group": True}, None),
                     ("json lazy, grouping (cached)", "json", {"check_images": "lazy", "group": True}, None)]
        remove_caches(data)
        for name, kind, opts, source in variants:
            if name == "json cold":
                remove_caches(data)
            res = run_variant(script, data, tok, kind, source, **opts)
            rows.append({"samples": n, "file_mb": size_mb, "variant": name, **res,
                         "peak_of_file": res["peak_mb"] / size_mb})
            print(f"  {name}: {res['seconds']:.1f} s, peak +{res['peak_mb']:.0f} MiB, steady "
                  f"+{res['steady_mb']:.0f} MiB", flush=True)
        if args.preprocessed:
            prefix = os.path.join(args.root, f"llava-{n}-pre")
            if not os.path.exists(prefix + ".meta.json"):
                t = time.perf_counter()
                subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--data", data,
                                "--tokenizer", tok, "--num-image-tokens", "576", "--max-length", "8192", "--out", prefix, "--workers",
                                str(args.workers), "--no-image-check"], check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
                print(f"  [preprocessed in {time.perf_counter() - t:.0f} s]", flush=True)
            res = run_variant(script, prefix, tok, "preprocessed", None)
            rows.append({"samples": n, "file_mb": size_mb, "variant": "preprocessed", **res,
                         "peak_of_file": res["peak_mb"] / size_mb})
    sys.path.insert(0, os.path.join(REPO, "tools", "bench"))
    import torch

    from benchlib import print_table, result, write_json

    columns = [("samples", "samples", ",d"), ("file_mb", "JSON MiB", ".0f"), ("variant", "variant", ""),
               ("seconds", "s to 1st batch", ".1f"), ("peak_mb", "peak RSS +MiB", ".0f"),
               ("peak_of_file", "peak / file", ".2f"), ("steady_mb", "steady RSS +MiB", ".0f")]
    notes = ["one rank, fresh process per variant; RSS above the process's RSS before building (after imports and "
             "the tokenizer); stand-in LLaVA model: 576 image tokens, 336 px; max_length 8192 (the test tokenizer splits finely); micro-batch 1"]
    if not all(r["hwm_reset"] for r in rows):
        notes.append("VmHWM could not be reset: peaks include the imports' own peak")
    res = result("data_startup", "Data start-up: time to the first batch and RSS per rank", torch.device("cpu"),
                 {"samples": args.samples, "root": args.root, "baseline_rev": args.baseline_rev}, columns, rows,
                 notes)
    print_table(res)
    write_json(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
