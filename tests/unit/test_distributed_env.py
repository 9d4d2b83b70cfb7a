"""Launcher environment parsing: torchrun, SLURM (srun), and a plain process; layout validation."""
import pytest

from megamod.distributed import ParallelConfig, _first_host, read_launch_env


def test_torchrun_wins_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5", "SLURM_JOB_ID": "424242",
           "SLURM_JOB_NODELIST": "gpu[007-008,012],login1"}
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 5, "gpu007", "slurm")
    assert e.master_port == 20000 + 424242 % 10000  # same on every task, below the ephemeral port range
    assert read_launch_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "7"}).master_addr == "head"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a[1-4]", "a1"), ("x[09,11]", "x09"),
                                            ("h[003-005],g1", "h003"), ("c1,c2", "c1")])
def test_first_host(nodelist, first):
    assert _first_host(nodelist) == first


def test_slurm_without_master_is_an_error():
    with pytest.raises(RuntimeError, match="MASTER_ADDR or SLURM_JOB_NODELIST"):
        read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_plain_process_is_a_world_of_one():
    e = read_launch_env({})
    assert (e.rank, e.world_size, e.launcher) == (0, 1, "single") and e.master_port > 0


def test_layout_validation():
    ParallelConfig(tp=2, pp=2).validate(8)
    ParallelConfig(tp=2, ep=4).validate(8)
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        ParallelConfig(tp=4, pp=2).validate(4)
    with pytest.raises(ValueError, match="etp\\*ep\\*pp"):
        ParallelConfig(ep=3).validate(4)
    with pytest.raises(ValueError, match="parallel.tp must be >= 1"):
        ParallelConfig(tp=0).validate(4)
