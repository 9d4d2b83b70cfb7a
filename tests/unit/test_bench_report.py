"""tools/bench/perf_report.py: benchmark JSON -> a dated docs/PERF.md section (device, versions, command, tables)."""
import importlib.util
import json
import os

import pytest

from tests.helpers import REPO

BENCH = os.path.join(REPO, "tools", "bench")


@pytest.fixture
def perf_report(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    spec = importlib.util.spec_from_file_location("perf_report", os.path.join(BENCH, "perf_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fabricated(benchmark="moe_layer", device="NVIDIA H100 80GB HBM3"):
    return {
        "benchmark": benchmark,
        "title": "MoE layer fwd+bwd, T=4096 H=4096",
        "env": {"device": device, "device_type": "cuda", "torch": "2.13.0", "cuda": "12.8", "megatron_core": "0.16.1",
                "python": "3.11.9", "threads": 16},
        "config": {"tokens": 4096},
        "columns": [["layer", "layer", ""], ["forward_ms", "fwd ms", ".2f"], ["mfu", "MFU", ".1%"]],
        "rows": [{"layer": "megatron-core MoELayer", "forward_ms": 5.123, "mfu": 0.4321},
                 {"layer": "megamod MoE layer", "forward_ms": 4.5, "mfu": None}],
        "notes": ["speed-up = megatron / ours"],
    }


def test_section_has_date_device_versions_command_and_table(perf_report):
    text = perf_report.section([fabricated()], "2026-11-22", "tools/gpu_check.sh", notes=["tests/gpu: 20 passed"])
    lines = text.splitlines()
    assert lines[0] == "## 2026-11-22: NVIDIA H100 80GB HBM3"
    assert "- torch 2.13.0, CUDA 12.8, megatron-core 0.16.1, Python 3.11.9; torch threads: 16" in lines
    assert "- command: `tools/gpu_check.sh`" in lines and "- tests/gpu: 20 passed" in lines
    assert "### moe_layer" in lines and "MoE layer fwd+bwd, T=4096 H=4096" in lines
    header = lines.index("| layer | fwd ms | MFU |")
    assert lines[header + 1] == "|---|---|---|"
    assert lines[header + 2] == "| megatron-core MoELayer | 5.12 | 43.2% |"
    assert lines[header + 3] == "| megamod MoE layer | 4.50 | n/a |"  # a missing figure reads n/a, not None
    assert "- speed-up = megatron / ours" in lines


def test_cpu_run_without_cuda_and_two_benchmarks(perf_report):
    cpu = fabricated("permute", device="Intel Xeon (2 CPU cores)")
    cpu["env"]["cuda"] = None
    text = perf_report.section([cpu, {**cpu, "benchmark": "distill_step"}], "2026-11-22", "make bench")
    assert text.startswith("## 2026-11-22: Intel Xeon (2 CPU cores)\n")
    assert "CUDA none" in text and text.count("- torch ") == 1  # one environment line for the same environment
    assert text.index("### permute") < text.index("### distill_step")


def test_cli_appends_a_section_and_saves_the_run(perf_report, tmp_path, capsys):
    perf = tmp_path / "PERF.md"
    perf.write_text("# Performance\n\nintro\n")
    result = tmp_path / "moe.json"
    result.write_text(json.dumps(fabricated()))
    run = tmp_path / "run.json"
    perf_report.main([str(result), "--append", str(perf), "--date", "2026-11-22", "--command", "make gpu-check",
                      "--save-json", str(run)])
    perf_report.main([str(result), "--append", str(perf), "--date", "2026-11-23"])
    text = perf.read_text()
    assert text.startswith("# Performance\n\nintro\n\n## 2026-11-22: NVIDIA H100")  # the header kept, one blank line
    assert text.index("## 2026-11-22") < text.index("## 2026-11-23") and text.count("| megamod MoE layer |") == 2
    saved = json.loads(run.read_text())
    assert saved["date"] == "2026-11-22" and saved["command"] == "make gpu-check"
    assert saved["results"][0]["rows"][1]["forward_ms"] == 4.5


def test_bad_inputs_are_clear_errors(perf_report, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=r"bad.json: not a tools/bench result \(missing \['benchmark'"):
        perf_report.load(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(fabricated()))
    with pytest.raises(FileNotFoundError, match="nowhere.md does not exist"):
        perf_report.main([str(good), "--append", str(tmp_path / "nowhere.md")])
    with pytest.raises(SystemExit, match="not YYYY-MM-DD"):
        perf_report.main([str(good), "--date", "22.11.2026"])
    with pytest.raises(ValueError, match="no benchmark results"):
        perf_report.section([], "2026-11-22", "make bench")
