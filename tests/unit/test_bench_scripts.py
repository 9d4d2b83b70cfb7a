"""Each tools/bench benchmark runs at a tiny size on CPU and writes the JSON perf_report.py reads (no speed checks:
the numbers only have to be there and positive)."""
import importlib.util
import json
import math
import os

import pytest
import torch

from tests.helpers import REPO

BENCH = os.path.join(REPO, "tools", "bench")
# On a CUDA machine megamod runs megatron-core on the GPU only (cpu_compat refuses); tools/gpu_check.sh runs these.
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runs of the benchmarks need a machine without CUDA")


def bench(name, monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, args, monkeypatch, tmp_path, capsys) -> dict:
    path = tmp_path / f"{name}.json"
    bench(name, monkeypatch).main(["--device", "cpu", "--warmup", "1", "--repeats", "1", "--json", str(path), *args])
    assert capsys.readouterr().out.strip()  # the table was printed
    res = json.loads(path.read_text())
    assert res["benchmark"] == name and res["env"]["device_type"] == "cpu" and res["env"]["torch"] == torch.__version__
    assert res["rows"] and all(key in row for row in res["rows"] for key, _, _ in res["columns"])
    return res


def positive(row, *keys):
    return all(isinstance(row[k], float) and math.isfinite(row[k]) and row[k] > 0 for k in keys)


def test_permute(monkeypatch, tmp_path, capsys):
    res = run("permute", ["--shapes", "64x32x4x2", "--dtypes", "float32"], monkeypatch, tmp_path, capsys)
    (row,) = res["rows"]
    assert (row["T"], row["H"], row["E"], row["K"], row["dtype"]) == (64, 32, 4, 2, "float32")
    assert positive(row, "megatron_ms", "ours_ms", "speedup", "ours_GBps", "copy_GBps", "of_copy")


@cpu_only
def test_moe_layer(monkeypatch, tmp_path, capsys):
    res = run("moe_layer", ["--tokens", "32", "--hidden", "32", "--ffn", "48", "--experts", "4", "--topk", "2"],
              monkeypatch, tmp_path, capsys)
    assert [r["layer"] for r in res["rows"]] == ["megatron-core MoELayer", "megamod MoE layer",
                                                 "megamod MoE layer, grouped experts"]
    assert "max |layer - megatron| forward output: megamod 0, grouped 0" in res["notes"][0]  # fp32: bitwise
    for row in res["rows"]:
        assert positive(row, "forward_ms", "backward_ms", "total_ms", "speedup", "forward_tflops", "backward_tflops")
    assert res["config"]["tokens"] == 32 and not any("baseline" in n for n in res["notes"])  # not the proxy size


@cpu_only
def test_distill_step_with_the_performance_paths_off_and_on(monkeypatch, tmp_path, capsys):
    res = run("distill_step", ["--preset", "tiny", "--peak-tflops", "1", "--performance", "both"], monkeypatch,
              tmp_path, capsys)
    parts = [r["part"] for r in res["rows"]]
    assert len(parts) == 8 and all(p.startswith("[off] ") for p in parts[:4]) and \
        all(p.startswith("[auto] ") for p in parts[4:])
    assert set(res["config"]["performance_modes"]) == {"off", "auto"}
    assert "performance off: all paths off" in res["notes"] and any("off / auto" in n for n in res["notes"])


@cpu_only
def test_distill_step(monkeypatch, tmp_path, capsys):
    res = run("distill_step", ["--preset", "tiny", "--peak-tflops", "1"], monkeypatch, tmp_path, capsys)
    kd, student, teacher, both = res["rows"]
    for row in res["rows"]:
        assert positive(row, "step_ms", "tokens_per_s", "tflops", "mfu")
    assert both["step_ms"] == pytest.approx(student["step_ms"] + teacher["step_ms"])
    assert kd["kd_overhead"] == pytest.approx(kd["step_ms"] / both["step_ms"]) and student["kd_overhead"] is None
    c = res["config"]
    assert c["tokens_per_step"] == 64 and c["peak_tflops"] == 1
    assert c["peak_source"] == "given (--peak-tflops)" and c["trainable"] == ["projector", "ffn", "router"]
    # per token: the student's frozen vision tower (forward only) and trainable projector; the teacher forward only
    s, t = c["student_flops"], c["teacher_flops"]
    assert s["total"] == pytest.approx(sum(v for k, v in s.items() if k != "total")) and s["projector"] > 0
    assert t["vision"] == pytest.approx(s["vision"])  # the same tower, frozen in both
    flops = [r["tflops"] * r["step_ms"] / 1e3 * 1e12 for r in (kd, student, teacher)]
    assert flops == pytest.approx([64 * (s["total"] + t["total"]), 64 * s["total"], 64 * t["total"]])
    assert math.isfinite(c["d2s_loss"]) and c["d2s_loss"] > 0  # KD + CE of the last d2s step


@cpu_only
def test_attention(monkeypatch, tmp_path, capsys):
    res = run("attention", ["--batch", "2", "--seq", "16", "--heads", "4", "--groups", "2", "--head-dim", "8"],
              monkeypatch, tmp_path, capsys)
    assert [r["attention"] for r in res["rows"]] == ["megatron-core DotProductAttention", "megamod SDPA"]
    for row in res["rows"]:
        assert positive(row, "forward_ms", "backward_ms", "total_ms", "speedup", "tflops")
    diff = float(res["notes"][0].rsplit(" ", 1)[1])
    assert diff < 1e-5  # the two modules compute the same attention


def test_bad_sizes_are_refused(monkeypatch):
    permute = bench("permute", monkeypatch)
    with pytest.raises(SystemExit):
        permute.main(["--device", "cpu", "--shapes", "64x32x2x4"])  # top-4 of 2 experts
    with pytest.raises(SystemExit):
        bench("distill_step", monkeypatch).main(["--device", "cpu", "--preset", "tiny", "--topk", "5"])
