"""MrKD, MrKD-TC and PS-KD through train.py: metrics in summary.csv, checkpoints, resume (in one process and
under torchrun x2 gloo, bit for bit), and bad input as one line."""
import glob
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from conftest import NUM_CLASSES, TRAIN_PER_CLASS
from test_train import REPO, _fails, read_summary, torchrun, train_args
from timm_selfkd.cli import parse_args
from timm_selfkd.train import Setup, main

TRAIN_IMAGES = NUM_CLASSES * TRAIN_PER_CLASS
MRKD = ('--selfkd', 'mrkd', '--mrkd-copies', '2', '--mrkd-interval', '3')
PSKD = ('--selfkd', 'pskd', '--smoothing', '0')
COMMON = ('--model', 'test_resnet', '--img-size', '32', '--epochs', '2', '--no-aug')


def _checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)


@pytest.fixture(scope='module')
def runs(image_folder, tmp_path_factory):
    """Two-epoch single-process runs of MrKD and PS-KD (their checkpoints serve several tests)."""
    root = tmp_path_factory.mktemp('trajectory')
    for name, method in (('mrkd', MRKD), ('pskd', PSKD)):
        main(train_args(image_folder, root / name, *method, *COMMON))
    return root


def test_summary_has_calibration_metrics_and_a_plain_timm_checkpoint(runs):
    for name in ('mrkd', 'pskd'):
        rows = read_summary(runs / name)
        assert [int(r['epoch']) for r in rows] == [0, 1]
        for key in ('eval_top1', 'eval_top5', 'eval_nll', 'eval_ece', 'eval_aurc', 'train_loss'):
            assert math.isfinite(float(rows[-1][key])), (name, key)
        assert float(rows[-1]['eval_nll']) == pytest.approx(float(rows[-1]['eval_loss']), rel=1e-5)
        assert 0 <= float(rows[-1]['eval_ece']) <= 100 and 0 <= float(rows[-1]['eval_aurc']) <= 1000
        timm.create_model('test_resnet', num_classes=NUM_CLASSES,
                          checkpoint_path=str(runs / name / 'run' / 'last.pth.tar'))
    assert float(read_summary(runs / 'mrkd')[-1]['train_loss_kd']) > 0


def test_checkpoints_hold_the_copies_and_the_memory(runs):
    state = _checkpoint(runs / 'mrkd' / 'run' / 'checkpoint-1.pth.tar')['task_state']
    steps_per_epoch = TRAIN_IMAGES // 8
    assert state['num_steps'] == 2 * steps_per_epoch and state['num_copies'] == 2
    assert state['copies']['fc.weight'].shape == (2, NUM_CLASSES, 96)
    # refreshed at t = 3 and 6 (kappa 3): theta_1 is the weights after 5 updates, theta_2 after 2
    assert not torch.equal(state['copies']['fc.weight'][0], state['copies']['fc.weight'][1])
    memory = _checkpoint(runs / 'pskd' / 'run' / 'checkpoint-1.pth.tar')['task_state']['memory']
    assert memory['values'].shape == (TRAIN_IMAGES, NUM_CLASSES) and memory['values'].dtype == torch.float16
    assert torch.allclose(memory['values'].float().sum(1), torch.ones(TRAIN_IMAGES), atol=3e-3)  # all written


def _setup(*argv):
    return Setup(parse_args(list(argv) + ['--output', '/nonexistent', '--device', 'cpu', '-j', '0']))


def test_resume_restores_the_copies_and_the_memory(runs, image_folder):
    for name, method in (('mrkd', MRKD), ('pskd', PSKD)):
        checkpoint = runs / name / 'run' / 'checkpoint-0.pth.tar'
        saved = _checkpoint(checkpoint)['task_state']
        task = _setup('--data-dir', image_folder, '-b', '8', *method, *COMMON, '--resume', str(checkpoint)).task
        if name == 'mrkd':
            assert task.num_steps == saved['num_steps'] == TRAIN_IMAGES // 8
            for key, tensor in task.ring.state_dict().items():
                assert torch.equal(tensor, saved['copies'][key]), key
        else:
            assert torch.equal(task.memory.values, saved['memory']['values'])


