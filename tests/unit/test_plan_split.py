"""The planner for a teacher on its own ranks (megamod/planning/split.py): each side's memory from its parts, the
teacher's forward term against the in-job planner's, bytes on the wire, the pair's step, and errors that name the
recipe key."""
import os

import pytest

from tests.helpers import REPO

PLAN = os.path.join(REPO, "examples", "plan")


def _cfg(name):
    from megamod.planning.search import load_language_config

    return load_language_config(os.path.join(PLAN, f"{name}.yaml"))


def _tiny():
    from megamod.models.language import LanguageModelConfig

    teacher = LanguageModelConfig(vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4,
                                  num_query_groups=2, ffn_hidden_size=128)  # vocabulary padded to 1024
    student = LanguageModelConfig(vocab_size=1000, hidden_size=32, num_layers=4, num_attention_heads=4,
                                  num_query_groups=4, ffn_hidden_size=64, tie_word_embeddings=True, num_experts=4,
                                  moe_layer_pattern=[1, 0, 1, 0])
    return teacher, student


def _settings(**kw):
    from megamod.planning.split import Settings

    return Settings(**{**dict(seq=32, global_batch=8, topk=8, gpu_mem_gb=1.0), **kw})


def _teacher_params(stage, tp, pp, V=1024, h=64, L=4, n=4, g=2, d=16, F=128):
    """Parameters of the tiny teacher on one rank of `stage`, written out: per layer q/k/v with biases and o over
    TP, two norms, SwiGLU over TP; the embedding on the first stage, output layer and final norm on the last."""
    layer = (h * d * (n + 2 * g) + n * d * h + d * (n + 2 * g)) / tp + 2 * h + 3 * h * F / tp
    return L // pp * layer + (V * h / tp if stage == "first" else V * h / tp + h)


def test_each_sides_memory_is_the_sum_of_its_parts():
    """Teacher 8 ranks at TP=2, PP=2 (DP=2: 4 rows of the batch of 8 each), student on the other 4, top-8 in bf16:
    every kind written out by hand, and the totals their sums."""
    from megamod.planning.memory import step_memory
    from megamod.planning.split import plan_split

    teacher, student = _tiny()
    s = _settings()
    p = plan_split(teacher, student, 12, 8, s, teacher_tp=2, teacher_pp=2)
    t, st = p["teacher"], p["student"]
    assert (t["layout"].tp, t["layout"].pp, t["layout"].dp, t["rows"]) == (2, 2, 2, 4)
    tokens, per_token, V_tp = 32, 8 * (4 + 2) + 4, 1024 / 2
    last = {"weights": 2 * _teacher_params("last", 2, 2),
            "activations": tokens * (3 * 128 / 2 + 4 * 64) * 2 + tokens * V_tp * 2,  # a layer's work + logits
            "send": tokens * V_tp * 4 + 1 * 4 * 32 * per_token / 2,  # fp32 log-softmax + a step of rows / TP
            "buffers": 2 * tokens * 64 * 2}
    first = {"weights": 2 * _teacher_params("first", 2, 2), "activations": tokens * (3 * 128 / 2 + 4 * 64) * 2,
             "send": 0, "buffers": 2 * tokens * 64 * 2}
    assert sum(last.values()) > sum(first.values())  # the busiest stage is reported
    for k, v in last.items():
        assert t["memory"][k] == pytest.approx(v, rel=1e-12), k
    assert t["memory"]["total"] == pytest.approx(sum(last.values()), rel=1e-12)
    lay = st["layout"]
    assert (lay.tp, lay.pp, lay.dp, lay.world) == (1, 1, 4, 4)
    alone = step_memory(student, lay, "ffn")  # what the planner counts for the student without a teacher
    assert alone["teacher"] == 0
    recv = 2 * (8 // 4) * 32 * per_token  # this step's rows and the next one's, whole on each rank
    for k in ("weights", "gradients", "optimizer", "activations", "buffers"):
        assert st["memory"][k] == alone[k], k
    assert st["memory"]["recv"] == recv
    assert st["memory"]["total"] == pytest.approx(alone["total"] + recv, rel=1e-12)
    # full-vocabulary rows: the student's TP rank holds its shard of the teacher's padded vocabulary
    full = plan_split(teacher, student, 12, 8, _settings(send="full", send_bytes=4), teacher_tp=2, teacher_pp=2)
    assert full["student"]["memory"]["recv"] == 2 * 2 * 32 * 1024 * 4 / full["student"]["layout"].tp


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (2, 2), (1, 4)])
def test_the_teachers_forward_term_is_the_in_job_planners(tp, pp):
    """Where the two coincide (same TP/PP, micro-batch and sequence), the teacher's weights + forward activations
    equal the in-job planner's teacher term on each pipeline stage; with the CLIP tower too."""
    from megamod.models.vision import VisionConfig
    from megamod.planning import memory
    from megamod.planning.memory import Layout
    from megamod.planning.split import _teacher_stage_memory

    teacher, student = _tiny()
    lay = Layout(tp=tp, pp=pp, dp=1, mbs=2, seq=32, num_micro=4)
    for vision in (None, VisionConfig()):
        for stage in (("first", "last") if pp > 1 else ("first",)):
            in_job = memory._stage_memory(student, lay, "ffn", teacher, None, stage, vision)["teacher"]
            own = _teacher_stage_memory(teacher, lay, 8, _settings(), stage, vision)
            assert own["weights"] + own["activations"] == pytest.approx(in_job, rel=1e-12), (stage, vision)


