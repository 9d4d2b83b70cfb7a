"""HF Qwen2 <-> megamod conversion: bitwise round trip, logits parity at TP=1, clear errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from megamod import checkpoint
from megamod.convert.hf_io import HFReader
from megamod.convert.checkpoint import hf_to_megamod, megamod_to_hf
from megamod.models.language import build_language_model
from tests.helpers import REPO, tiny_qwen2

CONFIGS = {
    "untied-gqa-oddvocab": dict(tie_word_embeddings=False, num_key_value_heads=2, vocab_size=251),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4, vocab_size=256),
    "tied-gqa-1kv": dict(tie_word_embeddings=True, num_key_value_heads=1, vocab_size=300, num_hidden_layers=2),
}


def _all_tensors(hf_dir):
    reader = HFReader(hf_dir)
    out = {n: reader.get(n) for n in reader.names()}
    reader.close()
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_bitwise(world1, tmp_path, name):
    tiny_qwen2(tmp_path / "hf", **CONFIGS[name])
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    megamod_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf2"))
    a, b = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_round_trip_sharded_and_bf16(world1, tmp_path):
    model = tiny_qwen2(tmp_path / "hf0", **CONFIGS["untied-gqa-oddvocab"])
    model.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    assert checkpoint.read_metadata(str(tmp_path / "mg"))["dtype"] == "bfloat16"
    megamod_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf2"), shard_bytes=50_000)
    assert os.path.exists(tmp_path / "hf2" / "model.safetensors.index.json")
    a, b = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "hf2")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_tp1(world1, tmp_path, name):
    from megamod.inference import forward_logits

    hf = tiny_qwen2(tmp_path / "hf", **CONFIGS[name])
    cfg = hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    assert cfg.padded_vocab_size % 128 == 0 and cfg.padded_vocab_size >= cfg.vocab_size
    model = build_language_model(cfg, init_weights=False)
    checkpoint.load_model(model, str(tmp_path / "mg"))
    ids = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    ours = forward_logits(model, ids, cfg.vocab_size)
    with torch.no_grad():
        ref = hf(ids).logits
    assert ours.shape == ref.shape == (2, 19, cfg.vocab_size)
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_hf_export_loads_in_transformers(world1, tmp_path):
    from transformers import Qwen2ForCausalLM

    hf = tiny_qwen2(tmp_path / "hf", **CONFIGS["tied-mha"])
    hf_to_megamod(str(tmp_path / "hf"), str(tmp_path / "mg"))
    megamod_to_hf(str(tmp_path / "mg"), str(tmp_path / "hf2"))
    config = json.load(open(tmp_path / "hf2" / "config.json"))
    assert config["rope_theta"] == 1e6  # top level, read by transformers 4.x
    reloaded, info = Qwen2ForCausalLM.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(20)[None] % 256
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


def _rewrite(src, dst, edit):
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())


def test_errors_name_the_tensors(world1, tmp_path):
    tiny_qwen2(tmp_path / "hf", **CONFIGS["untied-gqa-oddvocab"])
    _rewrite(tmp_path / "hf", tmp_path / "missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        hf_to_megamod(str(tmp_path / "missing"), str(tmp_path / "o1"))
    _rewrite(tmp_path / "hf", tmp_path / "extra", lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors.*model\.layers\.0\.extra\.weight"):
        hf_to_megamod(str(tmp_path / "extra"), str(tmp_path / "o2"))
    _rewrite(tmp_path / "hf", tmp_path / "shape",
             lambda t: t.update({"model.layers.2.mlp.down_proj.weight": torch.ones(64, 95)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj\.weight.*shape"):
        hf_to_megamod(str(tmp_path / "shape"), str(tmp_path / "o3"))
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    os.makedirs(tmp_path / "llama")
    json.dump(cfg, open(tmp_path / "llama" / "config.json", "w"))
    os.link(tmp_path / "hf" / "model.safetensors", tmp_path / "llama" / "model.safetensors")
    with pytest.raises(ValueError, match=r"unsupported architecture 'LlamaForCausalLM'.*Qwen2ForCausalLM"):
        hf_to_megamod(str(tmp_path / "llama"), str(tmp_path / "o4"))
    with pytest.raises(FileNotFoundError, match="megamod.json"):
        megamod_to_hf(str(tmp_path / "o1"), str(tmp_path / "o5"))


def test_command_line_tools(tmp_path):
    """tools/convert_hf.py and `python -m megamod logits` as a user runs them (fresh processes)."""
    hf = tiny_qwen2(tmp_path / "hf", **CONFIGS["untied-gqa-oddvocab"])
    env = {**os.environ, "PYTHONPATH": REPO}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=tmp_path, env=env, capture_output=True, text=True)
    p = run(os.path.join(REPO, "tools", "convert_hf.py"), "hf-to-megamod", "--hf-dir", "hf", "--out", "mg")
    assert p.returncode == 0, p.stderr[-3000:]
    ids = [3, 17, 5, 250, 0, 42]
    p = run("-m", "megamod", "logits", "--ckpt", "mg", "--input-ids", ",".join(map(str, ids)), "--out", "l.pt")
    assert p.returncode == 0, p.stderr[-3000:]
    logits_SV = torch.load(tmp_path / "l.pt")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert logits_SV.shape == (len(ids), 251)
    assert (logits_SV - ref).abs().max().item() <= 1e-4
    p = run("-m", "megamod", "logits", "--ckpt", "mg", "--input-ids", "3,251", "--out", "bad.pt")
    assert p.returncode != 0 and "outside the vocabulary" in p.stderr


def test_config_reads_both_rope_layouts_and_refuses_unsupported():
    from megamod.families.qwen2_hf import config_from_hf

    base = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864)
    assert config_from_hf({**base, "rope_theta": 1e6}).rope_theta == 1e6  # transformers 4.x layout
    assert config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}).rope_theta == 5e5
    cfg = config_from_hf(base)
    assert cfg.head_dim == 64 and cfg.padded_vocab_size == 151936 and cfg.num_query_groups == 2
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf({**base, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn"}})
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf({**base, "use_sliding_window": True})
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 4"):
        cfg.validate(tp=4)  # 2 key/value groups cannot split over 4 ranks
