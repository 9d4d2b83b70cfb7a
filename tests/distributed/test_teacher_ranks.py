"""The teacher on its own ranks (teacher: {ckpt, ranks, parallel, send}) against the in-job online teacher.

Two launches as `megamod train` runs them (gloo): 4 ranks (teacher TP=2 + student DP=2 or TP=2, teacher PP=2 +
student DP=2) and 3 ranks (teacher TP=1 + student TP=2 or PP=2, and teacher TP=1 + student DP=2 for preference).
In each launch the in-job reference runs on as many ranks as the student has (the others wait), so that both runs'
student ranks are numbered alike. With `send: full` the student's loss and first-step gradients must equal the
in-job run's to 1e-6 (fp32): the teacher computes the same logits at another tensor-parallel width, which changes
only the order of its sums. A third launch: a teacher rank that stops answering ends the job with an error naming
it, within the link's timeout. A run resumed from its checkpoint trains bitwise as the run that never stopped.
"""
import json
import math
import os

import pytest
import torch

from tests.helpers import REPO, torchrun
from tests.training_setup import base_recipe

WORKER = os.path.join(REPO, "tests", "distributed", "teacher_ranks_worker.py")
STUDENTS = {"d2d": "student", "d2s": "sparse", "preference": "sparse"}
STEPS = 2


def _recipe(p, stage, out, teacher, **extra):
    return base_recipe(p["root"], stage, p[STUDENTS[stage]], out, teacher=teacher, schedule={"steps": STEPS},
                       optim={"distributed_optimizer": True}, **extra)


def _remote(p, tp, send="full", pp=1, **more):
    return {"ckpt": p["teacher"], "ranks": tp * pp, "parallel": {"tp": tp, "pp": pp}, "send": send, **more}


def _jobs(p, root, runs):
    """runs: name -> (stage, teacher (None: in-job), student layout, idle ranks)."""
    jobs = []
    for name, (stage, remote, layout, idle) in runs.items():
        recipe = _recipe(p, stage, str(root / name), remote or p["teacher"], parallel=layout)
        jobs.append({"recipe": recipe, "out": str(root / f"{name}.json"), "grads": str(root / f"{name}-grads"),
                     "idle": idle})
    return jobs


def _resume_jobs(p, root):
    """A d2s run of 4 steps with checkpoints at 2 and 4 (teacher TP=1, student DP=2, top-64 in bf16, as recipes
    send), and the same run resumed from a copy of it as a crash after step 2 left it."""
    def recipe(name):
        r = _recipe(p, "d2s", str(root / name), _remote(p, 1, "topk"), checkpoint={"every": 2, "keep": None})
        r["schedule"]["steps"] = 4
        return r

    return [{"recipe": recipe("resume-straight"), "out": str(root / "resume-straight.json")},
            {"recipe": recipe("resume-again"), "out": str(root / "resume-again.json"),
             "resume": [str(root / "resume-straight"), 2]}]


def _launch(nproc, jobs, root, tag):
    path = root / f"jobs-{tag}.json"
    path.write_text(json.dumps(jobs))
    return torchrun(nproc, [WORKER, str(path)])


@pytest.fixture(scope="module")
def runs(engine_setup, tmp_path_factory):
    from megamod.data.tokenizer import load_tokenizer

    p, root = engine_setup, tmp_path_factory.mktemp("teacher-ranks")
    vocab_size = load_tokenizer(os.path.join(p["root"], "data", "tokenizer")).vocab_size
    four = {  # teacher TP=2 (or PP=2) on ranks 0-1, student DP=2 on ranks 2-3
        "d2d-dp2": ("d2d", None, {}, 2), "d2d-dp2-ranks": ("d2d", _remote(p, 2), {}, None),
        "d2s-dp2": ("d2s", None, {}, 2), "d2s-dp2-ranks": ("d2s", _remote(p, 2), {}, None),
        "d2s-dp2-ranks-pp2": ("d2s", _remote(p, 1, pp=2), {}, None),  # teacher PP=2 on ranks 0-1
        # teacher TP=2 + student TP=2: each student rank's columns come from both teacher shards or one
        "d2s-tp2-idle2": ("d2s", None, {"tp": 2}, 2), "d2s-tp2-ranks-t2": ("d2s", _remote(p, 2), {"tp": 2}, None),
    }
    three = {  # teacher TP=1 on rank 0, student TP=2 (or DP=2) on ranks 1-2
        "d2s-tp2": ("d2s", None, {"tp": 2}, 1), "d2s-tp2-ranks": ("d2s", _remote(p, 1), {"tp": 2}, None),
        "d2s-tp2-topk": ("d2s", _remote(p, 1, "topk", topk=vocab_size, dtype="float32"), {"tp": 2}, None),
        "d2d-tp2": ("d2d", None, {"tp": 2}, 1), "d2d-tp2-ranks": ("d2d", _remote(p, 1), {"tp": 2}, None),
        "d2d-pp2": ("d2d", None, {"pp": 2}, 1), "d2d-pp2-ranks": ("d2d", _remote(p, 1), {"pp": 2}, None),
        "preference-dp2": ("preference", None, {}, 1),
        "preference-dp2-ranks": ("preference", _remote(p, 1, "topk"), {}, None),
    }
    _launch(4, _jobs(p, root, four), root, "four")
    _launch(3, _jobs(p, root, three) + _resume_jobs(p, root), root, "three")
    return root


