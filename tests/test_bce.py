"""timm's --bce-loss (with --bce-target-thresh) as the hard-label term of every method whose hard-label term is the
criterion, and its one-line refusal where the loss is defined only for softmax (PS-KD, multi_exit's PS-KD switch).

The BCE terms are compared on fixed tensors with timm's `BinaryCrossEntropy` built by hand; the refusals go through
`MethodWiring.check`, train.py, the upstream adapter and `create_task`."""
import csv
import logging
import math
import os

import numpy as np
import pytest
import timm
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

import timm_selfkd
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.components.losses import soft_target_ce
from timm_selfkd.components.progressive_targets import BCE_REFUSAL
from timm_selfkd.errors import UsageError
from timm_selfkd.train import main

NUM_CLASSES = 4
BATCH = 8
THRESH = 0.2
# create_task facts for every method (each takes those it needs)
FACTS = dict(num_epochs=2, steps_per_epoch=4, num_samples=32, batch_size=BATCH)
HPARAMS = {'lsrkd_tc': dict(gamma=0.5)}  # TC's default gamma 0.25 is the uniform teacher for 4 classes
# the methods whose hard-label term is timm's criterion, so that BCE replaces it
TAKE_BCE = [name for name in timm_selfkd.list_methods() if name != 'pskd'] + ['ddgsd+dlb']
# (method, hyper-parameters, the one-line reason) of the methods whose loss is defined only for softmax
# (a stack carries its method's record: ddgsd+pskd is refused as pskd)
REFUSED = [('pskd', {}, BCE_REFUSAL),
           ('multi_exit', dict(pskd=True),
            f"--multi-exit-pskd trains every classifier on PS-KD's targets: {BCE_REFUSAL}"),
           ('ddgsd+pskd', {}, BCE_REFUSAL)]


class Recorder(torch.nn.Module):
    """A criterion that records the (logits, target) of every call and returns the wrapped criterion's value."""

    def __init__(self, criterion):
        super().__init__()
        self.criterion = criterion
        self.calls = []

    def forward(self, logits, target):
        self.calls.append((logits.detach().clone(), target.detach().clone()))
        return self.criterion(logits, target)


def _task(method, criterion_kwargs, mixup=None):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
    task = timm_selfkd.create_task(method, model, criterion_kwargs=criterion_kwargs, mixup=mixup, **FACTS,
                                   **HPARAMS.get(method, {}))
    task.train()
    return task


def _batch():
    g = torch.Generator().manual_seed(1)
    # rows (2i, 2i + 1) share a label: DDGSD's two views of image i
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize('method', TAKE_BCE)
def test_bce_replaces_the_hard_label_term(method):
    """Hard labels, label smoothing 0.1 and a target threshold: `loss_ce` is timm's BinaryCrossEntropy on the
    method's logits and labels (the smoothed one-hot binarised at 0.2), not the softmax cross-entropy."""
    spec = timm_selfkd.get_method(method)
    MethodWiring(spec, spec.hparams_cls(**HPARAMS.get(method, {}))).check(batch_size=BATCH, bce=True)
    task = _task(method, dict(loss_type='bce', smoothing=0.1, bce_target_thresh=THRESH))
    assert isinstance(task.criterion, BinaryCrossEntropy) and task.criterion.target_threshold == THRESH
    x, y = _batch()
    out = task(x, y)
    logits = out['output'].detach().float()
    labels = y[:logits.shape[0]]  # CS-KD's logits are its anchors' (the first half)
    expected = BinaryCrossEntropy(smoothing=0.1, target_threshold=THRESH)(logits, labels)
    torch.testing.assert_close(out['loss_ce'].detach(), expected, rtol=1e-6, atol=1e-7)
    assert not math.isclose(out['loss_ce'].item(), torch.nn.functional.cross_entropy(logits, labels).item(),
                            rel_tol=1e-3)
    assert torch.isfinite(out['loss'])


