"""megamod.data.sampler: sharding across data-parallel ranks, exact resume, mixture weights."""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megamod.data.sampler import MixtureSampler, StatefulLoader, apportion


class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def collate(items):
    return SimpleNamespace(items=list(items), num_requested=len(items), skipped=[])


def rank_samples(sizes, dp_size, epochs=1, **kw):
    return [list(MixtureSampler(sizes, dp_rank=r, dp_size=dp_size, num_epochs=epochs, **kw)) for r in range(dp_size)]


def test_two_ranks_see_every_sample_once_per_epoch():
    a, b = rank_samples([10, 8], 2, seed=3)
    assert len(MixtureSampler([10, 8], dp_size=2)) == 9
    assert len(a) == len(b) == 9 and not set(a) & set(b) and sorted(a + b) == list(range(18))
    # Epochs differ in order but each is complete.
    a2, b2 = rank_samples([10, 8], 2, epochs=2, seed=3)
    assert a2[:9] == a and sorted(a2[9:] + b2[9:]) == list(range(18)) and a2[9:] != a


def test_uneven_epoch_wraps_a_few_samples():
    ranks = rank_samples([7], 3, seed=1)
    assert [len(r) for r in ranks] == [3, 3, 3]
    seen = Counter(i for r in ranks for i in r)
    assert set(seen) == set(range(7)) and sum(seen.values()) == 9 and max(seen.values()) == 2


def test_seeded_and_shuffled():
    assert list(MixtureSampler([50], seed=1, num_epochs=1)) == list(MixtureSampler([50], seed=1, num_epochs=1))
    assert list(MixtureSampler([50], seed=1, num_epochs=1)) != list(MixtureSampler([50], seed=2, num_epochs=1))
    assert list(MixtureSampler([5, 5], shuffle=False, num_epochs=1)) == list(range(10))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_same_next_sample(num_workers):
    def loader():
        sampler = MixtureSampler([23, 17], [1.0, 2.0], seed=5, dp_rank=1, dp_size=2, epoch_size=30)
        return StatefulLoader(Indices(40), sampler, collate, micro_batch_size=4, num_workers=num_workers)

    first = loader()
    it = iter(first)
    for _ in range(6):  # 24 samples of this rank: past the first epoch's 15
        next(it)
    state = first.state_dict()
    assert state["consumed"] == 6 * 4 * 2
    expected = [next(it).items for _ in range(5)]
    del it
    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.items for b in _take(resumed, 5)] == expected
    # The same stream read straight through.
    assert [b.items for b in _take(loader(), 11)][6:] == expected


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out


def test_state_from_another_order_is_rejected():
    state = MixtureSampler([10], seed=1).state_dict()
    with pytest.raises(ValueError, match="another data order.*seed"):
        MixtureSampler([10], seed=2).load_state_dict(state)


