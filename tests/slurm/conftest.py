import os

import pytest

from tests.slurm import cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node SLURM (munged, slurmctld, slurmd) on localhost for the whole session (tests/slurm/cluster.py)."""
    missing = cluster.missing_programs()
    if missing:
        pytest.skip(f"no SLURM here ({', '.join(missing)} not found): install Debian's slurm-wlm and munge, as .ci/run "
                    f"does, to run these tests")
    if os.geteuid() != 0:
        pytest.skip("the test SLURM runs its daemons as root (SlurmUser=root, munged's key): run the tests as root")
    c = cluster.Cluster(str(tmp_path_factory.mktemp("slurm"))).start()
    yield c
    c.stop()