@pytest.mark.parametrize('method', TAKE_BCE)
def test_bce_takes_mixup_s_soft_targets_with_the_threshold(method, monkeypatch):
    """Mixup (from the loop for methods that take mixed batches, the task's own mix for those that mix themselves):
    every criterion call is timm's BCE on the mixed soft targets, binarised at the threshold; `loss_ce` is the call
    on the method's logits (and multi_exit's exit term, self_guidance's student term are calls of it too)."""
    np.random.seed(0)
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
    # soft targets as train.py builds the criterion whenever mixup is on (create_task adds them for 'loader' only)
    task = _task(method, dict(loss_type='bce', soft_targets=True, bce_target_thresh=THRESH), mixup=mixup)
    recorder = Recorder(task.criterion)
    monkeypatch.setattr(task, 'criterion', recorder)
    x, y = _batch()
    if task.needs.mixup == 'loader':  # the loop mixes: the task gets timm's soft targets
        x, y = mixup(x, y)
    out = task(x, y)
    assert recorder.calls
    logits, target = recorder.calls[0]
    assert torch.equal(logits, out['output'].detach().float())
    assert target.shape == logits.shape and target.is_floating_point()
    assert (target.max(dim=1).values < 0.99).any(), 'no row is mixed'
    bce = BinaryCrossEntropy(smoothing=0., target_threshold=THRESH)
    torch.testing.assert_close(out['loss_ce'].detach(), bce(logits, target), rtol=1e-6, atol=1e-7)
    binarised = target.gt(THRESH).float()
    torch.testing.assert_close(out['loss_ce'].detach(),
                               torch.nn.functional.binary_cross_entropy_with_logits(logits, binarised),
                               rtol=1e-6, atol=1e-7)
    if method == 'multi_exit':
        assert len(recorder.calls) == 1 + len(task.trainable_module.exits)
        exit_ce = sum(bce(z, t) for z, t in recorder.calls[1:])
        torch.testing.assert_close(out['loss_exit_ce'].detach(), exit_ce, rtol=1e-6, atol=1e-6)
    if method == 'self_guidance':
        (student, student_target), = recorder.calls[1:]
        assert torch.equal(student_target, target)
        torch.testing.assert_close(out['loss_ce_student'].detach(), bce(student, target), rtol=1e-6, atol=1e-7)


def test_multi_exit_mixed_targets_through_the_criterion_are_bit_identical():
    """multi_exit without PS-KD now sends mixup's soft targets through the criterion (so that BCE replaces it);
    timm's SoftTargetCrossEntropy gives exactly the numbers (loss and gradients) of the soft-target CE it used."""
    g = torch.Generator().manual_seed(2)
    z = (4 * torch.randn(16, 100, generator=g)).requires_grad_()
    t = torch.rand(16, 100, generator=g).softmax(dim=-1)
    task = _task('multi_exit', dict(soft_targets=True))
    assert isinstance(task.criterion, SoftTargetCrossEntropy)
    new = task._cross_entropy(z, t)
    (grad_new,) = torch.autograd.grad(new, z)
    old = soft_target_ce(z, t)
    (grad_old,) = torch.autograd.grad(old, z)
    assert torch.equal(new, old) and torch.equal(grad_new, grad_old)


def test_multi_exit_pskd_keeps_its_soft_target_ce():
    """With PS-KD on, the float targets are PS-KD's y_soft: the soft-target CE, whatever the criterion."""
    task = timm_selfkd.create_task('multi_exit', timm.create_model('test_resnet', num_classes=NUM_CLASSES),
                                   pskd=True, num_epochs=2, num_samples=32)
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(4, NUM_CLASSES, generator=g), torch.rand(4, NUM_CLASSES, generator=g).softmax(dim=-1)
    assert torch.equal(task._cross_entropy(z, t), soft_target_ce(z, t))


@pytest.mark.parametrize('method, hparams, reason', REFUSED, ids=[r[0] for r in REFUSED])
def test_the_wiring_refuses_bce_in_one_line(method, hparams, reason):
    spec = timm_selfkd.get_method(method)
    values = spec.hparams_cls(**hparams)
    wiring = MethodWiring(spec, values)
    wiring.check(batch_size=BATCH, bce=False)
    with pytest.raises(UsageError) as exc:
        wiring.check(batch_size=BATCH, bce=True)
    assert str(exc.value) == f'{method} cannot train with a BCE loss (--bce-loss): {reason}'
    assert '\n' not in str(exc.value)


def test_every_other_method_takes_bce():
    for method in TAKE_BCE:
        spec = timm_selfkd.get_method(method)
        values = spec.hparams_cls(**HPARAMS.get(method, {}))
        assert spec.task_cls.requirements(values).bce_refusal == ''
        MethodWiring(spec, values).check(batch_size=BATCH, bce=True)


