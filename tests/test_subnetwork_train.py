"""Self-Guidance and multi-exit training end to end through train.py: AMP, EMA, per-exit validation, plain
timm checkpoints, resume, DDP and bad input."""
import math
import os

import pytest
import timm
import torch
import torch.nn as nn
from timm.models import register_model

from test_train import REPO, _fails, read_summary, torchrun, train_args
from timm_selfkd.cli import method_hparams, parse_args
from timm_selfkd.train import Setup, main

MODEL = 'test_resnet'  # timm's 373k-parameter ResNet: stochastic-depth places, four stages
EXIT_METRICS = ('exit1_top1', 'exit2_top1', 'exit3_top1', 'ensemble_top1')


def _checkpoint(output, name='last.pth.tar'):
    return torch.load(os.path.join(output, 'run', name), map_location='cpu', weights_only=False)


def test_self_guidance_bf16_ema_default_rate(image_folder, tmp_path, caplog):
    """A ResNet built without stochastic depth: the default schedule is added with a log line; bf16 autocast
    stays finite; the checkpoint (and its EMA) is the plain timm model."""
    caplog.set_level('INFO')
    main(train_args(image_folder, tmp_path, '--selfkd', 'self_guidance', '--model', MODEL, '--img-size', '32',
                    '--amp', '--amp-dtype', 'bfloat16', '--model-ema'))
    assert any('built without stochastic depth' in r.getMessage() for r in caplog.records)
    (row,) = read_summary(tmp_path)
    for key in ('train_loss', 'train_loss_ce', 'train_loss_ce_student', 'train_loss_kd', 'eval_loss',
                'eval_ema_loss'):
        assert math.isfinite(float(row[key])), key
    checkpoint = _checkpoint(tmp_path)
    timm.create_model(MODEL, num_classes=4, checkpoint_path=str(tmp_path / 'run' / 'last.pth.tar'))
    timm.create_model(MODEL, num_classes=4).load_state_dict(checkpoint['state_dict_ema'])


def test_multi_exit_bf16_ema_per_exit_metrics(image_folder, tmp_path, caplog):
    """Each exit's top-1 and the ensemble's in the log and summary.csv (also for the EMA); the checkpoint holds
    the plain model, the exits travel as task state."""
    caplog.set_level('INFO', logger='train')
    main(train_args(image_folder, tmp_path, '--selfkd', 'multi_exit', '--model', MODEL, '--img-size', '32',
                    '--amp', '--amp-dtype', 'bfloat16', '--model-ema'))
    (row,) = read_summary(tmp_path)
    for key in ('train_loss', 'train_loss_exit_ce', 'train_loss_exit_kl', 'train_loss_hint', 'train_loss_dmfl',
                'eval_loss'):
        assert math.isfinite(float(row[key])), key
    for name in EXIT_METRICS:
        assert 0 <= float(row[f'eval_{name}']) <= 100 and 0 <= float(row[f'eval_ema_{name}']) <= 100
    eval_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith('Eval 0:'))
    assert all(name in eval_line for name in EXIT_METRICS)
    checkpoint = _checkpoint(tmp_path)
    assert not any('exit' in key for key in checkpoint['state_dict'])
    assert checkpoint['task_state']['exit_indices'] == [1, 2, 3] and 'exits' in checkpoint['task_state_ema']
    timm.create_model(MODEL, num_classes=4, checkpoint_path=str(tmp_path / 'run' / 'last.pth.tar'))


def _exits(task, ema=False):
    return task.unwrapped_module(ema=ema).exits.state_dict()


def test_resume_restores_the_exits(image_folder, tmp_path):
    """train.py's set-up with --resume loads the trained exits (and their EMA) from the task state."""
    common = ('--selfkd', 'multi_exit', '--model', MODEL, '--img-size', '32', '--model-ema')
    main(train_args(image_folder, tmp_path, *common))
    saved = _checkpoint(tmp_path)
    resumed = Setup(parse_args(train_args(image_folder, tmp_path / 'resumed', *common, '--epochs', '2',
                                          '--resume', str(tmp_path / 'run' / 'last.pth.tar'))))
    fresh = Setup(parse_args(train_args(image_folder, tmp_path / 'fresh', *common, '--epochs', '2')))
    assert resumed.position.epoch == 1
    for ema, key in ((False, 'task_state'), (True, 'task_state_ema')):
        restored, initial = _exits(resumed.task, ema), _exits(fresh.task, ema)
        for name, value in saved[key]['exits'].items():
            torch.testing.assert_close(restored[name], value, rtol=0, atol=0)
        assert any(not torch.equal(initial[name], value) for name, value in saved[key]['exits'].items())