def test_resume_at_another_data_parallel_size_continues_the_global_order():
    # dp=1 consumed 6 of epoch 0 (epoch 23 samples); dp=2 ranks then see exactly the rest of the global order
    # (epochs re-padded to 24 for two ranks).
    one = MixtureSampler([23], seed=3, num_epochs=2)
    order = list(one)
    one.consumed = 6
    rest = []
    ranks = [MixtureSampler([23], seed=3, dp_rank=r, dp_size=2, num_epochs=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    per_rank = [list(r) for r in ranks]
    rest = [i for pair in zip(*per_rank) for i in pair]
    assert rest[:17] == order[6:23]  # the rest of epoch 0, then epoch 1 starts in the same global order
    assert rest[18:18 + 23] == order[23:46]
    one.consumed = 5
    with pytest.raises(ValueError, match="does not split over dp_size 2"):
        ranks[0].load_state_dict(one.state_dict())


def test_apportion_is_exact():
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(2000, [3, 1]) == [1500, 500]
    assert sum(apportion(997, [0.2, 0.3, 0.5])) == 997


def test_mixture_weights_are_respected():
    sizes, weights = [100, 1000, 50], [0.5, 0.3, 0.2]
    sampler = MixtureSampler(sizes, weights, seed=0, epoch_size=2000, num_epochs=3)
    offsets = np.cumsum([0] + sizes)
    source = lambda i: int(np.searchsorted(offsets, i, side="right") - 1)  # noqa: E731
    drawn = list(sampler)
    for epoch in range(3):
        counts = Counter(source(i) for i in drawn[epoch * 2000:(epoch + 1) * 2000])
        assert [counts[s] for s in range(3)] == [1000, 600, 400]
    window = Counter(source(i) for i in drawn[:300])  # shuffled together: any stretch is near the weights
    for s, w in enumerate(weights):
        assert abs(window[s] / 300 - w) < 0.1
    # Source 0 (100 samples, 1000 draws per epoch) repeats whole passes: each sample 10 times per epoch.
    assert set(Counter(i for i in drawn[:2000] if source(i) == 0).values()) == {10}
    # Source 1 (1000 samples, 600 draws per epoch): no repeat within an epoch, all of it within two epochs.
    assert len({i for i in drawn[:2000] if source(i) == 1}) == 600
    two_epochs = Counter(i for i in drawn[:4000] if source(i) == 1)
    assert len(two_epochs) == 1000 and sorted(Counter(two_epochs.values()).items()) == [(1, 800), (2, 200)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="one non-negative weight per source"):
        MixtureSampler([10, 10], [1.0])
    with pytest.raises(ValueError, match="empty but have weight"):
        MixtureSampler([10, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="dp_rank 2"):
        MixtureSampler([10], dp_rank=2, dp_size=2)


def test_blocks_keep_micro_batches_whole_across_data_parallel_sizes():
    single = list(MixtureSampler([13], seed=4, block_size=2, num_epochs=1))
    ranks = [list(MixtureSampler([13], seed=4, dp_rank=r, dp_size=2, block_size=2, num_epochs=1)) for r in range(2)]
    micro = lambda xs: [xs[i:i + 2] for i in range(0, len(xs), 2)]  # noqa: E731
    # micro-batch j of one process is micro-batch j // 2 of rank j % 2 (epochs padded to 16 positions)
    assert micro(single)[:6] == [m for pair in zip(micro(ranks[0]), micro(ranks[1])) for m in pair][:6]
    assert len(single) == 14 and len(ranks[0]) == 8


def test_length_grouping_sorts_each_global_batch_and_keeps_its_samples():
    lengths = np.random.default_rng(0).integers(1, 500, size=40)
    kw = dict(seed=3, block_size=2, num_epochs=1)
    plain = list(MixtureSampler([40], **kw))
    grouped = list(MixtureSampler([40], lengths=lengths, group_size=8, **kw))
    for start in range(0, 40, 8):  # same samples per step, longest first within it
        window = grouped[start:start + 8]
        assert sorted(window) == sorted(plain[start:start + 8])
        assert list(lengths[window]) == sorted(lengths[window], reverse=True)
    pad = lambda xs: sum(2 * max(lengths[xs[i:i + 2]]) for i in range(0, 40, 2))  # noqa: E731
    assert pad(grouped) < pad(plain)
    # two data-parallel ranks: micro-batch j of one process is micro-batch j // 2 of rank j % 2, as without grouping
    ranks = [list(MixtureSampler([40], dp_rank=r, dp_size=2, lengths=lengths, group_size=8, **kw)) for r in range(2)]
    micro = lambda xs: [xs[i:i + 2] for i in range(0, len(xs), 2)]  # noqa: E731
    assert micro(grouped) == [m for pair in zip(micro(ranks[0]), micro(ranks[1])) for m in pair]


def test_length_grouping_is_part_of_the_resumable_state():
    lengths = np.arange(10)
    grouped = MixtureSampler([10], lengths=lengths, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        MixtureSampler([10]).load_state_dict(grouped.state_dict())
    MixtureSampler([10], lengths=lengths, group_size=4).load_state_dict(grouped.state_dict())
    with pytest.raises(ValueError, match="one length per sample"):
        MixtureSampler([10], lengths=lengths[:9], group_size=4)
    with pytest.raises(ValueError, match="both lengths"):
        MixtureSampler([10], lengths=lengths)