@pytest.mark.parametrize('extra, expected', [
    (['--selfkd', 'pskd'], f'pskd cannot train with a BCE loss (--bce-loss): {BCE_REFUSAL}'),
    (['--selfkd', 'multi_exit', '--multi-exit-pskd'], 'multi_exit cannot train with a BCE loss (--bce-loss): '
                                                      "--multi-exit-pskd trains every classifier on PS-KD's targets"),
])
def test_train_py_refuses_bce_in_one_line(image_folder, tmp_path, capsys, extra, expected):
    """Exit status 2, one error line, and no output folder."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(['--device', 'cpu', '-j', '0', '--epochs', '1', '--data-dir', image_folder, '--img-size', '32',
              '-b', str(BATCH), '--model', 'resnet18', '--bce-loss', '--bce-target-thresh', str(THRESH), *extra,
              '--output', str(output)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error:' in err[0] and expected in err[0], err
    assert not output.exists()


UPSTREAM = os.path.normpath(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                                         'upstream-timm'))


@pytest.mark.skipif(not os.path.isdir(UPSTREAM), reason=f'the upstream timm train.py fixtures are not in {UPSTREAM}')
def test_the_adapter_refuses_bce_with_train_py_s_wording(image_folder, tmp_path, capsys):
    from timm_selfkd import upstream
    logging.root.handlers[:] = [h for h in logging.root.handlers if type(h) is not logging.StreamHandler]
    output = tmp_path / 'out'
    try:
        with pytest.raises(SystemExit) as exc:
            upstream.main([os.path.join(UPSTREAM, 'train_v1.0.28.py'), '--data-dir', image_folder, '--model',
                           'resnet18', '--num-classes', str(NUM_CLASSES), '--img-size', '32', '-b', str(BATCH),
                           '--epochs', '1', '--device', 'cpu', '-j', '0', '--selfkd', 'pskd', '--bce-loss',
                           '--output', str(output)])
    finally:
        logging.root.handlers[:] = [h for h in logging.root.handlers if type(h) is not logging.StreamHandler]
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'timm_selfkd.upstream: error: pskd cannot train with a BCE loss (--bce-loss): {BCE_REFUSAL}']
    assert not output.exists()


@pytest.mark.parametrize('method', ['bake', 'dlb'])  # mixed batches from the loader; a method that mixes itself
def test_train_py_with_bce_threshold_and_mixup(image_folder, tmp_path, monkeypatch, method):
    """One epoch of resnet18 with --bce-loss --bce-target-thresh 0.2 --mixup 0.2: every hard-label term is timm's
    BCE with the threshold, on mixup's soft targets, and the run ends with finite losses."""
    seen = []
    forward = BinaryCrossEntropy.forward

    def recording(self, x, target):
        seen.append((self.target_threshold, tuple(target.shape), target.is_floating_point()))
        return forward(self, x, target)

    monkeypatch.setattr(BinaryCrossEntropy, 'forward', recording)
    main(['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'run', '--model', 'resnet18',
          '--img-size', '32', '-b', str(BATCH), '--epochs', '1', '--warmup-epochs', '0', '--device', 'cpu',
          '--workers', '0', '--lr', '0.01', '--selfkd', method, '--bce-loss', '--bce-target-thresh', str(THRESH),
          '--mixup', '0.2'])
    with open(os.path.join(tmp_path, 'run', 'summary.csv')) as f:
        (row,) = list(csv.DictReader(f))
    assert row['status'] == 'ok'
    assert math.isfinite(float(row['train_loss'])) and math.isfinite(float(row['train_loss_ce']))
    training = [s for s in seen if s[1] == (BATCH, NUM_CLASSES)]  # validation's targets are labels
    assert training and all(thresh == THRESH and soft for thresh, _, soft in training), seen


def test_create_task_refuses_a_bce_criterion_for_a_softmax_only_method():
    with pytest.raises(ValueError, match=r'^pskd cannot train with a BCE loss \(--bce-loss\): PS-KD'):
        timm_selfkd.create_task('pskd', timm.create_model('resnet18', num_classes=4), num_epochs=2, num_samples=8,
                                criterion_kwargs=dict(loss_type='bce'))
