"""Which samples each data-parallel rank sees, in which order, and how to resume exactly.

MixtureSampler draws from several sources (the datasets of a MixedDataset) with weights. An epoch has `epoch_size`
samples (default: all samples once); source i contributes round(epoch_size * w_i / sum w) of them (largest
remainder, so the counts add up exactly). Each source is read as an endless stream of seeded shuffles of itself, so
a source drawn less than its size per epoch still shows every sample before repeating one, and one drawn more
repeats whole passes. The epoch's draws are shuffled together (seed, epoch) and padded by wrapping to whole rounds of
n x b positions (n data-parallel ranks, b = block_size); rank r takes the blocks r, r + n, r + 2n, ... With b the
micro-batch size, every micro-batch holds the same samples whatever n is (micro-batch j of the single-process run
is micro-batch j // n of rank j % n), so per-micro-batch losses do not depend on the data-parallel layout. The ranks
of one epoch see every drawn sample exactly once (the few wrapped ones twice when the epoch does not divide).

Length grouping (`lengths` and `group_size`, the global batch): each window of `group_size` positions of the epoch's
order is sorted by length, longest first, so every micro-batch holds samples of similar length and pads little. A
step trains on the same samples as without it; only which of them share a micro-batch changes. Windows are cut from
the epoch's start on the global order, so the order stays independent of the data-parallel size.

The state is one number, `consumed`: positions of the global order already handed out (whole rounds).
StatefulLoader advances it per batch delivered to the caller, not per batch prefetched, so its `state_dict()` saved
with a checkpoint resumes on exactly the next sample, also at another data-parallel size. The state also records
what the order depends on (sizes, weights, seed, epoch size); loading it into a sampler that differs in any of
these is an error.
"""
from __future__ import annotations

import numpy as np
import torch

from megamod.data.datasets import BadSampleReport