def test_bytes_per_token_by_hand():
    from megamod.planning.split import send_bytes_per_token

    t110 = _cfg("qwen1.5-110b")
    assert t110.padded_vocab_size == 152064
    assert send_bytes_per_token(t110, "topk", 64, 2) == 64 * 4 + 64 * 2 + 4 == 388  # int32 ids, bf16, fp32 tail
    assert send_bytes_per_token(t110, "topk", 64, 4) == 64 * 4 + 64 * 4 + 4 == 516
    assert send_bytes_per_token(t110, "full", 64, 2) == 152064 * 2 == 304128
    assert send_bytes_per_token(t110, "full", 64, 4) == 152064 * 4


def test_transfer_and_the_pairs_step():
    """Bytes per step, per busiest sender and receiver, seconds at a named link, and max(sides) + transfer."""
    from megamod.planning.split import pair_step, pipeline_factor, plan_split

    x = pair_step(1.0, 0.25, 0.1)
    assert x["step"] == pytest.approx(1.1)
    assert x["teacher_idle"] == pytest.approx(0.1 / 1.1) and x["student_idle"] == pytest.approx(0.85 / 1.1)
    assert pair_step(0.2, 0.5, 0.0) == {"step": 0.5, "teacher_idle": pytest.approx(0.6), "student_idle": 0.0}
    teacher, student = _tiny()
    s = _settings(link_gbs=1e-6, response_tokens=20, peak_tflops=1e-3, mfu=0.5)  # 1 kB/s: seconds, not zeros
    p = plan_split(teacher, student, 12, 8, s, teacher_tp=2, teacher_pp=2)
    per_token = 8 * 6 + 4
    assert p["transfer"]["sent"] == 8 * 20 * per_token  # every row of the global batch once
    assert p["transfer"]["per_sender"] == 4 * 20 * per_token / 2  # a replica's 4 rows over its 2 last-stage ranks
    assert p["transfer"]["per_receiver"] == 2 * 20 * per_token  # a student DP rank's 2 rows
    assert p["transfer"]["seconds"] == pytest.approx(4 * 20 * per_token / 2 / 1e3)
    # the teacher's step: forward FLOPs of 4 rows over its 4 ranks, written out, at the peak x mfu, 4 micro-batches
    # through 2 stages
    h, q, kv, F, V, S = 64, 64, 32, 128, 1024, 32
    per_token_flops = 2 * (4 * (h * (q + 2 * kv) + q * h + 3 * h * F) + h * V)
    flops = (4 * S * per_token_flops + 4 * 4 * q * 4 * S * (S + 1) / 2) / 4
    assert p["teacher"]["flops"] == pytest.approx(flops, rel=1e-12)
    assert p["teacher"]["seconds"] == pytest.approx(flops / (1e-3 * 1e12 * 0.5) * 5 / 4, rel=1e-12)
    assert pipeline_factor(2, 4) == 5 / 4 and pipeline_factor(1, 3) == 1
    assert p["step"] == pytest.approx(max(p["teacher"]["seconds"], p["student"]["seconds"])
                                      + p["transfer"]["seconds"], rel=1e-12)


