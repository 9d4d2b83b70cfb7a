"""Splits the world 2 + 2 several times in one launch, each side making its own groups in between (as megatron's
parallel state does), and writes every rank's name for its side's group per split to argv[1] (rank 0).

argv: output JSON path, then per split "t,s": how many groups the teacher's and the student's side make in it.
"""
import json
import sys

import torch


def main(path: str, extras: list[str]) -> int:
    from megamod import distributed
    from megamod import split_world as world

    distributed.start_process_group(60)
    seen = []
    for extra in extras:
        split = world.split(2, 60)
        name = torch.distributed.distributed_c10d._get_default_group().group_name
        for _ in range(int(extra.split(",")[0 if split.teacher else 1])):
            torch.distributed.new_group([0, 1])  # the side's ranks, numbered from 0
        total = torch.ones(1)
        torch.distributed.all_reduce(total)  # the side's group works
        assert int(total) == 2, total
        world.unsplit()
        names = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, [split.side, name])
        seen.append(names)
    if torch.distributed.get_rank() == 0:
        with open(path, "w") as f:
            json.dump(seen, f)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
