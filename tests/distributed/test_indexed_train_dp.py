"""`megamod train` on a preprocessed prefix (tools/preprocess_data.py) at DP=2 with grouping by length on: the same
batches, so bitwise the same per-step metrics, as the run on the JSON file; the prefix mixed with a JSON source."""
import json
import os
import sys

from tests.helpers import REPO, run_jobs
from tests.training_setup import STUDENT_LM, base_recipe, llava_config

TIMING = ("tokens_per_s", "tflops_per_rank", "step_s", "peak_mem_gb")


def test_prefix_trains_like_json_at_dp2_grouped(engine_setup, tmp_path):
    import importlib.util

    from megamod.data.tokenizer import load_tokenizer

    p = engine_setup
    data = os.path.join(p["root"], "data")
    tok = load_tokenizer(os.path.join(data, "tokenizer"))
    image_tokens = llava_config(tok.vocab_size, tok.image_id, **STUDENT_LM).vision.num_image_tokens
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(REPO, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    prefix = str(tmp_path / "prep" / "conversations")
    assert module.main(["--data", os.path.join(data, "conversations.json"),
                        "--tokenizer", os.path.join(data, "tokenizer"), "--max-length", "256", "--num-image-tokens", str(image_tokens), "--out", prefix,
                        "--workers", "2", "--chunk-size", "7"]) == 0

    captions = {"path": os.path.join(data, "captions.json"), "template": "plain", "weight": 1.0}
    sources = {"json": [{"path": os.path.join(data, "conversations.json"), "weight": 2.0}, captions],
               "prefix": [{"prefix": prefix, "weight": 2.0}, captions]}
    jobs = [{"kind": "trainer", "out": str(tmp_path / f"{name}.json"),
             "recipe": base_recipe(p["root"], "sft", p["student"], str(tmp_path / name),
                                   data={"train": train, "group_by_length": True, "seed": 5},
                                   schedule={"global_batch_size": 8, "micro_batch_size": 2, "steps": 3})}
            for name, train in sources.items()]
    run_jobs(2, jobs, str(tmp_path))
    histories = {}
    for name in sources:
        with open(tmp_path / f"{name}.json") as f:
            histories[name] = [{k: v for k, v in h.items() if k not in TIMING} for h in json.load(f)]
    assert len(histories["json"]) == 3 and "loss" in histories["json"][0]
    assert histories["prefix"] == histories["json"]  # bitwise: the same samples in the same micro-batches
