"""timm's repeated augmentation (`--aug-repeats`, DeiT/RSB recipes) under a method's own batches: the method's
sampler composes over timm's `RepeatAugSampler`, and its invariants hold."""
import csv
import os
import subprocess
import sys

import pytest
from timm.data.distributed_sampler import RepeatAugSampler

from timm_selfkd.components.samplers import ClassGroupBatchSampler, LastBatchSampler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('repeats', [2, 3, 1.5])
def test_dlb_batches_over_repeated_indices_keep_the_repeated_half(repeats):
    data = list(range(40))
    repeated = RepeatAugSampler(data, num_replicas=1, rank=0, num_repeats=repeats)
    sampler = LastBatchSampler(repeated, 8)
    for epoch in range(2):
        batches = list(sampler)
        repeated.set_epoch(epoch)
        order = list(repeated)
        assert len(order) == 40 and len(set(order)) < 40  # images drawn more than once
        for previous, batch in zip(batches, batches[1:]):
            assert batch[:4] == previous[4:]  # DLB's invariant: the repeated half is the last new half
        # every index of the repeated order is new exactly once, in order (epoch 0 starts with two new halves)
        new = ([batches[0][:4]] if epoch == 0 else []) + [batch[4:] for batch in batches]
        assert [i for half in new for i in half] == order


@pytest.mark.parametrize('method', ['dlb', 'bake', 'cskd', 'ddgsd+dlb'])
def test_methods_with_their_own_batches_train_with_repeated_augmentation(image_folder, tmp_path, method):
    run = [sys.executable, 'train.py', '--data-dir', image_folder, '--model', 'resnet18', '--img-size', '32', '-b', '8',
           '--epochs', '1', '--sched', 'none', '--lr', '0.01', '--workers', '0', '--device', 'cpu', '--selfkd', method,
           '--aug-repeats', '3', '--output', str(tmp_path), '--experiment', 'run']
    result = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(tmp_path / 'run' / 'summary.csv') as f:
        row = list(csv.DictReader(f))[-1]
    assert float(row['train_loss_kd']) > 0 and int(float(row['train_images'])) > 0


@pytest.mark.parametrize('layout, group', [('interleaved', 2), ('interleaved', 4), ('anchors_first', 2)])
def test_class_groups_draw_their_anchors_from_the_repeated_sampler(layout, group):
    labels = [i % 4 for i in range(40)]
    anchors = RepeatAugSampler(labels, num_replicas=1, rank=0, num_repeats=3)
    sampler = ClassGroupBatchSampler(labels, 4 * group, group - 1, layout=layout, anchor_sampler=anchors)
    for epoch in range(2):
        batches = list(sampler)
        anchors.set_epoch(epoch)
        expected = list(anchors)
        groups = [g for batch in batches for g in _groups(batch, group, layout)]
        assert [g[0] for g in groups] == expected  # the anchors, in the repeated sampler's order
        for anchor, *partners in groups:
            assert all(labels[p] == labels[anchor] and p != anchor for p in partners)


def _groups(batch, group, layout):
    if layout == 'interleaved':
        return [batch[i:i + group] for i in range(0, len(batch), group)]
    anchors = len(batch) // group
    return [[batch[i + k * anchors] for k in range(group)] for i in range(anchors)]