def _history(root, name):
    return json.loads((root / f"{name}.json").read_text())


def _grads(root, name):
    folder = root / f"{name}-grads"
    return {f: torch.load(folder / f) for f in sorted(os.listdir(folder))}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


PAIRS = [("d2d-dp2-ranks", "d2d-dp2"), ("d2s-dp2-ranks", "d2s-dp2"), ("d2s-dp2-ranks-pp2", "d2s-dp2"),
         ("d2s-tp2-ranks-t2", "d2s-tp2-idle2"), ("d2s-tp2-ranks", "d2s-tp2"),
         ("d2d-tp2-ranks", "d2d-tp2"), ("d2d-pp2-ranks", "d2d-pp2"),
         ("preference-dp2-ranks", "preference-dp2")]


@pytest.mark.parametrize("name,reference", PAIRS)
def test_losses_and_gradients_equal_the_in_job_teacher(runs, name, reference):
    got, expected = _history(runs, name), _history(runs, reference)
    assert [h["step"] for h in got] == [h["step"] for h in expected] == list(range(1, STEPS + 1))
    for g, e in zip(got, expected):
        keys = [k for k in ("loss", "kd", "ce", "preference", "aux") if k in e]
        assert "kd" in keys or "preference" in keys  # the teacher's part of the loss is compared
        for k in keys:
            assert _rel(g[k], e[k]) <= 1e-6, (g["step"], k, g[k], e[k])
        assert _rel(g["grad_norm"], e["grad_norm"]) <= 1e-6, (g["step"], g["grad_norm"], e["grad_norm"])
        assert g["teacher_wait_s"] >= 0 and "teacher_wait_s" not in e
    grads, reference_grads = _grads(runs, name), _grads(runs, reference)
    assert grads.keys() == reference_grads.keys() and grads  # every student rank
    for rank, expected_grads in reference_grads.items():
        assert grads[rank].keys() == expected_grads.keys() and expected_grads
        diff = math.sqrt(sum(float((grads[rank][n] - g).double().norm()) ** 2 for n, g in expected_grads.items()))
        norm = math.sqrt(sum(float(g.double().norm()) ** 2 for g in expected_grads.values()))
        assert norm > 0 and diff / norm <= 1e-6, (rank, diff / norm)


def test_topk_of_the_whole_vocabulary_is_the_in_job_kd(runs):
    """send: topk with K = the vocabulary (fp32) goes through the cached top-k KD loss: the full distribution."""
    got, expected = _history(runs, "d2s-tp2-topk"), _history(runs, "d2s-tp2")
    for g, e in zip(got, expected):
        assert _rel(g["kd"], e["kd"]) <= 1e-5 and _rel(g["loss"], e["loss"]) <= 1e-5, (g, e)


def test_resume_restarts_the_teacher_from_the_students_sampler(runs):
    """Nothing of the teacher is checkpointed: the resumed student sends the samples of step 3 on, and trains them
    bitwise as the run that never stopped (which had sent step 3's before checkpointing step 2)."""
    straight, again = _history(runs, "resume-straight"), _history(runs, "resume-again")
    assert [h["step"] for h in again] == [3, 4]
    for h, r in zip(again, straight[2:]):
        assert {k: h[k] for k in ("loss", "kd", "ce", "aux", "grad_norm")} == \
            {k: r[k] for k in ("loss", "kd", "ce", "aux", "grad_norm")}, h["step"]


