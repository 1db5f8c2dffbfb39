"""A method from a separate package, registered through the entry point group `timm_selfkd.methods`, trains through
train.py, a user's own timm train.py (the adapter) and `create_task` with no edit to this repository; it is also a
second batch layout, written only from the protocol's documentation (`timm_selfkd/methods/layout.py`), that leads
a stack on DLB, with mixup.

The plug-in (`TRIPLETS`): every image as three identical rows (`rows_per_image = 3`); its term is the rows' mean
squared distance to their image's mean row, weighted; it mixes its rows with timm's batch-mode `Mixup`, whose
row r / row B-1-r pairing sends the three rows of image i to the three rows of image n-1-i under one lambda.
"""
import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from timm.data import Mixup

import timm_selfkd
from conftest import NUM_CLASSES
from timm_selfkd import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.normpath(os.path.join(REPO, '..', 'shared', 'upstream-timm', 'train_v1.0.28.py'))

pytestmark = pytest.mark.xdist_group('plugin')  # its subprocess runs stay on one worker

TRIPLETS = '''
"""A batch layout written from timm_selfkd's documentation: every image as three identical rows."""
from dataclasses import dataclass, field

import torch

from timm_selfkd import Needs, SelfKDTask, register_method
from timm_selfkd.methods.layout import BatchLayout

ROWS = 3


@dataclass
class TripletsHparams:
    weight: float = field(default=0.5, metadata={'help': 'weight of the rows\\' spread around their image\\'s mean'})


class Repeated:
    """Each index of the method's batches three times in a row; epochs forwarded."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def set_epoch(self, epoch):
        if hasattr(self.batch_sampler, 'set_epoch'):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self):
        for batch in self.batch_sampler:
            yield [index for index in batch for _ in range(ROWS)]

    def __len__(self):
        return len(self.batch_sampler)


class TripletsLayout(BatchLayout):
    rows_per_image = ROWS

    def wrap_batch_sampler(self, hparams, batch_sampler):
        return Repeated(batch_sampler)

    def terms(self, hparams, output):
        rows = output.float().reshape(-1, ROWS, output.shape[-1])
        spread = (rows - rows.mean(dim=1, keepdim=True)).pow(2).mean()
        return hparams.weight * spread, {'spread': spread}

    def mixer(self, mixup):
        if mixup.mode != 'batch':
            raise ValueError('triplets mixes its rows in --mixup-mode batch only')

        def mix(input, target):
            return mixup(input, target)[1]

        return mix


@register_method('triplets', hparams=TripletsHparams, paper='a plug-in of the tests')
class TripletsTask(SelfKDTask):
    """Three identical rows per image, kept together: cross-entropy plus the rows' spread."""

    layout = TripletsLayout()

    @classmethod
    def requirements(cls, hparams):
        return Needs(own_batches=True, mixup='task')

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        if batch_size % ROWS:
            raise ValueError(f'triplets needs a batch size that is a multiple of {ROWS}, got {batch_size}')

    def bind_run(self, run):
        super().bind_run(run)
        self.mix = self.layout.mixer(run.mixup) if run.mixup is not None else None

    def batch_sampler(self, *, index_sampler, batch_size, **_):
        batches = torch.utils.data.BatchSampler(index_sampler, batch_size // ROWS, drop_last=True)
        return self.layout.wrap_batch_sampler(self.hparams, batches)

    def forward(self, input, target):
        if self.mix is not None and self.training:
            target = self.mix(input, target)
        output = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        extra, terms = self.layout.terms(self.hparams, output)
        return {'loss': loss_ce + extra, 'output': output, 'loss_ce': loss_ce,
                **{f'loss_{name}': value for name, value in terms.items()}}
'''


@pytest.fixture(scope='module')
def plugin_path(tmp_path_factory):
    """A folder holding the plug-in module and its installed-package metadata (`*.dist-info` with the entry point),
    as `pip install` of a separate package would leave them on the path."""
    root = tmp_path_factory.mktemp('plugin')
    (root / 'selfkd_triplets.py').write_text(TRIPLETS)
    info = root / 'selfkd_triplets-0.1.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: selfkd-triplets\nVersion: 0.1\n')
    (info / 'entry_points.txt').write_text('[timm_selfkd.methods]\ntriplets = selfkd_triplets\n')
    return str(root)


