"""tools/plan.py's model on real sizes: parameter counts against the published ones, and what fits where."""
import os

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