@pytest.mark.parametrize('run, extra, expected', [
    ('mrkd', [*MRKD[:2], '--mrkd-copies', '3', '--mrkd-interval', '3'], 'has 2 mrkd copies, this run asks for 3'),
    ('mrkd', [*MRKD, '--num-classes', '5'], 'copies have 4 classes, this model has 5'),
    ('pskd', [*PSKD, '--train-subset', '16'], 'PS-KD memory is for 32 training images, this run has 16'),
    ('pskd', [*PSKD, '--num-classes', '5'], 'PS-KD memory is for 4 classes, this run has 5'),
    ('pskd', [*PSKD, '--pskd-topk', '2'], 'PS-KD memory is dense, this run asks for top-2'),
])
def test_resume_with_a_different_setup_is_refused(runs, image_folder, tmp_path, capsys, run, extra, expected):
    """Exit status 2 and one error line (after the log lines of the set-up), no output folder."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(['--data-dir', image_folder, '--model', 'test_resnet', '--img-size', '32', '-b', '8', '--epochs', '2',
              *extra, '--output', str(output), '--device', 'cpu', '-j', '0',
              '--resume', str(runs / run / 'run' / 'checkpoint-0.pth.tar')])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if 'error:' in line]
    assert len(errors) == 1 and err[-1] == errors[0] and expected in errors[0], err
    assert not output.exists()


@pytest.mark.parametrize('extra, expected', [
    (['--selfkd', 'mrkd', '--mrkd-copies', '0'], 'mrkd copies must be >= 1'),
    (['--selfkd', 'mrkd', '--mrkd-interval', '0'], 'mrkd interval must be > 0'),
    (['--selfkd', 'mrkd', '--mrkd-interval=-5'], 'mrkd interval must be a whole number'),
    (['--selfkd', 'mrkd', '--mrkd-copy-mode', 'frozen'], "--mrkd-copy-mode: invalid choice: 'frozen' (choose from "),
    (['--selfkd', 'mrkd_tc', '--mrkd-tc-gamma', '1.5'], 'gamma must be'),
    (['--selfkd', 'pskd', '--pskd-topk', '5'], '--pskd-topk 5 is larger than the class count (4)'),
    (['--selfkd', 'pskd', '--pskd-alpha-t', '2'], 'alpha_t must be'),
])
def test_bad_input_is_one_line(image_folder, tmp_path, capsys, extra, expected):
    _fails(capsys, tmp_path, ['--data-dir', image_folder, '--model', 'test_resnet', '--img-size', '32', '-b', '8']
           + extra, expected)


def test_mrkd_tc_and_pskd_topk_train(image_folder, tmp_path):
    """One epoch each of MrKD-TC (train-mode copies, vmap) and top-k PS-KD."""
    main(train_args(image_folder, tmp_path / 'tc', '--selfkd', 'mrkd_tc', '--mrkd-tc-interval', '1',
                    '--mrkd-tc-copy-mode', 'train', '--mrkd-tc-batched', '--model', 'test_resnet',
                    '--img-size', '32'))
    assert float(read_summary(tmp_path / 'tc')[0]['train_loss_kd']) > 0
    main(train_args(image_folder, tmp_path / 'topk', *PSKD, '--pskd-topk', '2', '--model', 'test_resnet',
                    '--img-size', '32'))
    memory = _checkpoint(tmp_path / 'topk' / 'run' / 'last.pth.tar')['task_state']['memory']
    assert memory['values'].shape == memory['classes'].shape == (TRAIN_IMAGES, 2)


@pytest.mark.parametrize('name, method', [('mrkd', MRKD), ('pskd', PSKD)])
def test_torchrun_resume_is_bit_identical(image_folder, tmp_path, name, method):
    """Two processes (gloo): an uninterrupted two-epoch run with a recovery checkpoint every step, and a run
    resumed from its mid-epoch-1 one, end with the same weights and copies / memory, bit for bit."""
    torchrun(*train_args(image_folder, tmp_path / 'full', *method, *COMMON, '--recovery-interval', '1'))
    recovery = tmp_path / 'full' / 'run' / 'recovery-1-1.pth.tar'
    assert _checkpoint(recovery)['loop']['position']['step'] == 1  # of 2 steps per epoch and rank
    torchrun(*train_args(image_folder, tmp_path / 'resumed', *method, *COMMON, '--resume', str(recovery)))
    full = _checkpoint(tmp_path / 'full' / 'run' / 'checkpoint-1.pth.tar')
    _same_final_state(full, _checkpoint(tmp_path / 'resumed' / 'run' / 'checkpoint-1.pth.tar'), name)
    if name == 'mrkd':
        assert full['task_state']['num_steps'] == 2 * (TRAIN_IMAGES // 2 // 8)
    else:  # both ranks' rows reached rank 0's table (every image trained on once per epoch)
        values = full['task_state']['memory']['values']
        assert torch.allclose(values.float().sum(1), torch.ones(TRAIN_IMAGES), atol=3e-3)


def _same_final_state(full, resumed, name):
    for key, tensor in full['state_dict'].items():
        assert torch.equal(tensor, resumed['state_dict'][key]), key
    state, resumed_state = full['task_state'], resumed['task_state']
    if name == 'mrkd':
        assert state['num_steps'] == resumed_state['num_steps']
        for key, tensor in state['copies'].items():
            assert torch.equal(tensor, resumed_state['copies'][key]), key
    else:
        assert torch.equal(state['memory']['values'], resumed_state['memory']['values'])


@pytest.mark.parametrize('name, method', [('mrkd', MRKD), ('pskd', PSKD)])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(runs, image_folder, tmp_path, name, method):
    """A train.py process killed with SIGKILL in its first epoch, resumed from its last recovery checkpoint
    (`--recovery-interval 1`), ends with the weights, copies / memory of the uninterrupted run, bit for bit."""
    command = [sys.executable, os.path.join(REPO, 'train.py'),
               *train_args(image_folder, tmp_path / 'killed', *method, *COMMON, '--recovery-interval', '1')]
    log = open(tmp_path / 'killed.log', 'w')
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    pattern = str(tmp_path / 'killed' / 'run' / 'recovery-0-*.pth.tar')
    deadline = time.time() + 240
    while not glob.glob(pattern) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    status = process.wait()
    log.close()
    assert status == -signal.SIGKILL, (tmp_path / 'killed.log').read_text()[-2000:]
    assert not os.path.exists(tmp_path / 'killed' / 'run' / 'checkpoint-0.pth.tar')  # killed in epoch 0
    positions = {path: _checkpoint(path)['loop']['position'] for path in glob.glob(pattern)}
    latest = max(positions, key=lambda path: positions[path]['step'])
    assert 0 < positions[latest]['step'] < TRAIN_IMAGES // 8
    main(train_args(image_folder, tmp_path / 'resumed', *method, *COMMON, '--resume', latest))
    _same_final_state(_checkpoint(runs / name / 'run' / 'checkpoint-1.pth.tar'),
                      _checkpoint(tmp_path / 'resumed' / 'run' / 'checkpoint-1.pth.tar'), name)
