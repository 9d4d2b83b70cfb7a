"""tools/gpu_check.sh parses, and its dry run lists every step of the GPU tier in order without running any."""
import os
import subprocess

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")


def test_script_parses():
    result = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_lists_the_steps(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHON": "python-with-cuda"}, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = [line.split("] ", 1)[1].split(":", 1)[0] for line in result.stdout.splitlines() if line.startswith("== [")]
    assert steps[:4] == ["preflight", "imports", "build", "extension"]
    assert steps[4].startswith("tests (python-with-cuda -m pytest tests/gpu")
    assert steps[5:] == ["permute", "moe_layer", "distill_step", "attention", "report",
                         "(dry run) done; results in " + str(out)]
    for bench in ("permute", "moe_layer", "distill_step", "attention"):
        assert f"python-with-cuda tools/bench/{bench}.py --device cuda --json {out}/{bench}.json" in result.stdout
    assert "--append docs/PERF.md" in result.stdout and "setup.py build_ext --inplace" in result.stdout
    assert not out.exists()  # nothing ran, nothing was written


def test_unknown_argument_and_missing_wheels_are_errors(tmp_path):
    bad = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    missing = subprocess.run(["bash", SCRIPT, "--dry-run", "--wheels", str(tmp_path / "none")], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
