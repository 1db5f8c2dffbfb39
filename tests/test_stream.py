"""The training batch stream: replayable positions, per-sample seeds independent of workers, and the
batch-information channel that tells a task the dataset index of every image it trains on."""
import dataclasses
import random

import numpy as np
import pytest
import timm
import torch
from timm.data import create_loader
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

import timm_selfkd
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.runtime.data import build_dataset, dataset_labels
from timm_selfkd.runtime.batch_stream import BatchStream, KeyedDataset, SampleKey, step_seed


class RandomDraws(Dataset):
    """Item i is (i, a torch, a NumPy and a Python random draw): what an augmentation would consume."""

    def __len__(self):
        return 24

    def __getitem__(self, index):
        return torch.tensor([float(index), torch.rand(()).item(), np.random.rand(), random.random()])


def stream(seed=7, batch=4, record=False):
    return BatchStream(BatchSampler(DistributedSampler(RandomDraws(), 1, 0, seed=seed), batch, drop_last=True),
                       seed=seed, record=record)


def test_keys_follow_the_sampler_and_seeds_are_deterministic_and_distinct():
    s = stream()
    s.set_epoch(1)
    epoch1 = list(s)
    sampler = DistributedSampler(RandomDraws(), 1, 0, seed=7)
    sampler.set_epoch(1)
    assert [k.index for batch in epoch1 for k in batch] == list(sampler)
    seeds = [k.seed for batch in epoch1 for k in batch]
    assert len(set(seeds)) == len(seeds)
    s.set_epoch(1)
    assert list(s) == epoch1  # the same epoch replays exactly
    assert s.epoch == 2 and [k.seed for k in list(s)[0]] != [k.seed for k in epoch1[0]]  # next epoch, new draws


def test_nominal_epoch_length_ignores_dlbs_short_first_epoch():
    from timm_selfkd.components.samplers import LastBatchSampler
    s = BatchStream(LastBatchSampler(DistributedSampler(RandomDraws(), 1, 0, seed=1), 4), seed=1)
    assert (len(s), s.steps_per_epoch, len(s)) == (11, 12, 11)  # 24 images: 12 new halves of 2


def test_start_at_replays_the_rest_of_an_epoch():
    s = stream()
    s.set_epoch(2)
    full = list(s)
    s.start_at(2, 4)
    assert list(s) == full[4:]
    assert s.epoch == 3 and s.start_step == 0  # the pass after a resumed one is a whole epoch
    assert len(s) == len(full) == 6


def test_step_seeds_depend_on_every_coordinate():
    seeds = {step_seed(s, r, e, t) for s in (0, 1) for r in (0, 1) for e in (0, 1) for t in (0, 1)}
    assert len(seeds) == 16 and step_seed(3, 0, 1, 2) == step_seed(3, 0, 1, 2)


def test_augmentation_draws_do_not_depend_on_the_worker():
    """The same keys give the same draws in the main process and in two workers."""
    def epoch(workers):
        s = stream()
        s.set_epoch(0)
        loader = DataLoader(KeyedDataset(RandomDraws()), batch_sampler=s, num_workers=workers)
        return torch.cat(list(loader))

    in_main, in_workers = epoch(0), epoch(2)
    assert torch.equal(in_main, in_workers)
    assert in_main[:, 1].unique().numel() == len(in_main)  # every image got its own draw


def test_keyed_dataset_reads_the_keyed_index():
    data = KeyedDataset(RandomDraws())
    assert torch.equal(data[SampleKey(5, 11)], data[SampleKey(5, 11)])
    assert data[SampleKey(5, 11)][0] == 5 and not torch.equal(data[SampleKey(5, 11)], data[SampleKey(5, 12)])


def test_pop_returns_batches_in_order_and_fails_when_empty():
    s = stream(record=True)
    s.set_epoch(0)
    batches = list(s)
    infos = [s.pop() for _ in batches]
    assert [(i.epoch, i.step) for i in infos] == [(0, t) for t in range(len(batches))]
    assert all(i.indices.tolist() == [k.index for k in b] for i, b in zip(infos, batches))
    with pytest.raises(RuntimeError, match='no batch information'):
        s.pop()


@pytest.mark.parametrize('method, workers, prefetcher', [('none', 0, True), ('dlb', 2, True), ('bake', 0, False)])
def test_batch_info_indices_match_the_labels_that_arrive(image_folder, method, workers, prefetcher, monkeypatch):
    """Through timm's real loader (workers, prefetcher, the method's batch sampler), the indices the task
    receives for each batch are those of the images in it: their labels equal the targets that arrive."""
    dataset = build_dataset(name='', root=image_folder, split='train', is_training=True, in_chans=3)
    labels = torch.as_tensor(dataset_labels(dataset))
    loader = create_loader(dataset, input_size=(3, 32, 32), batch_size=8, is_training=True, num_workers=workers,
                           use_prefetcher=prefetcher, device=torch.device('cpu'))
    task = timm_selfkd.create_task(method, timm.create_model('resnet18', num_classes=4), batch_size=8)
    needs = dataclasses.replace(task.needs, sample_indices=True)  # any method's task can read the channel
    monkeypatch.setattr(type(task), 'requirements', classmethod(lambda cls, hparams: needs))
    attached = MethodWiring(method).attach(task, loader=loader, dataset=dataset, batch_size=8, num_epochs=2,
                                           seed=0)
    loader, s = attached.loader, attached.stream
    assert s.record and task.run.batch_info == s.pop
    for epoch in range(2):
        s.set_epoch(epoch)
        steps, seen = len(loader), 0
        for step, (_, target) in enumerate(loader):
            info = task.batch_info(batch_size=target.shape[0])
            assert (info.epoch, info.step) == (epoch, step)
            assert torch.equal(labels[info.indices], target)
            seen += 1
        # 32 images: 4 plain batches; DLB's 8 new halves (the first batch is two of them); BAKE's 32 pairs
        assert seen == steps == {'none': 4, 'dlb': 8 - (epoch == 0), 'bake': 8}[method]
