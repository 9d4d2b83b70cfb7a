"""Messages between the teacher's and the student's ranks: point-to-point over the launcher's world (world.bridge),
on the default backend (NCCL moves device tensors, gloo host tensors).

A wait that runs out (the group's timeout, parallel.timeout_s) is an error naming the peer's global rank and side:
the peer died or hangs, and its own log says why.
"""
from __future__ import annotations

import io
import zlib

import torch

INPUTS, ROWS = 1, 2  # tags: a student's micro-batches to the teacher, the teacher's rows back


class LinkError(RuntimeError):
    pass


def device(bridge) -> torch.device:
    if torch.distributed.get_backend(bridge) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Outbox:
    """Sends that do not wait for their receiver: a rank never blocks on a peer that is itself waiting on a third
    (a student in a gradient all-reduce with the student whose rows the teacher is sending). `drain` waits for
    them; a caller drains where the receivers are known to have taken them or to need nothing to take them."""

    def __init__(self, bridge):
        self.bridge, self.works = bridge, []

    def post(self, tensor: torch.Tensor, dst: int, tag: int) -> None:
        tensor = tensor.to(device(self.bridge)).contiguous()
        self.works.append((torch.distributed.isend(tensor, dst=dst, group=self.bridge, tag=tag), tensor, dst))

    def post_object(self, obj, dst: int, tag: int) -> None:
        """Anything torch.save writes (micro-batches, sample ids, a stop status): its length, then its bytes."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        payload = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        self.post(torch.tensor([payload.numel()], dtype=torch.int64), dst, tag)
        self.post(payload, dst, tag)

    def drain(self, what: str) -> None:
        works, self.works = self.works, []
        for work, _, dst in works:
            try:
                work.wait()
            except RuntimeError as e:
                raise LinkError(f"{what}: global rank {dst} did not take a message in time ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}): that rank died or hangs; see its "
                                f"log") from e


def recv(shape, dtype, src: int, bridge, tag: int, what: str) -> torch.Tensor:
    """A tensor of this shape and dtype from global rank `src` (on the CPU)."""
    out = torch.empty(shape, dtype=dtype, device=device(bridge))
    try:
        torch.distributed.recv(out, src=src, group=bridge, tag=tag)
    except RuntimeError as e:
        raise LinkError(f"{what}: nothing came from global rank {src} in time ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): that rank died or hangs; see its log") from e
    return out.cpu()


def recv_object(src: int, bridge, tag: int, what: str):
    size = int(recv((1,), torch.int64, src, bridge, tag, what))
    payload = recv((size,), torch.uint8, src, bridge, tag, what)
    return torch.load(io.BytesIO(payload.numpy().tobytes()), weights_only=False)  # our own ranks' messages


def ids_crc(ids: list) -> list[int]:
    """A 32-bit checksum per sample id (or location, for samples without one): what the rows are checked by."""
    return [zlib.crc32(str(i).encode()) for i in ids]


def gather_roles(role: dict, bridge) -> list[dict]:
    """Every rank's role (side, data-parallel and tensor-parallel place), in global rank order; every rank of the
    job calls this once."""
    roles = [None] * torch.distributed.get_world_size(bridge)
    torch.distributed.all_gather_object(roles, role, group=bridge)
    return roles
