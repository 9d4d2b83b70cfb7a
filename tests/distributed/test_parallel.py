"""Tensor / pipeline / expert parallelism on gloo against single-process references.

Two launches (2 and 4 ranks) run every check; the references are computed in the pytest process.
  - logits at TP=2, PP=2, TP=2 x PP=2 equal transformers' (fp32, <= 1e-4, argmax equal), for Qwen2 models and for
    a LLaVA model with two images
  - an upcycled (sparse) model's logits at EP=2 and TP=2 x EP=2 equal the dense model's
  - a training step (megatron DDP + Adam + pipeline schedule, 2 steps) at TP=2, PP=2, EP=2 and TP=2 x EP=2 (MoE)
    gives the losses, gradients and gradient norm of the single-process run (rtol 1e-5)
"""
import glob
import json
import os

import pytest
import torch

from megamod import checkpoint
from megamod.convert.checkpoint import hf_to_megamod
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import expand_image_tokens
from tests.helpers import grads_sharded_state_dict, run_jobs, tiny_llava, tiny_qwen2

LM_CONFIGS = {
    "untied-gqa-oddvocab": dict(tie_word_embeddings=False, num_key_value_heads=2, vocab_size=251),
    "tied-mha": dict(tie_word_embeddings=True, num_key_value_heads=4, vocab_size=256),
}
LOGIT_LAYOUTS = {2: [dict(tp=2), dict(pp=2)], 4: [dict(tp=2, pp=2)]}
TRAIN = {  # name -> (ranks, layout, model)
    "tp2": (2, dict(tp=2), "dense"),
    "pp2": (2, dict(pp=2), "dense-tied"),
    "ep2": (2, dict(ep=2), "moe"),
    "tp2ep2": (4, dict(tp=2, ep=2), "moe"),  # MoE under TP runs with sequence parallelism
}
MOE_LOGIT_LAYOUTS = {2: [dict(ep=2)], 4: [dict(tp=2, ep=2)]}
STEPS, MICRO_BATCHES, B, S, LR = 2, 4, 2, 16, 1e-3
INPUT_IDS = [3, 17, 5, 250, 0, 42, 7, 7, 7, 100, 200, 11, 64]
LLAVA_IDS = [3, 250, 17, 5, 250, 42, 7]  # 250 is <image>: two images


def _name(layout):
    return "-".join(f"{k}{v}" for k, v in layout.items())


def _batches(vocab_size):
    g = torch.Generator().manual_seed(7)
    steps = []
    for _ in range(STEPS):
        mbs = []
        for _ in range(MICRO_BATCHES):
            tokens = torch.randint(0, vocab_size, (B, S + 1), generator=g)
            loss_mask = (torch.rand(B, S, generator=g) > 0.3).float()
            mbs.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask})
        steps.append(mbs)
    return steps


