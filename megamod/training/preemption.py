"""Stopping cleanly on a signal: a checkpoint at the step the signal interrupted, then a distinct exit status.

SLURM sends SIGUSR1 before the time limit (train.sbatch asks for it) and SIGTERM when it preempts, cancels or times
out a job; torchrun forwards SIGTERM (and any signal in TORCHELASTIC_SIGNALS_TO_HANDLE) to its workers. The handler
only sets a flag, so a second signal during the save changes nothing (and the save is atomic anyway: a kill leaves
the previous checkpoint as the newest complete one). At each step boundary the ranks agree with one all-reduce: a
signal that reached one rank stops them all at the same step. The trainer then saves and raises `Preempted`, a
SystemExit whose status, 75 (EX_TEMPFAIL, "try again"), tells a job script to requeue rather than fail.
"""
from __future__ import annotations

import logging
import signal

import torch

from megamod.distributed import collective_device

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75


class Preempted(SystemExit):
    """Uncaught, the process exits with EXIT_PREEMPTED (no traceback): the run stopped at a checkpoint. The stop
    signals are then ignored: the process is expected to end."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(EXIT_PREEMPTED)
        self.step, self.signal_name = step, signal_name

    def __str__(self) -> str:
        return f"stopped on {self.signal_name} at step {self.step}, checkpoint saved"


class StopOnSignal:
    """A context manager: while inside, the named signals set `self.received` instead of ending the process."""

    def __init__(self, names: list[str]):
        self.signals = [signal.Signals[n] for n in names]
        self.received: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            log.warning("%s received: stopping at the next step boundary, after a checkpoint", self.received)

    def __enter__(self) -> "StopOnSignal":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, previous in self._previous.items():
            # After a stop the process is ending, its checkpoint complete; a launcher may signal a rank that is still
            # exiting when a peer has gone (torchrun does at once), which would turn a clean stop into a kill. Python
            # resets its own handlers to the default action while the interpreter shuts down, not SIG_IGN.
            signal.signal(s, signal.SIG_IGN if isinstance(exc, Preempted) else previous)
        self._previous.clear()

    def agreed(self) -> str | None:
        """Collective: None on every rank, or on every rank the signal's name (as this rank knows it)."""
        if not self.signals:
            return None
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int64, device=collective_device())
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not int(flag):
            return None
        return self.received or "a signal to another rank"