@pytest.mark.parametrize('method', ['self_guidance', 'multi_exit'])
def test_mid_epoch_resume_is_exact(image_folder, tmp_path, caplog, method):
    """Resumed from the recovery checkpoint after step 2 of 4, the run ends as the uninterrupted one: the same
    sampled sub-networks (Self-Guidance) and the same exits (multi-exit), to the last bit."""
    caplog.set_level('INFO', logger='train')
    common = ('--selfkd', method, '--model', MODEL, '--img-size', '32', '--recovery-interval', '2', '--model-ema')
    main(train_args(image_folder, tmp_path / 'full', *common))
    main(train_args(image_folder, tmp_path / 'resumed', *common,
                    '--resume', str(tmp_path / 'full' / 'run' / 'recovery-0-2.pth.tar')))
    assert any(r.getMessage().endswith('at epoch 0, step 2') for r in caplog.records)
    (full,), (resumed,) = read_summary(tmp_path / 'full'), read_summary(tmp_path / 'resumed')
    assert full.keys() == resumed.keys()
    for key in full:
        if key != 'train_time':
            assert resumed[key] == full[key], key
    if method == 'multi_exit':
        for state in ('task_state', 'task_state_ema'):
            saved = _checkpoint(tmp_path / 'full')[state]['exits']
            for name, value in _checkpoint(tmp_path / 'resumed')[state]['exits'].items():
                assert torch.equal(value, saved[name]), (state, name)


@pytest.mark.parametrize('method', ['self_guidance', 'multi_exit'])
def test_torchrun_two_process_gloo(image_folder, tmp_path, method):
    """Both passes (Self-Guidance) or the model and its exits (BYOT + DMFL) in one DDP forward per step."""
    torchrun(*train_args(image_folder, tmp_path, '--selfkd', method, '--model', MODEL, '--img-size', '32'))
    (row,) = read_summary(tmp_path)
    assert float(row['train_images']) == 32
    assert math.isfinite(float(row['train_loss']))
    if method == 'multi_exit':
        assert all(0 <= float(row[f'eval_{name}']) <= 100 for name in EXIT_METRICS)
        assert not any('exit' in key for key in _checkpoint(tmp_path)['state_dict'])


class _NoIntermediatesNet(nn.Module):
    def __init__(self, num_classes=4, in_chans=3, **_):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(in_chans, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


@register_model
def selfkd_test_no_intermediates(pretrained=False, **kwargs):
    return _NoIntermediatesNet(**kwargs)


@pytest.mark.parametrize('extra, expected', [
    (['--selfkd', 'self_guidance', '--model', 'dla46_c'], 'self_guidance needs stochastic depth'),
    (['--selfkd', 'self_guidance', '--drop-path', '1.0'], '--drop-path (the stochastic-depth rate) must be in [0, 1)'),
    (['--selfkd', 'self_guidance', '--self-guidance-default-rate', '1'],
     'self_guidance default_rate must be in [0, 1), got 1.0'),
    (['--selfkd', 'self_guidance', '--self-guidance-weight', '-0.5'], 'weight must be >= 0'),
    (['--selfkd', 'multi_exit', '--multi-exit-alpha', '-0.1'], 'multi_exit alpha must be in [0, 1], got -0.1'),
    (['--selfkd', 'multi_exit', '--multi-exit-feature-weight', '-1'], 'feature_weight must be >= 0'),
    (['--selfkd', 'multi_exit', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=8',
      'depth=4', '--multi-exit-indices', '1,3'], 'exit index 3 does not exist for vit_tiny_patch16_224: valid '
                                                 'indices are 0-2'),
    (['--selfkd', 'multi_exit', '--model', 'selfkd_test_no_intermediates'], 'has no forward_intermediates()'),
])
def test_bad_input_is_one_line(image_folder, tmp_path, capsys, extra, expected):
    _fails(capsys, tmp_path, ['--data-dir', image_folder, '--img-size', '32'] + extra, expected)


def test_list_selfkd_and_recipes(capsys):
    """`--list-selfkd` shows both methods with their papers and flags; the recipes select the table-1 rows."""
    main(['--list-selfkd'])
    out = capsys.readouterr().out
    for text in ('self_guidance:', 'Zheng and Peng', '--self-guidance-weight', 'self_guidance_default_rate',
                 'multi_exit:', 'Be Your Own Teacher', 'Chottananurak', '--multi-exit-indices', 'default 1e-06'):
        assert text in out, text
    rows = {'multi_exit_byot': (True, False), 'multi_exit_dmfl': (False, True), 'multi_exit_byot_dmfl': (True, True)}
    for name, (byot, dmfl) in rows.items():
        hparams = method_hparams(parse_args(['-c', os.path.join(REPO, 'configs', f'{name}_cifar100.yaml')]))
        assert (hparams.byot, hparams.dmfl, hparams.alpha, hparams.feature_weight) == (byot, dmfl, 0.1, 1e-6)
    hparams = method_hparams(parse_args(['-c', os.path.join(REPO, 'configs', 'self_guidance_cifar100.yaml')]))
    assert (hparams.weight, hparams.temperature, hparams.default_rate) == (0.25, 3.0, 0.5)