def test_teacher_reports_its_idle_time_and_bytes(runs, engine_setup):
    from megamod.data.tokenizer import load_tokenizer

    vocab_size = load_tokenizer(os.path.join(engine_setup["root"], "data", "tokenizer")).vocab_size
    report = json.loads((runs / "d2s-dp2-ranks" / "teacher_ranks.json").read_text())
    assert report["send"] == "full" and 0 <= report["idle_fraction"] <= 1
    assert [r["global_rank"] for r in report["ranks"]] == [0, 1]
    # full: every answer position's logits of the tokenizer's ids, fp32, to each of the student's DP ranks alone,
    # each teacher TP rank sending the ids of its own vocabulary shard (no rank gathers the whole vocabulary)
    assert report["bytes_per_answer_token"] == 4 * vocab_size
    assert all(r["bytes_sent"] > 0 for r in report["ranks"])
    assert sum(r["micro_batches"] for r in report["ranks"]) == 2 * STEPS * 2  # 2 teacher ranks x 2 micro x steps

    def step_flops(name):  # what a run's student ranks logged: tflops_per_rank is over the student's 2 ranks
        return sum(h["tflops_per_rank"] * 1e12 * h["step_s"] * 2 for h in _history(runs, name))

    # the teacher's forwards are counted where they ran: the in-job run's FLOPs less the split run's student's
    assert report["flops"] > 0 and report["tflops_per_rank"] > 0
    assert _rel(report["flops"], step_flops("d2s-dp2") - step_flops("d2s-dp2-ranks")) <= 1e-9


def test_a_teacher_that_hangs_ends_the_job_naming_it(engine_setup, tmp_path):
    p = engine_setup
    recipe = _recipe(p, "d2d", str(tmp_path / "run"), _remote(p, 1), parallel={"timeout_s": 20})
    recipe["schedule"]["steps"] = 3
    with pytest.raises(AssertionError) as failed:
        _launch(2, [{"recipe": recipe, "out": str(tmp_path / "h.json"), "hang_after": 1}], tmp_path, "hang")
    message = str(failed.value)
    assert "torchrun failed" in message  # ended, not timed out
    assert "nothing came from global rank 0 in time" in message and "died or hangs" in message, message[-3000:]


def test_a_signal_to_a_student_rank_stops_the_whole_job_and_the_rerun_finishes(engine_setup, tmp_path):
    """`megamod train` with teacher.ranks=1 + 2 student ranks, SIGTERM to one student rank after step 2: the student
    checkpoints its step and every rank, the teacher's too, exits 75 (a requeued SLURM job resumes); rerunning the
    same command resumes there, the teacher restarted from the student's sampler, and finishes."""
    import signal
    import sys

    from megamod.distributed import free_port
    from tests.faults import rank_pid, run_watched, wait_for_step
    from tests.training_setup import recipe

    p, steps = engine_setup, 30
    cfg = _recipe(p, "d2s", str(tmp_path / "run"), _remote(p, 1, "topk"), checkpoint={"every": 0, "keep": 1})
    cfg["schedule"]["steps"] = steps
    path = recipe(str(tmp_path / "d2s.yaml"), **cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "PYTHONFAULTHANDLER": "1"}
    metrics = str(tmp_path / "run" / "metrics.jsonl")

    def launch(during=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=3", f"--master-port={free_port()}",
               "-m", "megamod", "train", "--config", path]
        rc, out, survivors = run_watched(cmd, env, str(tmp_path / "torchrun.log"), timeout_s=300, cwd=REPO,
                                         during=during)
        assert not survivors, f"processes outlived the run: {survivors}\n{out[-4000:]}"
        return rc, out

    def sigterm_student(proc):
        wait_for_step(metrics, 2, proc)
        os.kill(rank_pid(proc.pid, 2), signal.SIGTERM)  # global rank 2: the student's rank 1

    rc, out = launch(sigterm_student)
    assert rc != 0 and out.count("exitcode  : 75") == 3, out[-3000:]  # teacher and both student ranks
    assert out.count("Traceback (most recent call last)") == 1, out[-3000:]  # torchrun's own report, no rank's
    with open(metrics) as f:
        stopped = [json.loads(line)["step"] for line in f][-1]
    assert 2 <= stopped < steps
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["latest", f"step_{stopped:07d}"]
    rc, out = launch()
    assert rc == 0, out[-3000:]
    with open(metrics) as f:
        trained = [json.loads(line)["step"] for line in f]
    assert trained == list(range(1, stopped + 1)) + list(range(stopped + 1, steps + 1))
    assert json.loads((tmp_path / "run" / "teacher_ranks.json").read_text())["send"] == "topk"
