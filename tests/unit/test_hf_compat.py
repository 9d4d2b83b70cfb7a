"""megamod's HF exports load in transformers 4.57 as well as the pinned 5.x, with no missing or unexpected keys and
the same logits (4.x ignores rope_parameters and wants vision_tower.vision_model.*; the exporter writes both right).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from megamod.convert.checkpoint import hf_to_megamod, megamod_to_hf
from megamod.models.llava import expand_image_tokens
from tests.helpers import REPO, tiny_llava, tiny_qwen2

COMPAT = os.path.join(REPO, ".venv", "compat-tf4")

CHECK = r"""
import json, sys, torch, transformers
from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2ForCausalLM
assert transformers.__version__.startswith("4.57"), transformers.__version__
out = {}
for name, path, ids, images in json.load(open(sys.argv[1])):
    cls = LlavaForConditionalGeneration if name == "llava" else Qwen2ForCausalLM
    model, info = cls.from_pretrained(path, output_loading_info=True)
    kwargs = {"pixel_values": torch.load(images)} if images else {}
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids]), **kwargs).logits
    torch.save(logits, path + "/logits-4.57.pt")
    out[name] = {k: sorted(v) for k, v in info.items() if k != "error_msgs"}
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.skipif(not os.path.isdir(COMPAT), reason="transformers 4.57 not installed in .venv/compat-tf4 "
                    "(`make setup` installs it)")
def test_exports_load_in_transformers_4_57(world1, tmp_path):
    qwen = tiny_qwen2(tmp_path / "qwen", tie_word_embeddings=True, vocab_size=256)
    llava = tiny_llava(tmp_path / "llava")
    jobs, refs = [], {}
    images = torch.randn(1, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    for name, hf, ids, pixel_values in (("qwen", qwen, list(range(3, 40)), None),
                                        ("llava", llava, expand_image_tokens([3, 250, 9, 10], 250, 16), images)):
        hf_to_megamod(str(tmp_path / name), str(tmp_path / f"{name}-mg"))
        megamod_to_hf(str(tmp_path / f"{name}-mg"), str(tmp_path / f"{name}-export"))
        with torch.no_grad():
            kwargs = {"pixel_values": pixel_values} if pixel_values is not None else {}
            refs[name] = hf(input_ids=torch.tensor([ids]), **kwargs).logits
        jobs.append([name, str(tmp_path / f"{name}-export"), ids,
                     str(tmp_path / "images.pt") if pixel_values is not None else None])
    json.dump(jobs, open(tmp_path / "jobs.json", "w"))
    env = {**os.environ, "PYTHONPATH": COMPAT}
    p = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path / "jobs.json"), str(tmp_path / "info.json")],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    info = json.load(open(tmp_path / "info.json"))
    for name, _, _, _ in jobs:
        assert info[name] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}, name
        logits = torch.load(tmp_path / f"{name}-export" / "logits-4.57.pt")
        assert (logits - refs[name]).abs().max().item() <= 1e-5, name
