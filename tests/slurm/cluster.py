"""A one-node SLURM on localhost for tests: munged, slurmctld and slurmd started from a generated slurm.conf.

Everything (key, sockets, state, spool, logs) lives in one temporary folder and the daemons listen on free ports, so
several copies can run side by side on one machine without touching /etc. CPU only: no gres, no cgroups (the
daemons run in containers too). Clients find the cluster through SLURM_CONF in `Cluster.env`.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
# The node is this host, by name: jobs find their master through the node list, as on a real cluster.
NODE = socket.gethostname()


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _first_job_id() -> int:
    """A first job id whose jobs' master ports (megamod.distributed: SLURM_PORT_BASE + id % SLURM_PORT_SPAN) are free
    now: several test clusters on one machine would otherwise all start at job 1 and share ports."""
    from megamod.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN

    while True:
        first = random.randrange(1, SLURM_PORT_SPAN - 10)
        if all(_port_free(SLURM_PORT_BASE + first + i) for i in range(10)):
            return first


def _conf(d: str, cpus: int, memory_mb: int) -> str:
    host = NODE
    return f"""\
ClusterName=megamodtest
FirstJobId={_first_job_id()}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={d}/munge.socket,cred_expire=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
# the main scheduling pass starts a requeued job once its begin time has come (default every 60 s)
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# seconds between SIGTERM and SIGKILL when a job or step ends (default 30)
KillWait=5
MinJobAge=3600
SlurmdParameters=config_overrides
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, directory: str, cpus: int = 2, memory_mb: int = 4000):
        self.dir = directory
        self.conf = os.path.join(directory, "slurm.conf")
        # The environment of a user's shell: not the launch variables an in-process test's distributed.initialize
        # leaves in this process (sbatch exports the environment to the job, whose tasks would then all take this
        # process's MASTER_PORT, which its own process group holds).
        launch = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        self.env = {**{k: v for k, v in os.environ.items() if k not in launch}, "SLURM_CONF": self.conf}
        self._procs: list[subprocess.Popen] = []
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        with open(self.conf, "w") as f:
            f.write(_conf(directory, cpus, memory_mb))
        key = os.path.join(directory, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        os.chmod(directory, 0o700)  # munged refuses a key or socket in a folder others may write

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(os.path.join(self.dir, f"{name}.out"), "w")
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True))

    def start(self, timeout_s: float = 60) -> "Cluster":
        d = self.dir
        self._start("munged", ["munged", "--foreground", "--force", f"--key-file={d}/munge.key",
                               f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid",
                               f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        self._wait(lambda: os.path.exists(f"{d}/munge.socket"), timeout_s, "munged")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", self.conf])
        self._wait(self._node_idle, timeout_s, "slurmd to register as idle")
        return self

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], check=False).stdout.strip()
        return out == "idle"

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[0] for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SLURM test cluster: waiting for {what}: "
                                   f"{'exited: ' + ', '.join(dead) if dead else 'timed out'}\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        out = []
        for name in ("munged.out", "slurmctld.out", "slurmd.out", "munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-3000:]}")
        return "\n".join(out)

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} is {info['JobState']} after {timeout_s}s, not one of {states}:"
                                     f" {info}")
            time.sleep(0.5)

    def stop(self) -> None:
        self.run(["scancel", "--user", "root"], check=False)  # jobs first, so that slurmd reaps their steps
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self._procs.clear()


def job_processes(job_id: str) -> dict[int, dict]:
    """pid -> {"procid", "cmdline"} of every live process of a job (by SLURM_JOB_ID in its environment)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{name}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue
        if env.get(b"SLURM_JOB_ID") == job_id.encode():
            found[int(name)] = {"procid": env.get(b"SLURM_PROCID", b"").decode(), "cmdline": cmdline}
    return found
