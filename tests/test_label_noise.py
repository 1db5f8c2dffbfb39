"""--train-label-noise: symmetric noise on the training labels, seen alike by the loss and the samplers."""
import numpy as np
import pytest
import torch

from test_train import _fails
from timm_selfkd.cli import parse_args
from timm_selfkd.runtime.data import DatasetView, dataset_labels, symmetric_label_noise, with_label_noise
from timm_selfkd.train import Setup

K = 10
PER_CLASS = 1000
CLEAN = np.repeat(np.arange(K), PER_CLASS)


def test_noise_rate_and_symmetry():
    """Exactly round(P N) labels change, never to their own class, and each class's wrong labels spread
    evenly over the K - 1 others."""
    noisy = symmetric_label_noise(CLEAN, 0.45, K, seed=3)
    wrong = noisy != CLEAN
    assert wrong.sum() == round(0.45 * CLEAN.size)
    transitions = np.zeros((K, K), dtype=np.int64)
    np.add.at(transitions, (CLEAN[wrong], noisy[wrong]), 1)
    assert np.all(np.diag(transitions) == 0)
    off_diagonal = transitions[~np.eye(K, dtype=bool)]
    # about 4500 / 90 = 50 per cell (binomial sd about 7): a skew towards any class falls outside these bounds
    assert off_diagonal.min() >= 25 and off_diagonal.max() <= 75, transitions
    per_class_rate = wrong.reshape(K, PER_CLASS).mean(axis=1)
    assert np.all(np.abs(per_class_rate - 0.45) < 0.06), per_class_rate


def test_noise_is_deterministic_per_seed():
    first = symmetric_label_noise(CLEAN, 0.2, K, seed=0)
    assert np.array_equal(first, symmetric_label_noise(CLEAN, 0.2, K, seed=0))
    assert not np.array_equal(first, symmetric_label_noise(CLEAN, 0.2, K, seed=1))
    assert np.array_equal(symmetric_label_noise(CLEAN, 0.0, K, seed=0), CLEAN)


@pytest.mark.parametrize('rate', [1.0, -0.1])
def test_rate_outside_unit_interval_is_refused(rate):
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        symmetric_label_noise(CLEAN, rate, K, seed=0)


class _Items(torch.utils.data.Dataset):
    def __init__(self, labels):
        self.targets = list(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return index, self.targets[index]


def test_noisy_view_yields_the_labels_it_reports():
    labels = np.arange(200) % 4
    view = with_label_noise(DatasetView(_Items(labels), indices=np.arange(0, 200, 2)), 0.5, seed=7)
    reported = dataset_labels(view)
    assert (reported != labels[::2]).sum() == 50
    assert [view[i][1] for i in range(len(view))] == reported.tolist()
    assert [view[i][0] for i in range(len(view))] == list(range(0, 200, 2))  # same items, new labels


@pytest.mark.parametrize('rate', ['1.0', '-0.1', '1.5'])
def test_train_py_refuses_rates_outside_unit_interval(image_folder, tmp_path, capsys, rate):
    _fails(capsys, tmp_path, ['--data-dir', image_folder, '--train-label-noise', rate],
           f'--train-label-noise must be in [0, 1), got {float(rate)}')


def test_bake_groups_images_by_their_noisy_labels(image_folder):
    """The loader yields the noisy labels and BAKE's sampler pairs each anchor with an image of the same noisy
    class: every (anchor, partner) pair of every batch shares its training label."""
    args = parse_args(['--data-dir', image_folder, '--img-size', '32', '--selfkd', 'bake', '-b', '8', '--device',
                       'cpu', '-j', '0', '--train-label-noise', '0.5', '--seed', '1', '--epochs', '1'])
    setup = Setup(args)
    noisy = dataset_labels(setup.train_dataset)
    clean = dataset_labels(setup.train_dataset.dataset)
    assert (noisy != clean).sum() == 16  # half of the 32 images
    for _, target in setup.train_loader:
        pairs = target.view(-1, 2)
        assert torch.equal(pairs[:, 0], pairs[:, 1])