@pytest.fixture
def triplets(plugin_path, monkeypatch):
    """The plug-in imported into this process, registered in a copy of the registry (taken back after the test)."""
    monkeypatch.setattr(registry, '_METHODS', dict(registry._METHODS))
    monkeypatch.setattr(registry, '_STACKS', {})
    spec = importlib.util.spec_from_file_location('selfkd_triplets', os.path.join(plugin_path, 'selfkd_triplets.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_plugin(plugin_path):
    return dict(os.environ, PYTHONPATH=os.pathsep.join([plugin_path, REPO, os.environ.get('PYTHONPATH', '')]))


def run(argv, plugin_path, cwd=REPO, timeout=600):
    result = subprocess.run([sys.executable, *argv], cwd=cwd, env=with_plugin(plugin_path), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def summary(folder):
    with open(os.path.join(folder, 'summary.csv')) as f:
        return list(csv.DictReader(f))


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1)[:, :NUM_CLASSES] * self.scale


def test_the_stack_runs_the_layout_from_its_hooks_alone(triplets):
    """On DLB: batches of whole triplets in DLB's order (the repeated half first). On LsrKD, which takes mixed
    batches from the loader, the layout's own mixer mixes: the three rows of image i with those of image n-1-i
    under one lambda, so they stay identical (no spread) and the term is added to the method's loss."""
    assert 'triplets' in timm_selfkd.list_methods()
    sampler = timm_selfkd.batch_sampler(timm_selfkd.create_task('triplets+dlb', Scale(), batch_size=12),
                                        labels=[0, 1, 2, 3] * 6, batch_size=12)
    first, second = list(sampler)[:2]
    assert len(first) == len(second) == 12
    for batch in (first, second):
        assert all(batch[r] == batch[r - r % 3] for r in range(12))  # three consecutive rows per image
    assert second[:6] == first[6:]  # DLB's repeated half, as whole triplets

    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, mode='batch', label_smoothing=0.0, num_classes=NUM_CLASSES)
    task = timm_selfkd.create_task('triplets+lsrkd', Scale(), batch_size=12, mixup=mixup, triplets={'weight': 2.0})
    assert task.needs.mixup == 'task' and task.needs.own_batches
    images = torch.randn(4, 1, 2, 2).repeat_interleave(3, dim=0)  # 4 images x 3 identical rows
    labels = torch.tensor([0, 1, 2, 3]).repeat_interleave(3)
    np.random.seed(0)
    out = task(images.clone(), labels)
    np.random.seed(0)
    lam = mixup._params_per_batch()[0]
    mixed = images * lam + images.flip(0) * (1 - lam)  # row r with row B-1-r: image i's rows with image 3-i's
    assert 0 < lam < 1 and torch.allclose(out['output'], mixed.flatten(1)[:, :NUM_CLASSES])
    assert out['loss_triplets_spread'].item() == pytest.approx(0.0, abs=1e-12)
    assert set(out) >= {'loss', 'loss_ce', 'loss_kd', 'loss_triplets_spread'}


def test_the_layout_term_by_hand(triplets):
    layout = triplets.TripletsLayout()
    output = torch.tensor([[1., 0.], [3., 0.], [2., 3.], [0., 0.], [0., 0.], [0., 6.]])
    total, terms = layout.terms(triplets.TripletsHparams(weight=0.5), output)
    # image 0: rows (1,0), (3,0), (2,3), mean (2,1): squared distances 1+1, 1+1, 0+4; image 1: mean (0,2): 4, 4, 16
    expected = (2 + 2 + 4 + 4 + 4 + 16) / 12
    assert terms['spread'].item() == pytest.approx(expected)
    assert total.item() == pytest.approx(0.5 * expected)


@pytest.fixture(scope='module')
def train_runs(plugin_path, image_folder, tmp_path_factory):
    """train.py with the plug-in alone and leading a stack on DLB under mixup, one interpreter each."""
    out = tmp_path_factory.mktemp('plugin_runs')
    common = ['train.py', '--data-dir', image_folder, '--model', 'resnet18', '--img-size', '32', '-b', '12',
              '--epochs', '1', '--sched', 'none', '--lr', '0.01', '--workers', '0', '--device', 'cpu',
              '--output', str(out)]
    run([*common, '--selfkd', 'triplets', '--triplets-weight', '2', '--experiment', 'alone'], plugin_path)
    run([*common, '--selfkd', 'triplets+dlb', '--mixup', '0.2', '--mixup-mode', 'batch', '--experiment', 'stack'],
        plugin_path)
    return out


def test_train_py_trains_the_plugin_and_its_stack(train_runs):
    (alone,) = summary(train_runs / 'alone')
    (stack,) = summary(train_runs / 'stack')
    assert alone['status'] == stack['status'] == 'ok'
    assert float(alone['train_loss_spread']) >= 0 and float(stack['train_loss_triplets_spread']) >= 0
    assert float(stack['train_loss_kd']) >= 0
    assert float(alone['train_images']) == 32 * 3  # 32 images as 96 rows, in full batches of 12 rows


@pytest.mark.skipif(not os.path.isfile(UPSTREAM), reason=f'the upstream timm train.py is not at {UPSTREAM}')
def test_the_adapter_trains_the_plugin(plugin_path, image_folder, tmp_path):
    run(['-m', 'timm_selfkd.upstream', UPSTREAM, '--data-dir', image_folder, '--model', 'resnet18', '--num-classes',
         str(NUM_CLASSES), '--img-size', '32', '-b', '12', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.01',
         '--device', 'cpu', '-j', '0', '--output', str(tmp_path), '--experiment', 'run', '--selfkd', 'triplets+dlb'],
        plugin_path)
    (row,) = summary(tmp_path / 'run')
    assert float(row['train_loss_triplets_spread']) >= 0 and float(row['train_loss_kd']) >= 0


LOOP = """
import timm, torch, timm_selfkd
from torch.utils.data import DataLoader, TensorDataset
images, labels = torch.randn(24, 3, 32, 32), torch.arange(24) % 4
for name in ('triplets', 'triplets+dlb'):
    task = timm_selfkd.create_task(name, timm.create_model('resnet18', num_classes=4), batch_size=12)
    sampler = timm_selfkd.batch_sampler(task, labels.tolist(), 12)
    optimizer = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.01)
    for x, y in DataLoader(TensorDataset(images, labels), batch_sampler=sampler):
        out = task(x, y)
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    print(name, ' '.join(sorted(k for k in out if k.startswith('loss'))), bool(torch.isfinite(out['loss'])))
"""


def test_create_task_trains_the_plugin_in_a_loop_of_ones_own(plugin_path, tmp_path):
    result = run(['-c', LOOP], plugin_path, cwd=str(tmp_path))
    assert result.stdout.splitlines() == ['triplets loss loss_ce loss_spread True',
                                          'triplets+dlb loss loss_ce loss_kd loss_triplets_spread True']
