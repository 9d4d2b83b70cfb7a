"""tools/plan.py's model on real sizes: parameter counts against the published ones, and what fits where."""
import os

import pytest
import torch

from tests.helpers import REPO

PLAN = os.path.join(REPO, "examples", "plan")


def _cfg(name):
    from megamod.planning.search import load_language_config

    return load_language_config(os.path.join(PLAN, f"{name}.yaml"))


def test_parameter_counts_match_the_published_models():
    from megamod.planning.memory import Layout, param_counts

    total = lambda cfg: sum(param_counts(cfg, Layout(), "first").values())  # noqa: E731
    assert abs(total(_cfg("qwen1.5-7b")) / 7.72e9 - 1) < 0.01  # Qwen1.5-7B: 7.72B
    assert abs(total(_cfg("qwen1.5-110b")) / 111.2e9 - 1) < 0.01  # Qwen1.5-110B: 111.2B
    counts = param_counts(_cfg("qwen1.5-1.8b-moe"), Layout(ep=4), "first")
    assert counts["experts"] == 12 * 3 * 2048 * 5504  # 12 MoE layers, 4 experts over EP=4: one each


def test_a_110b_teacher_on_two_gpus_fits_only_as_a_cache():
    from megamod.planning.search import search

    student, teacher = _cfg("qwen1.5-1.8b-moe"), _cfg("qwen1.5-110b")
    online = search(student, teacher, gpus=2, gpu_mem_gb=80)
    cached = search(student, None, gpus=2, gpu_mem_gb=80, cached_topk=64)
    assert online and not any(r["fits"] for r in online)  # 222 GB of bf16 teacher weights over 2 x 80 GB
    assert cached[0]["fits"] and cached[0]["memory"]["teacher"] < 1e9
    assert all(r["flops"]["teacher"] == 0 for r in cached)
    # on 8 GPUs at TP=8 each rank holds an eighth of the teacher
    tp8 = [r for r in search(student, teacher, gpus=8, gpu_mem_gb=80, tp=8, pp=1)]
    assert tp8 and all(abs(r["memory"]["teacher"] / (111.2e9 * 2 / 8) - 1) < 0.1 for r in tp8)


def test_cli_prints_both_tables(capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["plan.py", "--teacher", os.path.join(PLAN, "qwen1.5-7b.yaml"), "--student",
                os.path.join(PLAN, "qwen1.5-1.8b-moe.yaml"), "--gpus", "8", "--rows", "2"]
    try:
        runpy.run_path(os.path.join(REPO, "tools", "plan.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "online teacher:" in out and "cached teacher (top-64):" in out and "TFLOP/rank" in out


def _student_teacher():
    from megamod.models.language import LanguageModelConfig

    student = LanguageModelConfig(vocab_size=151936, hidden_size=1024, num_layers=24, num_attention_heads=16,
                                  num_query_groups=16, ffn_hidden_size=2816, tie_word_embeddings=True, num_experts=4,
                                  moe_layer_pattern=[1, 0] * 12)
    return student, _cfg("qwen1.5-7b")


def test_activations_grow_linearly_with_the_sequence():
    """Attention runs through SDPA (models/attention.py): no [S, S] scores are kept, so every activation term,
    the logits and the unchunked losses' buffers included, is proportional to the tokens."""
    from megamod.planning.memory import Layout, step_memory

    student, teacher = _student_teacher()
    for t in (None, teacher):
        short, long = (step_memory(student, Layout(seq=s, loss_chunk_tokens=0), "ffn", t) for s in (1024, 4096))
        assert long["activations"] == 4 * short["activations"]


def test_the_clip_towers_count_once_per_model():
    from megamod.models.vision import VisionConfig
    from megamod.planning.memory import Layout, step_memory, vision_params

    assert abs(vision_params(VisionConfig()) / 303.5e6 - 1) < 0.005  # CLIP ViT-L/14-336: 303.5M (HF, no head)
    student, teacher = _student_teacher()
    without, with_ = (step_memory(student, Layout(), "ffn", teacher, vision=v) for v in (None, VisionConfig()))
    assert with_["total"] - without["total"] == 2 * 2 * vision_params(VisionConfig())  # two bf16 towers


def _peak_rss_above(fn) -> int:
    """Peak resident bytes of this process while fn runs, above its resident bytes before (Linux)."""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_the_kd_and_ce_buffers_per_logit_match_the_loss_code(world1):
    """The planner's bytes per student logit for an online d2s step with the reference losses (its logits, CE's fp32
    copy, the KD loss's eight fp32 temporaries, the teacher's logits) against the losses' own forward peak, at the real vocabulary. Each
    [S, V] fp32 tensor here is 39 MB: glibc maps it on its own and unmaps it when freed, so RSS follows them."""
    from megamod.losses.ce import cross_entropy_BS, masked_mean
    from megamod.losses.kd import kd_loss_BS
    from megamod.models.language import LanguageModelConfig
    from megamod.planning.memory import Layout, logit_bytes

    S, V = 64, 151936
    g = torch.Generator().manual_seed(0)
    student_BSV = torch.randn(1, S, V, generator=g).bfloat16().requires_grad_()
    teacher_BSV = torch.randn(1, S, V, generator=g).bfloat16()
    labels_BS, mask_BS = torch.randint(0, V, (1, S), generator=g), torch.ones(1, S)
    held = []

    def loss():
        held.append(masked_mean(cross_entropy_BS(student_BSV, labels_BS, V), mask_BS)
                    + masked_mean(kd_loss_BS(student_BSV, teacher_BSV, V), mask_BS))

    measured = _peak_rss_above(loss) + 2 * student_BSV.numel() * 2  # + both bf16 logits, made before
    cfg = LanguageModelConfig(vocab_size=V, hidden_size=8, num_layers=1, num_attention_heads=1, num_query_groups=1,
                              ffn_hidden_size=8)
    planned = sum(logit_bytes(cfg, Layout(seq=S, loss_chunk_tokens=0), cfg))  # kd.py + ce.py
    assert abs(planned / measured - 1) < 0.15, (planned, measured)