def test_impossible_inputs_name_the_key():
    from megamod.planning.split import best_split, plan_split

    teacher, student = _tiny()
    s = _settings()
    with pytest.raises(ValueError, match=r"teacher\.ranks=6 .*not divisible by teacher\.parallel\.tp x "
                                         r"teacher\.parallel\.pp = 2 x 2"):
        plan_split(teacher, student, 12, 6, s, teacher_tp=2, teacher_pp=2)
    with pytest.raises(ValueError, match=r"teacher\.ranks=12 .*leaves no GPU.*12 \(--gpus\)"):
        plan_split(teacher, student, 12, 12, s)
    with pytest.raises(ValueError, match=r"teacher\.ranks=13 "):
        plan_split(teacher, student, 12, 13, s)
    with pytest.raises(ValueError, match=r"teacher\.parallel .*num_query_groups 2 not divisible.* 4"):
        plan_split(teacher, student, 12, 8, s, teacher_tp=4)
    with pytest.raises(ValueError, match=r"teacher\.send"):
        plan_split(teacher, student, 12, 8, _settings(send="logits"))
    with pytest.raises(ValueError, match=r"teacher\.topk"):
        plan_split(teacher, student, 12, 8, _settings(topk=0))
    # 222 GB of bf16 weights cannot fit on two 80 GB GPUs at any layout
    with pytest.raises(ValueError, match=r"teacher\.ranks=2 .*fits at no layout of 2 ranks in 72 GB.* needs"):
        plan_split(_cfg("qwen1.5-110b"), _cfg("qwen1.5-1.8b-moe"), 16, 2, _settings(seq=2048, global_batch=128,
                                                                                    gpu_mem_gb=80))
    with pytest.raises(ValueError, match=r"teacher\.parallel .*num_query_groups 2 not divisible.* 4"):
        best_split(teacher, student, 12, s, teacher_tp=4)
    with pytest.raises(ValueError, match=r"--gpus 2: no split"):
        best_split(_cfg("qwen1.5-110b"), _cfg("qwen1.5-1.8b-moe"), 2, _settings(seq=2048, global_batch=128,
                                                                               gpu_mem_gb=80))


def test_the_110b_teacher_on_48_gpus_and_the_student_on_16():
    """The README's case: the 110B teacher at its best layout of 48 ranks, the 1.8B-MoE student at pure data
    parallelism on the other 16; the teacher is the slower side, so the student idles most of the step."""
    from megamod.planning.split import Settings, best_split, cached, in_job, plan_split

    teacher, student = _cfg("qwen1.5-110b"), _cfg("qwen1.5-1.8b-moe")
    topk, full = (plan_split(teacher, student, 64, 48, Settings(send=send)) for send in ("topk", "full"))
    for p in (topk, full):
        t, st = p["teacher"], p["student"]
        assert t["fits"] and st["fits"] and t["layout"].world == 48 and st["layout"].world == 16
        assert (st["layout"].tp, st["layout"].pp, st["layout"].dp) == (1, 1, 16)
        assert not {"gradients", "optimizer"} & set(t["memory"])  # forward only
        assert p["student_idle"] > 0.8
    assert full["transfer"]["sent"] / topk["transfer"]["sent"] == pytest.approx(304128 / 388)
    assert topk["transfer"]["sent"] == 128 * 2048 * 388
    assert full["step"] > topk["step"]
    best = best_split(teacher, student, 64)[0]
    assert best["step"] <= topk["step"]
    assert in_job(teacher, student, 64)["step"] > cached(teacher, student, 64)["step"]


def _run_cli(args):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["plan.py", "--teacher", os.path.join(PLAN, "qwen1.5-7b.yaml"), "--student",
                os.path.join(PLAN, "qwen1.5-1.8b-moe.yaml")] + args
    try:
        runpy.run_path(os.path.join(REPO, "tools", "plan.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
    return 0


def test_cli_prints_the_split_beside_in_job_and_cache(capsys):
    assert _run_cli(["--gpus", "16", "--teacher-ranks", "8,best", "--markdown"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| design | GPUs T+S | teacher tp/pp/dp |")
    designs = [line.split(" | ")[0][2:] for line in lines]
    for d in ("split, top-64", "split, full bf16", "best split, top-64", "best split, full bf16",
              "in job (online)", "offline cache (top-64)"):
        assert d in designs, d
    assert "989 TFLOP/s" in out and "50 GB/s" in out and "memory per GPU by kind" in out


def test_cli_names_the_key_of_an_impossible_split(capsys):
    assert _run_cli(["--gpus", "8", "--teacher-ranks", "9"]) == 2
    assert "teacher.ranks=9" in capsys.readouterr().err
    assert _run_cli(["--gpus", "8", "--teacher-ranks", "6", "--teacher-tp", "4", "--teacher-pp", "1"]) == 2
    assert "teacher.parallel.tp x teacher.parallel.pp = 4 x 1" in capsys.readouterr().err
