"""PS-KD inside the multi-exit family (`multi_exit --multi-exit-pskd`, seed 4 sec. 3.1 and table 1 rows 4-8): golden
losses at epochs 0, 1 and the last for every combination, PS-KD alone equal to `--selfkd pskd`, task state, a
train.py run on Fashion-MNIST resumed mid-epoch bit for bit, the memory's rows under DDP, and bad input."""
import copy
import math
import os
import re

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import IterableDataset

import timm_selfkd
import test_trajectory_distributed as ddp
from test_multi_exit import EXIT_FEATURES, EXIT_LOGITS, FEATURES, LOGITS, TARGET, _hint, _kl, _softmax
from test_preemption import _tensors
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.errors import UsageError
from timm_selfkd.methods.base import RunInfo
from timm_selfkd.registry import build_hparams
from timm_selfkd.train import main

EPOCHS = 4  # alpha_T = 0.8: a_0 = 0.2 (but nothing stored yet), a_1 = 0.4, a_3 = 0.8
ALPHA, WEIGHT, TEMPERATURE = 0.3, 0.05, 2.0
COMBINATIONS = [(False, False), (True, False), (False, True), (True, True)]  # (byot, dmfl), PS-KD on


class FixedOutputs(nn.Module):
    """The trainable module's four outputs, fixed (test_multi_exit's tensors), whatever the input."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(LOGITS))
        self.features = nn.Parameter(torch.tensor(FEATURES))
        self.exit_logits = nn.ParameterList([torch.tensor(v) for v in EXIT_LOGITS])
        self.exit_features = nn.ParameterList([torch.tensor(v) for v in EXIT_FEATURES])

    def forward(self, x):
        return self.logits, self.features, list(self.exit_logits), list(self.exit_features)


def _fixed_task(byot, dmfl, num_samples=4, **hparams):
    task = timm_selfkd.create_task('multi_exit', timm.create_model('test_resnet', num_classes=3), byot=byot,
                                   dmfl=dmfl, pskd=True, alpha=ALPHA, feature_weight=WEIGHT,
                                   temperature=TEMPERATURE, num_epochs=EPOCHS, steps_per_epoch=1,
                                   num_samples=num_samples, batch_size=2, **hparams)
    task.trainable_module = FixedOutputs()
    assert task.run.num_classes == 3
    return task.train()


def _step(task, epoch, indices, target=TARGET):
    task.set_epoch(epoch)
    return task(torch.zeros(len(indices), 1), torch.tensor(target), indices=torch.tensor(indices))


def _soft_ce(rows, targets):
    """Batch mean of -sum_k q_k log softmax(z)_k."""
    return sum(-sum(q * math.log(p) for q, p in zip(t, _softmax(z))) for z, t in zip(rows, targets)) / len(rows)


def _y_soft(epoch):
    """(1 - a_e) y + a_e P, P the deepest classifier's softmax as the fp16 memory holds it (y before any step)."""
    onehot = [[float(k == y) for k in range(3)] for y in TARGET]
    if epoch == 0:
        return onehot
    alpha = 0.8 * (epoch + 1) / EPOCHS
    stored = torch.tensor([_softmax(z) for z in LOGITS]).half().double().tolist()
    return [[(1 - alpha) * y + alpha * p for y, p in zip(ys, ps)] for ys, ps in zip(onehot, stored)]


