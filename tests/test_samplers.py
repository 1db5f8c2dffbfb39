"""Tests of the batch samplers: DLB (`LastBatchSampler`), BAKE and CS-KD (`ClassGroupBatchSampler`), DDGSD
(`ViewsBatchSampler` over `EpochBatchSampler`)."""
from collections import defaultdict

import numpy as np
import pytest
from torch.utils.data import DistributedSampler, SequentialSampler

from timm_selfkd.components.samplers import ClassGroupBatchSampler, EpochBatchSampler, LastBatchSampler, ViewsBatchSampler


# ---------------------------------------------------------------------------------------------------------------------
# LastBatchSampler
# ---------------------------------------------------------------------------------------------------------------------

def dist_sampler(n, num_replicas=1, rank=0, seed=0):
    """A shuffling DistributedSampler over a dataset of length n (no process group needed)."""
    return DistributedSampler(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)


def walk_stream(batches, half, carry=None):
    """Check the DLB structure of consecutive batches; return (new indices in order, last new part).

    Batch t must start with the new part of batch t-1; the rest of it is new. The first batch of a fresh
    stream (`carry is None`) is two full new halves.
    """
    new_indices = []
    for batch in batches:
        if carry is None:
            assert len(batch) == 2 * half, 'the first batch of a stream must be two new halves'
            new, carry = list(batch), list(batch[half:])
        else:
            assert list(batch[:len(carry)]) == carry, 'batch does not repeat the previous new part'
            new = list(batch[len(carry):])
            assert 0 < len(new) <= half
            carry = new
        new_indices.extend(new)
    return new_indices, carry


