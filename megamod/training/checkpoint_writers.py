"""megatron's checkpoint writers kept inside the trainer's life, and checkpoint files written in the background.

`bound_writers`: the processes megatron-core's dist-checkpointing forks to write files die with the trainer.

`BackgroundWriter`: megatron-core's `dist_checkpointing.save(..., async_sharded_save=True)` does the collective
planning and returns an AsyncRequest: a function that writes this rank's files, and finalize functions (collective:
the global metadata) to run once every rank has written. The write runs in a process forked from the trainer, so
that the files come from a copy-on-write snapshot of this moment's memory (on GPU, the request's preload first copies
the tensors to host memory; the training only waits for that copy). The checkpoint is published (manifest, rename
from its temporary folder, `latest`) only after every rank has finished: a crash during the write leaves the
previous checkpoint as the newest complete one. One write at a time: the next save, a stop and the end of training
wait for the pending one; at each step boundary `poll` publishes a finished write (one all-reduce while one is
pending).

megamod's own caller rather than megatron's AsyncCallsQueue, whose callers synchronise on `torch.cuda` and so need
a GPU: this one runs on CPU too, which is where the tests run it.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from typing import Callable

import torch

from megamod.distributed import collective_device

log = logging.getLogger(__name__)


# ---- megatron's writer processes --------------------------------------------------------------------------------
# dist_checkpointing.save writes its files from processes of its own: one forked writer per file, and a
# multiprocessing Manager (spawned on the first save, ~270 MB) that collects their results. Neither ends when a
# killed trainer does: the Manager lives on indefinitely, and a writer could go on writing into the checkpoint folder
# that the requeued run is writing again. `bound_writers` keeps both inside the trainer's life.
_bound = {"depth": 0, "parent": None, "main_thread_fork": False}
_PR_SET_PDEATHSIG = 1


def _before_fork() -> None:
    _bound["main_thread_fork"] = threading.current_thread() is threading.main_thread()
    _bound["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: only bind children of the main thread.
    if not (_bound["depth"] and _bound["main_thread_fork"] and sys.platform.startswith("linux")):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != _bound["parent"]:  # the parent died before the line above
        os._exit(1)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def bound_writers():
    """Within this block, megatron's checkpoint writers (forked from the main thread) die with this process, and
    their results travel through files (`_FileQueue`) instead of the Manager that megatron-core's
    `filesystem_async._get_write_results_queue` would start: from this process (synchronous saves) or from a
    background writer forked inside the block (BackgroundWriter keeps the block open until it has published)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # Another megatron-core may keep its results elsewhere: then only the writers are bound (the tests that look for
    # processes outliving a run say whether a Manager is back).
    swap = _bound["depth"] == 0 and hasattr(filesystem_async, "_results_queue")
    if swap:
        previous = filesystem_async._results_queue
        filesystem_async._results_queue = results = _FileQueue()
    _bound["depth"] += 1
    try:
        yield
    finally:
        _bound["depth"] -= 1
        if swap:
            filesystem_async._results_queue = previous
            results.close()


class _FileQueue:
    """The two queue methods megatron's filesystem writer uses (put in the writer, get_nowait in the finalize), over
    files in a private folder: shared by forked processes without a server process, and a put never blocks (a pipe
    would, once full, while the reader waits for the writer to end)."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="megamod-ckpt-results-")
        self._count = itertools.count()

    def put(self, item) -> None:
        name = f"{time.monotonic_ns():020d}-{os.getpid()}-{next(self._count)}"
        path = os.path.join(self.directory, name)
        with open(path + ".tmp", "wb") as f:
            pickle.dump(item, f)
        os.replace(path + ".tmp", path)

    def get_nowait(self):
        names = sorted(n for n in os.listdir(self.directory) if not n.endswith(".tmp"))
        if not names:
            raise queue.Empty
        path = os.path.join(self.directory, names[0])
        with open(path, "rb") as f:
            item = pickle.load(f)
        os.remove(path)
        return item

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _write(fn, args, kwargs) -> None:
    fn(*args, **kwargs)


class _Pending:
    def __init__(self, step, request, publish, process, bound, started):
        self.step, self.request, self.publish = step, request, publish
        self.process, self.bound, self.started = process, bound, started

    def locally_done(self) -> bool:
        return self.process is None or not self.process.is_alive()


class BackgroundWriter:
    """Writes one checkpoint at a time in a forked process. `start` is local; `poll` and `wait` are collective (every
    rank calls them at the same point)."""

    def __init__(self):
        self._pending: _Pending | None = None
        self.blocked_s = 0.0  # how long the last start kept training waiting (host staging and fork)

    @property
    def pending_step(self) -> int | None:
        return None if self._pending is None else self._pending.step

    def start(self, step: int, request, publish: Callable[[], None]) -> None:
        """Begin writing `request` (from dist_checkpointing.save(..., async_sharded_save=True)); once every rank is
        done, its finalize functions then `publish` run on every rank."""
        if self._pending is not None:
            raise RuntimeError(f"checkpoint of step {step}: the write of step {self._pending.step} is still pending")
        began = time.monotonic()
        # Kept open until the write is published: the writer's results travel through bound_writers' queue, and
        # its processes die with this one.
        bound = contextlib.ExitStack()
        bound.enter_context(bound_writers())
        process = None
        try:
            if request.async_fn is not None:
                args = list(request.async_fn_args)
                if request.preload_fn is not None and torch.cuda.is_available():
                    args[1] = request.preload_fn()  # device-to-host copies of this rank's write buckets, synchronised
                # On CPU the tensors already live in host memory: the fork's copy-on-write snapshot is the copy.
                process = mp.get_context("fork").Process(target=_write, name=f"megamod-checkpoint-{step}",
                                                         args=(request.async_fn, args, request.async_fn_kwargs))
                process.start()
        except BaseException:
            bound.close()
            raise
        self.blocked_s = time.monotonic() - began
        self._pending = _Pending(step, request, publish, process, bound, began)

    def poll(self) -> bool:
        """Collective: publish the pending write if every rank has finished it. True when nothing is pending."""
        if self._pending is None:
            return True
        done = torch.tensor([1 if self._pending.locally_done() else 0], dtype=torch.int64,
                            device=collective_device())
        torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        if not int(done):
            return False
        self._finish()
        return True

    def wait(self) -> None:
        """Collective: finish and publish the pending write, if any."""
        if self._pending is not None:
            if self._pending.process is not None:
                self._pending.process.join()
            self._finish()

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        try:
            process = pending.process
            if process is not None:
                process.join()
            status = 0 if process is None else process.exitcode
            failed = torch.tensor([0 if status == 0 else 1], dtype=torch.int64, device=collective_device())
            torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
            if int(failed):
                raise RuntimeError(
                    f"checkpoint of step {pending.step}: the background write failed "
                    f"({'this rank: exit status ' + str(status) if status else 'on another rank: see its log'}); "
                    f"the previous checkpoint stays the newest complete one")
            try:
                for fn in pending.request.finalize_fns:  # megatron's: collect write results, global metadata
                    fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # a file writer's error, reported by megatron's finalize (torch's
                # CheckpointException derives from BaseException)
                raise RuntimeError(f"checkpoint of step {pending.step}: the background write failed ({e}); the "
                                   f"previous checkpoint stays the newest complete one") from e
            pending.publish()
        finally:
            pending.bound.close()
        if torch.distributed.get_rank() == 0:
            log.info("checkpoint of step %d written in the background in %.1f s (training waited %.2f s for it)",
                     pending.step, time.monotonic() - pending.started, self.blocked_s)