@pytest.mark.parametrize('byot, dmfl', COMBINATIONS)
def test_golden_loss_at_epochs_0_1_and_last(byot, dmfl):
    """Seed 4 sec. 3.1: `L_CE = CE(P_N, y_soft)` and eq. 2's exit CE to `y_soft`; KL, hint and DMFL unchanged."""
    task = _fixed_task(byot, dmfl)
    for epoch in (0, 1, EPOCHS - 1):
        out = _step(task, epoch, [2, 3])
        target = _y_soft(epoch)
        ce = _soft_ce(LOGITS, target)
        exit_ce = sum(_soft_ce(z, target) for z in EXIT_LOGITS)
        if byot:
            kl = sum(TEMPERATURE ** 2 * _kl(LOGITS, z, TEMPERATURE) for z in EXIT_LOGITS)
            expected = ce + (1 - ALPHA) * exit_ce + ALPHA * kl + WEIGHT * sum(_hint(f, FEATURES) for f in EXIT_FEATURES)
        else:
            expected = ce + exit_ce  # the exits are probes: their CE reaches their classifiers only
        if dmfl:
            expected += sum(_kl(f, FEATURES) + _kl(FEATURES, f) for f in EXIT_FEATURES) / len(EXIT_FEATURES)
        assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5), epoch
        assert out['loss_exit_ce'].item() == pytest.approx(exit_ce, rel=1e-5), epoch
        assert out['loss'].item() == pytest.approx(expected, rel=1e-5), epoch
    # the memory keeps the deepest classifier's softmax (the model's), not an exit's
    task.progressive.memory.flush()
    stored, written = task.progressive.memory.lookup(torch.tensor([2, 3, 0]))
    assert written.tolist() == [True, True, False]
    torch.testing.assert_close(stored[:2], torch.tensor(LOGITS).softmax(-1), atol=1e-3, rtol=0)


def test_epoch_one_targets_differ_from_the_labels():
    """The golden values above would hide a PS-KD that does nothing if y_soft were y: it is not, from epoch 1."""
    task = _fixed_task(True, True)
    first = _step(task, 0, [2, 3])['loss_ce'].item()
    assert _step(task, 1, [2, 3])['loss_ce'].item() != pytest.approx(first, rel=1e-3)
    assert _step(task, 1, [0, 1])['loss_ce'].item() == pytest.approx(first, rel=1e-6)  # never seen: the label