def epoch_order(n, epoch, **kwargs):
    """The order the wrapped DistributedSampler gives for `epoch`."""
    sampler = dist_sampler(n, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_last_batch_sequential_literal():
    """Hand-written stream for N=10, B=4: halves [0,1] [2,3] ... and the epoch boundary repeats [8,9]."""
    sampler = LastBatchSampler(SequentialSampler(range(10)), 4)
    assert len(sampler) == 4
    assert list(sampler) == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert len(sampler) == 5
    assert list(sampler) == [[8, 9, 0, 1], [0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]


@pytest.mark.parametrize('n,batch_size', [(24, 8), (22, 8), (23, 6), (9, 2), (8, 8)])
def test_last_batch_stream_invariants_over_epochs(n, batch_size):
    """Each batch repeats the previous new part; every index is new exactly once per epoch, in the wrapped order.

    Includes N not a multiple of B/2 (short last half) and the epoch boundary, where the first batch of
    epoch e+1 repeats the last new part of epoch e. len() equals the batches actually yielded.
    """
    half = batch_size // 2
    sampler = LastBatchSampler(dist_sampler(n), batch_size)
    carry = None
    for epoch in range(3):
        expected_len = len(sampler)
        batches = list(sampler)
        assert len(batches) == expected_len
        if carry is not None:
            assert batches[0][:len(carry)] == carry
        new_indices, last = walk_stream(batches, half, carry)
        assert new_indices == epoch_order(n, epoch), f'epoch {epoch}: new indices are not the epoch order'
        assert sorted(new_indices) == list(range(n))
        assert len(last) == (n % half or half)
        carry = last


@pytest.mark.parametrize('make', [dist_sampler, lambda n: SequentialSampler(range(n))], ids=['distributed', 'sequential'])
def test_last_batch_set_epoch_each_epoch_keeps_stream(make):
    """A loop that calls set_epoch(e) before each epoch (as timm's does) gets the same continuous stream.

    Also for a wrapped sampler without set_epoch, whose carried half cannot be replayed and must be kept.
    """
    auto = LastBatchSampler(make(22), 8)
    looped = LastBatchSampler(make(22), 8)
    for epoch in range(3):
        looped.set_epoch(epoch)
        assert list(looped) == list(auto)


@pytest.mark.parametrize('batch_size', [1, 3, 7])
def test_last_batch_odd_batch_size_raises(batch_size):
    """B must be even (half repeated, half new)."""
    with pytest.raises(ValueError):
        LastBatchSampler(SequentialSampler(range(20)), batch_size)


def test_last_batch_batch_larger_than_data_raises():
    """A batch larger than the data a process sees cannot hold two halves."""
    with pytest.raises(ValueError):
        LastBatchSampler(SequentialSampler(range(5)), 8)
    with pytest.raises(ValueError):  # 10 images split over 2 ranks: 5 per rank
        LastBatchSampler(dist_sampler(10, num_replicas=2, rank=0), 8)


@pytest.mark.parametrize('n', [40, 44])
def test_last_batch_ranks_are_disjoint(n):
    """With DistributedSampler over 2 ranks, the new indices of the ranks are disjoint and cover the dataset."""
    samplers = [LastBatchSampler(dist_sampler(n, num_replicas=2, rank=rank), 8) for rank in range(2)]
    carries = [None, None]
    for _ in range(2):
        news = []
        for rank, sampler in enumerate(samplers):
            new_indices, carries[rank] = walk_stream(list(sampler), 4, carries[rank])
            assert len(new_indices) == len(set(new_indices)) == n // 2
            news.append(set(new_indices))
        assert not news[0] & news[1]
        assert news[0] | news[1] == set(range(n))


@pytest.mark.parametrize('n,batch_size', [(24, 8), (22, 8), (23, 6)])
@pytest.mark.parametrize('resume_epoch', [1, 2])
def test_last_batch_resume_replays_exact_epoch(n, batch_size, resume_epoch):
    """A new sampler over a fresh DistributedSampler, set_epoch(e), yields exactly the original epoch e (--resume)."""
    original = LastBatchSampler(dist_sampler(n, seed=7), batch_size)
    per_epoch = [list(original) for _ in range(resume_epoch + 1)]

    resumed = LastBatchSampler(dist_sampler(n, seed=7), batch_size)
    resumed.set_epoch(resume_epoch)
    assert len(resumed) == len(per_epoch[resume_epoch])
    assert list(resumed) == per_epoch[resume_epoch]
    # ... and continues identically afterwards.
    assert list(resumed) == list(original)


def test_last_batch_different_seeds_differ():
    """The seed of the wrapped sampler changes the order (sanity check that the stream is shuffled)."""
    a = list(LastBatchSampler(dist_sampler(40, seed=0), 8))
    b = list(LastBatchSampler(dist_sampler(40, seed=1), 8))
    assert a != b


# ---------------------------------------------------------------------------------------------------------------------
# ClassGroupBatchSampler
# ---------------------------------------------------------------------------------------------------------------------

def make_labels(seed=0):
    """Shuffled labels of 8 classes with sizes 2..9 (44 images); classes are not contiguous in index order."""
    sizes = [2, 3, 4, 4, 5, 6, 9, 11]
    labels = np.concatenate([np.full(size, c) for c, size in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels)


def groups_of(batches, group):
    """All groups [anchor, partners...] of an epoch, as an (A, M+1) array."""
    flat = np.asarray([i for batch in batches for i in batch])
    assert flat.size % group == 0
    return flat.reshape(-1, group)


@pytest.mark.parametrize('num_same_class', [1, 3])
def test_class_group_batches_structure(num_same_class):
    """Groups are same-class, anchors are not their own partners, partners distinct when the class has > M images."""
    labels = make_labels()
    counts = np.bincount(labels)
    group = num_same_class + 1
    sampler = ClassGroupBatchSampler(labels, 4 * group, num_same_class, seed=3)
    for _ in range(3):
        batches = list(sampler)
        assert all(len(b) % group == 0 for b in batches)
        assert all(len(b) == 4 * group for b in batches[:-1])
        groups = groups_of(batches, group)
        assert (labels[groups] == labels[groups[:, :1]]).all(), 'a group mixes classes'
        anchors, partners = groups[:, 0], groups[:, 1:]
        assert not (partners == anchors[:, None]).any(), 'an anchor is its own partner'
        for anchor, row in zip(anchors, partners):
            if counts[labels[anchor]] > num_same_class:
                assert len(set(row.tolist())) == num_same_class, f'duplicate partners {row} for anchor {anchor}'


def test_class_group_anchor_once_per_epoch_and_len():
    """Each index is an anchor exactly once per epoch; len() equals the number of batches yielded."""
    labels = make_labels()
    sampler = ClassGroupBatchSampler(labels, 8, 3, seed=0)
    for _ in range(2):
        expected_len = len(sampler)
        batches = list(sampler)
        assert len(batches) == expected_len
        anchors = groups_of(batches, 4)[:, 0]
        assert sorted(anchors.tolist()) == list(range(labels.size))


def test_class_group_two_ranks_cover_every_index():
    """world_size=2 (odd N): equal len per rank; anchors of both ranks cover every index, only padding repeats."""
    labels = np.concatenate([make_labels(), [0]])  # 45 images: one padded anchor
    samplers = [ClassGroupBatchSampler(labels, 4, 1, seed=5, rank=r, world_size=2) for r in range(2)]
    assert len(samplers[0]) == len(samplers[1])
    anchors = []
    for sampler in samplers:
        batches = list(sampler)
        assert len(batches) == len(sampler)
        anchors.append(groups_of(batches, 2)[:, 0])
    assert anchors[0].size == anchors[1].size == 23
    both = np.concatenate(anchors)
    assert set(both.tolist()) == set(range(labels.size))
    assert both.size - len(set(both.tolist())) == 1  # the single padding entry


def test_class_group_deterministic_per_seed_and_epoch():
    """Same (seed, epoch) gives the same batches; the next epoch differs; set_epoch replays an epoch."""
    labels = make_labels()
    a = ClassGroupBatchSampler(labels, 8, 1, seed=11)
    b = ClassGroupBatchSampler(labels, 8, 1, seed=11)
    epoch0, epoch1 = list(a), list(a)
    assert list(b) == epoch0
    assert epoch1 != epoch0
    assert not np.array_equal(groups_of(epoch0, 2)[:, 0], groups_of(epoch1, 2)[:, 0]), 'anchor order repeats'
    c = ClassGroupBatchSampler(labels, 8, 1, seed=11)
    c.set_epoch(1)
    assert list(c) == epoch1
    assert list(ClassGroupBatchSampler(labels, 8, 1, seed=12)) != epoch0


def test_class_group_partners_cover_the_class():
    """Over many epochs every other member of the class shows up as a partner (uniform offsets skip only the anchor)."""
    labels = np.random.default_rng(0).permutation(np.repeat([0, 1], 5))
    sampler = ClassGroupBatchSampler(labels, 4, 1, seed=0)
    seen = defaultdict(set)
    for _ in range(100):
        for anchor, partner in groups_of(list(sampler), 2):
            seen[int(anchor)].add(int(partner))
    for anchor in range(labels.size):
        same = set(np.flatnonzero(labels == labels[anchor]).tolist()) - {anchor}
        assert seen[anchor] == same


@pytest.mark.parametrize('batch_size,num_same_class', [(6, 3), (3, 1), (2, 3)])
def test_class_group_batch_size_not_multiple_raises(batch_size, num_same_class):
    """B must hold whole groups of M+1 images."""
    with pytest.raises(ValueError):
        ClassGroupBatchSampler(make_labels(), batch_size, num_same_class)


def test_class_group_single_image_class_raises():
    """A class with one image has no same-class partner: ValueError naming that class."""
    labels = [0, 0, 1, 1, 2, 3, 3]
    with pytest.raises(ValueError, match='class 2'):
        ClassGroupBatchSampler(labels, 4, 1)


def test_class_group_zero_same_class_raises():
    """M must be at least 1."""
    with pytest.raises(ValueError):
        ClassGroupBatchSampler(make_labels(), 4, 0)


def test_class_group_large_dataset_vectorised():
    """200k labels, M=3: one full epoch runs (vectorised) and keeps the anchor/group invariants."""
    n = 200_000
    labels = np.random.default_rng(0).permutation(np.arange(n) % 1000)
    sampler = ClassGroupBatchSampler(labels, 256, 3, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    groups = groups_of(batches, 4)
    assert (labels[groups] == labels[groups[:, :1]]).all()
    assert np.array_equal(np.sort(groups[:, 0]), np.arange(n))
    partners = np.sort(groups[:, 1:], axis=1)
    assert not (partners == groups[:, :1]).any()
    assert (partners[:, 1:] != partners[:, :-1]).all()


# ---------------------------------------------------------------------------------------------------------------------
# ClassGroupBatchSampler, CS-KD layout: [anchors..., partners...]
# ---------------------------------------------------------------------------------------------------------------------

def anchor_partner_pairs(batches):
    """(anchor, partner) rows of an epoch of `anchors_first` batches: each batch is G anchors then G partners."""
    pairs = []
    for batch in batches:
        assert len(batch) % 2 == 0
        half = len(batch) // 2
        pairs.append(np.stack([batch[:half], batch[half:]], axis=1))
    return np.concatenate(pairs)


def test_anchors_first_literal_layout():
    """Two classes of two images: every anchor's partner is the other image of its class, G anchors first."""
    labels = [0, 1, 0, 1]
    other = {0: 2, 2: 0, 1: 3, 3: 1}
    (batch,) = list(ClassGroupBatchSampler(labels, 8, 1, seed=0, layout='anchors_first'))
    assert sorted(batch[:4]) == [0, 1, 2, 3]
    assert batch[4:] == [other[a] for a in batch[:4]]


def test_anchors_first_pairs_share_a_class_and_cover_the_epoch():
    """Pairs share a class, a partner is never its anchor, every index is an anchor once per epoch; the
    anchors_first layout holds the same groups as the interleaved one."""
    labels = make_labels()
    sampler = ClassGroupBatchSampler(labels, 8, 1, seed=3, layout='anchors_first', method='CS-KD')
    interleaved = ClassGroupBatchSampler(labels, 8, 1, seed=3)
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(len(b) == 8 for b in batches[:-1])
        pairs = anchor_partner_pairs(batches)
        assert (labels[pairs[:, 0]] == labels[pairs[:, 1]]).all(), 'a pair mixes classes'
        assert (pairs[:, 0] != pairs[:, 1]).all(), 'an anchor is its own partner'
        assert sorted(pairs[:, 0].tolist()) == list(range(labels.size))
        assert np.array_equal(pairs, groups_of(list(interleaved), 2))


def test_anchors_first_two_ranks_are_disjoint():
    labels = make_labels()
    anchors = [anchor_partner_pairs(list(ClassGroupBatchSampler(labels, 4, 1, seed=1, rank=r, world_size=2,
                                                                layout='anchors_first')))[:, 0] for r in range(2)]
    assert not set(anchors[0].tolist()) & set(anchors[1].tolist())
    assert set(anchors[0].tolist()) | set(anchors[1].tolist()) == set(range(labels.size))


def test_class_group_messages_name_the_method():
    with pytest.raises(ValueError, match='CS-KD batch size 9 cannot hold whole groups .* multiple of 2'):
        ClassGroupBatchSampler(make_labels(), 9, 1, method='CS-KD')
    with pytest.raises(ValueError, match='CS-KD needs at least two images per class, but class 2 has one'):
        ClassGroupBatchSampler([0, 0, 1, 1, 2], 4, 1, method='CS-KD')
    with pytest.raises(ValueError, match='layout'):
        ClassGroupBatchSampler(make_labels(), 4, 1, layout='pairs')


# ---------------------------------------------------------------------------------------------------------------------
# EpochBatchSampler and ViewsBatchSampler (DDGSD)
# ---------------------------------------------------------------------------------------------------------------------

def test_views_literal():
    """Sequential order, 3 indices per batch, 2 views: [0,0,1,1,2,2], [3,3,4,4,5,5]; 7th index dropped."""
    sampler = ViewsBatchSampler(EpochBatchSampler(SequentialSampler(range(7)), 3))
    assert len(sampler) == 2
    assert list(sampler) == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]


@pytest.mark.parametrize('views', [2, 3])
def test_views_are_the_same_index_and_epochs_cover_the_data(views):
    """Rows v::views of a batch are views of the same indices; each index once per epoch (minus the dropped
    tail); a new order each epoch; set_epoch replays an epoch."""
    sampler = ViewsBatchSampler(EpochBatchSampler(dist_sampler(23, seed=4), 4), views)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(sampler) == 5
        for batch in batches:
            rows = np.asarray(batch).reshape(-1, views)
            assert (rows == rows[:, :1]).all(), f'views of different images in {batch}'
        images = [i for batch in batches for i in batch[::views]]
        assert len(images) == len(set(images)) == 20
    assert epochs[0] != epochs[1]
    replay = ViewsBatchSampler(EpochBatchSampler(dist_sampler(23, seed=4), 4), views)
    replay.set_epoch(1)
    assert list(replay) == epochs[1]


def test_views_ranks_are_disjoint():
    images = [{i for batch in ViewsBatchSampler(EpochBatchSampler(dist_sampler(24, num_replicas=2, rank=r), 3))
               for i in batch} for r in range(2)]
    assert not images[0] & images[1] and len(images[0] | images[1]) == 24


def test_views_keep_the_wrapped_layout():
    """Wrapping DLB's sampler keeps its structure on images: each batch's first rows are the previous
    batch's new images, both views of each."""
    inner = LastBatchSampler(SequentialSampler(range(8)), 4)
    assert list(ViewsBatchSampler(inner)) == [[0, 0, 1, 1, 2, 2, 3, 3], [2, 2, 3, 3, 4, 4, 5, 5],
                                              [4, 4, 5, 5, 6, 6, 7, 7]]


@pytest.mark.parametrize('batch_size', [7, 1])
def test_views_batch_size_must_hold_whole_view_pairs(batch_size):
    with pytest.raises(ValueError, match='cannot hold whole sets of 2 views'):
        ViewsBatchSampler.check_batch_size(batch_size, 2)


def test_epoch_batch_sampler_needs_a_batch():
    with pytest.raises(ValueError, match='batch size'):
        EpochBatchSampler(SequentialSampler(range(3)), 4)
