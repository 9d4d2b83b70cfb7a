"""tools/gpu_check.sh parses, and its dry run lists every step of the GPU tier in order of value, with its timeout
and the output directory it was given, without running or writing anything."""
import os
import subprocess

from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")
ORDER = ["preflight", "wheels", "imports", "build", "extension", "device", "permute_tests", "permute", "distill_step",
         "moe_layer", "gpu_tests", "attention", "report"]


def dry_run(args, env=None):
    return subprocess.run(["bash", SCRIPT, "--dry-run", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHON": "python-with-cuda", **(env or {})}, timeout=60)


def steps(stdout):
    return [line.split("] ", 1)[1].split(" (timeout", 1)[0] for line in stdout.splitlines() if line.startswith("== [")]


def test_script_parses():
    result = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_dry_run_lists_the_steps_in_order(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "megatron_core-0.16.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    result = dry_run(["--out", str(out), "--wheels", str(wheels), "--budget", "540"])
    assert result.returncode == 0, result.stderr
    assert f"gpu_check: output directory {out}" in result.stdout.splitlines()[0]
    assert steps(result.stdout) == ORDER + ["(dry run) done; results in " + str(out)]
    for bench in ("device", "permute", "distill_step", "moe_layer", "attention"):
        assert f"python-with-cuda tools/bench/{bench}.py --device cuda --json {out}/{bench}.json" in result.stdout
    assert "pytest tests/gpu/test_permute_cuda.py" in result.stdout
    assert "pytest tests/gpu/test_moe_gpu.py tests/gpu/test_step_gpu.py" in result.stdout
    assert "--append docs/PERF.md" in result.stdout and "setup.py -q build_ext --inplace" in result.stdout
    assert "distill_step (timeout 360s)" in result.stdout and "--performance both" in result.stdout
    assert not out.exists()  # nothing ran, nothing was written


def test_output_directory_from_the_caller(tmp_path):
    # the device machine's caller sets OUT; GPU_CHECK_OUT wins over it; --out over both
    assert f"directory {tmp_path}/a" in dry_run([], {"OUT": f"{tmp_path}/a"}).stdout
    both = {"OUT": f"{tmp_path}/a", "GPU_CHECK_OUT": f"{tmp_path}/b"}
    assert f"directory {tmp_path}/b" in dry_run([], both).stdout
    assert f"directory {tmp_path}/c" in dry_run(["--out", f"{tmp_path}/c"], both).stdout


def test_bad_arguments_are_errors(tmp_path):
    bad = subprocess.run(["bash", SCRIPT, "--fast"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    missing = dry_run(["--wheels", str(tmp_path / "none")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    budget = dry_run(["--budget", "ten"])
    assert budget.returncode == 2 and "not a number of seconds" in budget.stderr
