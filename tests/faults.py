"""Faults injected from outside the trainer, and runs checked for processes that outlive them.

`python tests/faults.py megamod-args...` (also as torchrun's script) is megamod's CLI with the fault that the JSON in
$MEGAMOD_TEST_FAULT names, on the rank it names:
  {"kill": "after_save", "step": 2, "rank": 0}    SIGKILL as soon as the checkpoint of `step` is complete
  {"kill": "during_write", "step": 2, "rank": 1}  a checkpoint writer of `step` SIGKILLs its trainer, then goes on
                                                  writing for a minute: it must die with the trainer
`run_watched` runs a command and reports every process it started that is still alive after it has ended.
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

FAULT_ENV = "MEGAMOD_TEST_FAULT"


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def _install(fault: dict) -> None:
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from megamod.training import checkpoint

    if _rank() != fault.get("rank", 0):
        return
    real_save, real_write = checkpoint.save, FileSystemWriterAsync.write_preloaded_data
    saving = {"step": None}
    trainer_pid = os.getpid()

    def save(root, step, *args, **kwargs):
        saving["step"] = step
        out = real_save(root, step, *args, **kwargs)
        if fault["kill"] == "after_save" and step == fault["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    def write(*args, **kwargs):
        # megatron-core 0.16 writes in processes forked by the trainer, 0.19 in threads of the trainer itself
        if fault["kill"] == "during_write" and saving["step"] == fault["step"]:
            os.kill(trainer_pid, signal.SIGKILL)
            time.sleep(60)
        return real_write(*args, **kwargs)

    checkpoint.save = save
    FileSystemWriterAsync.write_preloaded_data = staticmethod(write)


_PR_SET_CHILD_SUBREAPER = 36


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                out[int(name)] = (int(fields[1]), fields[0])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
    return out


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        return f"{pid} {cmdline[:200]}"
    except OSError:
        return str(pid)


def _descendants(roots: set[int]) -> dict[int, str]:
    """pid -> state of `roots` and every process below them."""
    procs = _processes()
    found, todo = {}, [r for r in roots if r in procs]
    while todo:
        pid = todo.pop()
        found[pid] = procs[pid][1]
        todo += [c for c, (parent, _) in procs.items() if parent == pid and c not in found]
    return found


def rank_pid(root: int, rank: int) -> int:
    """The pid of the worker of global rank `rank` below process `root` (torchrun's RANK or srun's SLURM_PROCID)."""
    for pid in _descendants({root}):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"RANK", env.get(b"SLURM_PROCID")) == str(rank).encode() and pid != root:
            return pid
    raise AssertionError(f"no worker of rank {rank} below {_describe(root)}")


def run_watched(cmd: list[str], env: dict, log_path: str, timeout_s: float, cwd: str | None = None,
                during=None) -> tuple[int, str, list[str]]:
    """Run `cmd`, output to `log_path` (a pipe would be held open by a survivor); `during(proc)` runs meanwhile.
    Returns (status, output, survivors): every process the command started, at any depth, still alive once it has
    ended (after a short grace: a parent-death signal is delivered asynchronously). Launchers put workers in
    sessions of their own and orphans go to init: while the command runs this process is a child subreaper, so
    that they come here instead. Survivors are then killed and reaped."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = {pid for pid, (parent, _) in _processes().items() if parent == os.getpid()}
    remaining: dict[int, str] = {}
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                if during is not None:
                    during(proc)
                rc = proc.wait(timeout=timeout_s)
            except BaseException:
                for pid in _descendants({proc.pid}):
                    _kill(pid)
                proc.wait()
                raise

        def left():
            mine = {pid for pid, (parent, _) in _processes().items() if parent == os.getpid()} - before
            return _descendants(mine)

        deadline = time.monotonic() + 5
        while any(state != "Z" for state in left().values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        remaining = left()
        survivors = [_describe(pid) for pid, state in remaining.items() if state != "Z"]
        for pid in remaining:
            _kill(pid)
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    for pid in remaining:  # orphans became this process's children: reap them
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    with open(log_path, errors="replace") as f:
        return rc, f.read(), survivors


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_step(metrics_path: str, step: int, proc, timeout_s: float = 300) -> None:
    """Until `metrics.jsonl` has logged `step` (or the process ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                if any(json.loads(line)["step"] >= step for line in f if line.strip()):
                    return
        time.sleep(0.1)
    raise AssertionError(f"{metrics_path}: step {step} was not logged (process status {proc.poll()})")


def main() -> int:
    fault = os.environ.get(FAULT_ENV)
    if fault:
        _install(json.loads(fault))
    from megamod.cli import main as cli

    return cli(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