def _reference_training(ckpt, batches):
    """Single process: every micro-batch of the global batch, in order."""
    from megamod.training.step import build_optimizer, lm_forward_step, train_step, wrap_ddp

    cfg = LanguageModelConfig.from_dict(checkpoint.read_metadata(ckpt)["model"])
    model = build_language_model(cfg, init_weights=False)
    checkpoint.load_model(model, ckpt)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer([ddp], lr=LR)
    losses, grad_norms, grads = [], [], {}

    def keep_grads():
        grads.update({k: v.data.clone() for k, v in grads_sharded_state_dict(model).items()})

    for step, mbs in enumerate(batches):
        result = train_step([ddp], optimizer, lm_forward_step(cfg.vocab_size), mbs, S, B,
                            before_optimizer_step=keep_grads if step == 0 else None)
        losses.append([float(d["lm loss"]) for d in result.losses])
        grad_norms.append(float(result.grad_norm))
    template = {k: v for k, v in grads_sharded_state_dict(model).items()}
    for sharded in template.values():
        sharded.data = torch.empty_like(sharded.data)
    return losses, grad_norms, grads, template


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megamod import distributed

    distributed.initialize()
    tmp = tmp_path_factory.mktemp("parallel")
    refs, jobs = {}, {2: [], 4: []}
    for name, overrides in LM_CONFIGS.items():
        hf = tiny_qwen2(tmp / f"hf-{name}", **overrides)
        hf_to_megamod(str(tmp / f"hf-{name}"), str(tmp / f"mg-{name}"))
        with torch.no_grad():
            refs[name] = hf(torch.tensor([INPUT_IDS])).logits[0]
        for nproc, layouts in LOGIT_LAYOUTS.items():
            for layout in layouts:
                jobs[nproc].append({"kind": "logits", "layout": layout, "ckpt": str(tmp / f"mg-{name}"),
                                    "input_ids": INPUT_IDS, "out": str(tmp / f"logits-{name}-{_name(layout)}.pt")})
    hf = tiny_llava(tmp / "hf-llava")
    hf_to_megamod(str(tmp / "hf-llava"), str(tmp / "mg-llava"))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.save(images, tmp / "images.pt")
    with torch.no_grad():
        refs["llava"] = hf(input_ids=torch.tensor([expand_image_tokens(LLAVA_IDS, 250, 16)]),
                           pixel_values=images).logits[0]
    for nproc, layouts in LOGIT_LAYOUTS.items():
        for layout in layouts:
            jobs[nproc].append({"kind": "logits", "layout": layout, "ckpt": str(tmp / "mg-llava"),
                                "input_ids": LLAVA_IDS, "images": str(tmp / "images.pt"),
                                "out": str(tmp / f"logits-llava-{_name(layout)}.pt")})
    # Training models: the two dense ones above, and a sparse one (experts on layers 0 and 2) saved from megamod.
    ckpts = {"dense": str(tmp / "mg-untied-gqa-oddvocab"), "dense-tied": str(tmp / "mg-tied-mha")}
    moe_cfg = LanguageModelConfig(vocab_size=251, hidden_size=64, num_layers=4, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=96, num_experts=4, moe_router_topk=2,
                                  moe_layer_pattern=[1, 0, 1, 0])
    torch.manual_seed(3)
    moe_model = build_language_model(moe_cfg)
    checkpoint.save_model(moe_model, str(tmp / "mg-moe"),
                          {"format": "megamod", "kind": "language", "model": moe_cfg.to_dict(), "dtype": "float32"})
    ckpts["moe"] = str(tmp / "mg-moe")
    from megamod.convert.upcycle import upcycle

    upcycle(ckpts["dense"], str(tmp / "mg-upcycled"), num_experts=4, topk=2)
    for nproc, layouts in MOE_LOGIT_LAYOUTS.items():
        for layout in layouts:
            jobs[nproc].append({"kind": "logits", "layout": layout, "ckpt": str(tmp / "mg-upcycled"),
                                "input_ids": INPUT_IDS, "out": str(tmp / f"logits-upcycled-{_name(layout)}.pt")})
    batches = _batches(251)
    torch.save(batches, tmp / "batches.pt")
    train_refs = {}
    for name, (nproc, layout, model) in TRAIN.items():
        train_refs[name] = _reference_training(ckpts[model], batches)
        os.makedirs(tmp / f"train-{name}")
        jobs[nproc].append({"kind": "train", "layout": layout, "ckpt": ckpts[model], "batches": str(tmp / "batches.pt"),
                        "steps": STEPS, "lr": LR, "out": str(tmp / f"train-{name}")})
    for nproc, job_list in jobs.items():
        run_jobs(nproc, job_list, str(tmp))
    return tmp, refs, train_refs


@pytest.mark.parametrize("layout", [l for ls in LOGIT_LAYOUTS.values() for l in ls], ids=_name)
@pytest.mark.parametrize("name", [*LM_CONFIGS, "llava"])
def test_logits_match_transformers(runs, name, layout):
    tmp, refs, _ = runs
    ours = torch.load(tmp / f"logits-{name}-{_name(layout)}.pt")
    ref = refs[name]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("layout", [l for ls in MOE_LOGIT_LAYOUTS.values() for l in ls], ids=_name)
def test_upcycled_logits_equal_dense(runs, layout):
    tmp, refs, _ = runs
    ours = torch.load(tmp / f"logits-upcycled-{_name(layout)}.pt")
    assert (ours - refs["untied-gqa-oddvocab"]).abs().max().item() <= 1e-4
    dense = torch.load(tmp / "logits-untied-gqa-oddvocab-tp2.pt")
    assert (ours - dense).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(TRAIN))
def test_training_step_matches_single_process(world1, runs, name):
    from megatron.core import dist_checkpointing

    tmp, _, train_refs = runs
    ref_losses, ref_grad_norms, ref_grads, template = train_refs[name]
    out = tmp / f"train-{name}"
    # losses: DP rank r ran micro-batches r, r+dp, ... of each step
    reports = [json.load(open(p)) for p in sorted(glob.glob(str(out / "losses-dp*.json")))]
    assert reports and len(reports) == reports[0]["dp"]
    for report in reports:
        dp, r = report["dp"], report["dp_rank"]
        for step in range(STEPS):
            expected = ref_losses[step][r::dp]
            assert report["losses"][step] == pytest.approx(expected, rel=1e-5), (step, r)
        # the clipped global norm covers every shard exactly once
        assert report["grad_norms"] == pytest.approx(ref_grad_norms, rel=1e-5)
    # gradients of step 1, assembled from all ranks by dist checkpointing into the unsharded layout
    loaded = dist_checkpointing.load(template, str(out / "grads"))
    assert sorted(loaded) == sorted(ref_grads)
    for key, ref in ref_grads.items():
        assert ref.abs().max() > 0, key  # every parameter receives gradient in this test
        torch.testing.assert_close(loaded[key], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=key)