def test_pskd_alone_trains_the_model_as_selfkd_pskd():
    """byot off, dmfl off, pskd on: every step's CE, the model's weights and the memory are those of
    `--selfkd pskd` on the same model and batches (the exits only watch, on detached features)."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    twin = copy.deepcopy(model)
    run = dict(num_epochs=3, steps_per_epoch=2, num_samples=8, batch_size=4)
    pskd = timm_selfkd.create_task('pskd', model, **run)
    alone = timm_selfkd.create_task('multi_exit', twin, byot=False, dmfl=False, pskd=True, **run)
    spec = timm_selfkd.get_method('multi_exit')
    assert alone.needs.sample_indices and not spec.task_cls.requirements(spec.hparams_cls()).sample_indices
    assert not alone.needs.streamed_data
    assert pskd.run.num_classes == alone.run.num_classes == 4
    optimizers = []
    for task in (pskd, alone):
        task.train()
        optimizers.append(torch.optim.SGD(task.trainable_module.parameters(), lr=0.2))
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % 4
    for epoch in range(run['num_epochs']):
        order = torch.randperm(8, generator=generator)
        for task in (pskd, alone):
            task.set_epoch(epoch)
        for step in range(2):
            indices = order[step * 4:(step + 1) * 4]
            losses = []
            for task, optimizer in zip((pskd, alone), optimizers):
                out = task(images[indices], labels[indices], indices=indices)
                losses.append(out['loss_ce'])
                optimizer.zero_grad()
                out['loss'].backward()
                optimizer.step()
            torch.testing.assert_close(losses[1], losses[0])
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], tensor, msg=name)
    pskd.sync_task_state()
    alone.sync_task_state()
    assert pskd.memory.values.float().sum() > 0
    torch.testing.assert_close(alone.progressive.memory.values, pskd.memory.values, atol=1e-3, rtol=0)


def _real_task(num_samples=4, **hparams):
    torch.manual_seed(0)
    task = timm_selfkd.create_task('multi_exit', timm.create_model('test_resnet', num_classes=3), pskd=True,
                                   num_epochs=EPOCHS, steps_per_epoch=1, num_samples=num_samples, batch_size=2,
                                   **hparams)
    return task.train()


def test_task_state_holds_exits_and_memory_and_round_trips():
    task = _real_task()
    task(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]), indices=torch.tensor([2, 3]))
    task.sync_task_state()
    state = task.get_task_state()
    assert set(state) == {'exits', 'exit_indices', 'memory'}
    assert set(task.get_task_state(module=task.trainable_module, ema=True)) == {'exits', 'exit_indices'}
    other = _real_task()
    assert other.progressive.memory.values.sum() == 0
    other.check_task_state(state)
    other.load_task_state(state)
    assert torch.equal(other.progressive.memory.values, task.progressive.memory.values)
    assert other.progressive.memory.values[2].sum() > 0
    for name, value in other.unwrapped_module().exits.state_dict().items():
        assert torch.equal(value, state['exits'][name]), name
    with pytest.raises(ValueError, match=r'PS-KD \(--multi-exit-pskd\) memory is for 4 training images, this run '
                                         'has 6'):
        _real_task(num_samples=6).check_task_state(state)
    with pytest.raises(ValueError, match='is dense, this run asks for top-2'):
        _real_task(pskd_topk=2).check_task_state(state)
    without = timm_selfkd.create_task('multi_exit', timm.create_model('test_resnet', num_classes=3))
    assert not without.needs.sample_indices and 'memory' not in without.get_task_state()


class Streamed(IterableDataset):
    def __iter__(self):
        yield from ()


def test_streamed_data_sets_are_refused_with_pskd_only():
    model = timm.create_model('test_resnet', num_classes=4)
    loader = [object()]  # timm's loader of the streamed set: one batch
    plain = timm_selfkd.create_task('multi_exit', model)
    wiring = MethodWiring('multi_exit', plain.hparams)
    wiring.check(batch_size=8, dataset=Streamed())
    attached = wiring.attach(plain, loader=loader, dataset=Streamed(), batch_size=8, num_epochs=2, seed=0)
    assert attached.loader is loader and attached.stream is None and attached.steps_per_epoch == 1
    task = timm_selfkd.create_task('multi_exit', model, pskd=True, num_epochs=2, num_samples=8)
    with pytest.raises(UsageError, match='^multi_exit chooses its batches or reads sample indices'):
        MethodWiring('multi_exit', task.hparams).check(batch_size=8, dataset=Streamed())
    with pytest.raises(ValueError, match=r'PS-KD \(--multi-exit-pskd\) needs the dataset index'):
        task.bind_run(RunInfo(num_epochs=2, steps_per_epoch=1, num_samples=None, num_classes=4, batch_size=8))


FASHION = ('--dataset', 'fashion_mnist', '--train-subset', '64', '--val-subset', '32', '--model', 'test_resnet',
           '--img-size', '32', '-b', '16', '--epochs', '2', '--selfkd', 'multi_exit', '--multi-exit-pskd',
           '--recovery-interval', '2', '--model-ema')


def _fashion_args(output, *extra):
    return ['--output', str(output), '--experiment', 'run', '--warmup-epochs', '0', '--device', 'cpu', '-j', '0',
            '--lr', '0.05', '--log-interval', '1', *FASHION, *extra]


def _checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _rows(output):
    import csv
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return [{k: v for k, v in row.items() if k != 'train_time'} for row in csv.DictReader(f)]


def test_fashion_mnist_triple_end_to_end_and_mid_epoch_resume_is_exact(tmp_path):
    """BYOT + DMFL + PS-KD through train.py: per-exit metrics, a plain timm checkpoint, the exits and the memory
    (every image's row) in the task state; resumed from the mid-epoch-1 recovery checkpoint (where the memory
    decides the targets), the run ends bit-identical to the uninterrupted one."""
    main(_fashion_args(tmp_path / 'full'))
    rows = _rows(tmp_path / 'full')
    assert [int(r['epoch']) for r in rows] == [0, 1]
    for key in ('train_loss', 'train_loss_ce', 'train_loss_exit_ce', 'train_loss_exit_kl', 'train_loss_dmfl'):
        assert math.isfinite(float(rows[-1][key])), key
    assert all(0 <= float(rows[-1][f'eval_{m}']) <= 100 for m in ('exit1_top1', 'exit3_top1', 'ensemble_top1'))
    run = tmp_path / 'full' / 'run'
    final = _checkpoint(run / 'last.pth.tar')
    timm.create_model('test_resnet', num_classes=10, checkpoint_path=str(run / 'last.pth.tar'))
    memory = final['task_state']['memory']['values']
    assert memory.shape == (64, 10) and torch.allclose(memory.float().sum(1), torch.ones(64), atol=3e-3)
    assert 'exits' in final['task_state'] and 'memory' not in final['task_state_ema']
    recovery = sorted(p for p in os.listdir(run) if re.fullmatch(r'recovery-1-\d+\.pth\.tar', p))
    assert recovery, os.listdir(run)
    main(_fashion_args(tmp_path / 'resumed', '--resume', str(run / recovery[0])))
    assert _rows(tmp_path / 'resumed') == rows[1:]
    resumed = _checkpoint(tmp_path / 'resumed' / 'run' / 'last.pth.tar')
    for key in ('state_dict', 'task_state', 'task_state_ema'):
        a, b = _tensors(resumed[key]), _tensors(final[key])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key


def _triple(rank, local_world_size):
    """The BYOT + DMFL + PS-KD triple on test_resnet under DDP; every prediction, every read, the final table."""
    images = torch.randn(ddp.NUM_SAMPLES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(ddp.NUM_SAMPLES) % ddp.NUM_CLASSES
    torch.manual_seed(0)
    spec = timm_selfkd.get_method('multi_exit')  # built by hand: the test binds the run's node layout itself
    task = spec.task_cls(timm.create_model('test_resnet', num_classes=ddp.NUM_CLASSES),
                         build_hparams(spec, dict(byot=True, dmfl=True, pskd=True)))
    task.bind_run(RunInfo(num_epochs=ddp.EPOCHS, steps_per_epoch=ddp.STEPS, num_samples=ddp.NUM_SAMPLES,
                          num_classes=ddp.NUM_CLASSES, batch_size=ddp.PER_RANK_BATCH, world_size=ddp.WORLD,
                          rank=rank, local_rank=rank % local_world_size, local_world_size=local_world_size))
    return ddp.train_recording(task, task.progressive.memory, images, labels, rank, lr=0.2)


def _worker(rank, init_file, out_dir):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=ddp.WORLD)
    torch.save({'node': _triple(rank, ddp.WORLD), 'two_nodes': _triple(rank, 1)}, f'{out_dir}/{rank}.pt')
    dist.destroy_process_group()


def test_triple_memory_rows_under_ddp(tmp_path):
    """Two gloo processes, one spawn: with one table per node and one per process, every row written or read
    is the deepest classifier's prediction of the right sample (PS-KD's check, reused)."""
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=ddp.WORLD)
    ranks = [torch.load(tmp_path / f'{rank}.pt', weights_only=False) for rank in range(ddp.WORLD)]
    for key in ('node', 'two_nodes'):
        ddp._check_pskd(ranks, key)


@pytest.mark.parametrize('extra, expected', [
    (['--multi-exit-pskd', '--multi-exit-pskd-topk', '5'], '--multi-exit-pskd-topk 5 is larger than the class '
                                                           'count (4)'),
    (['--multi-exit-pskd', '--multi-exit-pskd-alpha-t', '1.5'], 'multi_exit pskd_alpha_t must be in [0, 1], got 1.5'),
    (['--multi-exit-pskd-topk=-1'], 'multi_exit pskd_topk must be >= 0'),
    (['--no-multi-exit-byot', '--no-multi-exit-dmfl'], 'multi_exit needs byot or dmfl or pskd'),
])
def test_bad_input_is_one_line(image_folder, tmp_path, capsys, extra, expected):
    """Exit status 2 and one error line, the last (the top-k check comes after the exits' log line once the class
    count is known), and no output folder."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(['--data-dir', image_folder, '--model', 'test_resnet', '--img-size', '32', '-b', '8', '--device', 'cpu',
              '-j', '0', '--epochs', '1', '--selfkd', 'multi_exit', *extra, '--output', str(output)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if 'error:' in line]
    assert len(errors) == 1 and err[-1] == errors[0] and expected in errors[0], err
    assert not output.exists()
