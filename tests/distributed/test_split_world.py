"""Splitting the launcher's world more than once in the same processes (split_world.py).

torch names each new group by a per-process counter and keeps the group's rendezvous keys under that name. After a
split the two sides make different numbers of groups, so without care the next split names one group differently
on its ranks, or reuses a name whose keys another group's ranks left: ranks connect to the wrong peers and hang.
"""
import json
import os

from tests.helpers import REPO, torchrun

WORKER = os.path.join(REPO, "tests", "distributed", "split_world_worker.py")


def test_every_split_names_its_groups_alike_and_anew(tmp_path):
    out = tmp_path / "names.json"
    # the teacher's side makes one group more than the student's: unagreed, the next split would give the teacher's
    # group the name of the student's; then the student's side makes five more
    torchrun(4, [WORKER, str(out), "1,0", "0,5", "0,0"], timeout_s=120)
    seen = json.loads(out.read_text())
    assert len(seen) == 3
    names = []
    for ranks in seen:
        assert [side for side, _ in ranks] == ["teacher", "teacher", "student", "student"]
        assert ranks[0][1] == ranks[1][1] and ranks[2][1] == ranks[3][1], ranks  # a group's ranks name it alike
        names += [ranks[0][1], ranks[2][1]]
    assert len(set(names)) == len(names), names  # no name made twice