def apportion(total: int, weights: list[float]) -> list[int]:
    """Integer counts summing to `total`, proportional to `weights` (largest remainder, ties to the first)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    for i in sorted(range(len(w)), key=lambda i: (-(quotas[i] - counts[i]), i))[:total - int(counts.sum())]:
        counts[i] += 1
    return counts.tolist()


class MixtureSampler(torch.utils.data.Sampler):
    def __init__(self, sizes: list[int], weights: list[float] | None = None, *, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, epoch_size: int | None = None, shuffle: bool = True, num_epochs: int | None = None,
                 block_size: int = 1, lengths=None, group_size: int | None = None):
        if not sizes or any(s < 0 for s in sizes):
            raise ValueError(f"sizes must be non-negative counts, got {sizes}")
        weights = list(sizes) if weights is None else list(weights)
        if len(weights) != len(sizes) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per source (not all zero), got {weights} for {sizes}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, {dp_size})")
        self.sizes, self.weights, self.seed, self.shuffle = list(sizes), weights, seed, shuffle
        self.dp_rank, self.dp_size, self.num_epochs = dp_rank, dp_size, num_epochs
        self.epoch_size = sum(sizes) if epoch_size is None else epoch_size
        self.counts = apportion(self.epoch_size, weights)
        empty = [i for i, (c, s) in enumerate(zip(self.counts, sizes)) if c and not s]
        if empty:
            raise ValueError(f"sources {empty} are empty but have weight")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        if (lengths is None) != (group_size is None):
            raise ValueError("length grouping needs both lengths (one per sample) and group_size")
        if group_size is not None:
            lengths = np.asarray(lengths, dtype=np.int64)
            if group_size < 1 or lengths.shape != (sum(sizes),):
                raise ValueError(f"length grouping needs group_size >= 1 (got {group_size}) and one length per "
                                 f"sample ({sum(sizes)}), got {lengths.shape[0]}")
        self.lengths, self.group_size = lengths, group_size
        self.epoch_length = self._epoch_length(dp_size)
        self.offsets = np.cumsum([0] + self.sizes)[:-1]
        self.consumed = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, source: int, epoch_pass: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.sizes[source])
        return np.random.default_rng([self.seed, source, epoch_pass]).permutation(self.sizes[source])

    def _draws(self, source: int, epoch: int) -> np.ndarray:
        """The source's stream positions [epoch * count, (epoch + 1) * count) as local indices."""
        count, size = self.counts[source], self.sizes[source]
        start, end = epoch * count, (epoch + 1) * count
        parts = [self._permutation(source, p)[max(start - p * size, 0):end - p * size]
                 for p in range(start // size, -(-end // size))] if count else []
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [epoch_length]: the global order of one epoch, all ranks together."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        order = np.concatenate([self.offsets[s] + self._draws(s, epoch) for s in range(len(self.sizes))])
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch, 2**31]).permutation(len(order))]
        order = np.concatenate([order, order[:self.epoch_length - len(order)]]).astype(np.int64)
        if self.group_size:
            for start in range(0, len(order), self.group_size):
                window = order[start:start + self.group_size]
                order[start:start + self.group_size] = window[np.argsort(-self.lengths[window], kind="stable")]
        self._cached = (epoch, order)
        return order

    def __len__(self) -> int:
        """Samples this rank sees per epoch."""
        return self.epoch_length // self.dp_size

    def _epoch_length(self, dp_size: int) -> int:
        """The epoch padded to whole rounds of one block per rank."""
        round_ = dp_size * self.block_size
        return -(-self.epoch_size // round_) * round_

    def __iter__(self):
        pos, round_ = self.consumed, self.dp_size * self.block_size
        while self.num_epochs is None or pos < self.num_epochs * self.epoch_length:
            epoch, k = divmod(pos, self.epoch_length)
            order = self.epoch_order(epoch)
            for start in range(k + self.dp_rank * self.block_size, self.epoch_length, round_):
                for i in order[start:start + self.block_size]:
                    yield int(i)
            pos = (epoch + 1) * self.epoch_length

    def _fingerprint(self) -> dict:
        return {"sizes": self.sizes, "weights": [float(w) for w in self.weights], "seed": self.seed,
                "epoch_size": self.epoch_size, "shuffle": self.shuffle, "group_size": self.group_size}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "dp_size": self.dp_size, "block_size": self.block_size,
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resumes on the next sample of the global order, also at another data-parallel size (the epochs' wrap
        padding is re-cut for the new size)."""
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            diff = {k: (saved[k], v) for k, v in self._fingerprint().items() if saved[k] != v}
            raise ValueError(f"sampler state is for another data order (saved vs now): {diff}")
        old_round = int(state.get("dp_size", self.dp_size)) * int(state.get("block_size", self.block_size))
        epoch, offset = divmod(int(state["consumed"]), -(-self.epoch_size // old_round) * old_round)
        if offset % (self.dp_size * self.block_size):
            raise ValueError(f"the saved position ({offset} samples into epoch {epoch}) does not split over "
                             f"dp_size {self.dp_size} x block_size {self.block_size}; resume with sizes that divide it")
        self.consumed = epoch * self.epoch_length + offset


class _BatchSampler:
    def __init__(self, sampler: MixtureSampler, micro_batch_size: int):
        self.sampler, self.micro_batch_size = sampler, micro_batch_size

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.micro_batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


class StatefulLoader:
    """A DataLoader over a MixtureSampler whose `state_dict()` is the position after the last batch handed out.
    Samples skipped on access (on_bad_sample="skip") are added to `report`."""

    def __init__(self, dataset, sampler: MixtureSampler, collator, micro_batch_size: int, num_workers: int = 0,
                 **dataloader_kwargs):
        self.dataset, self.sampler, self.collator = dataset, sampler, collator
        self.micro_batch_size, self.num_workers, self.kwargs = micro_batch_size, num_workers, dataloader_kwargs
        self.report = BadSampleReport(getattr(dataset, "report", ()))

    def __iter__(self):
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=_BatchSampler(self.sampler,
                                             self.micro_batch_size), collate_fn=self.collator,
                                             num_workers=self.num_workers, **self.kwargs)
        for batch in loader:
            self.sampler.consumed += batch.num_requested * self.sampler.dp_size
            for bad in batch.skipped:
                self.report.add(bad)
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
