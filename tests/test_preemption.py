"""Preemption-safe training: signals, recovery checkpoints, exact resume, the non-finite guard, atomic saves and
one-line errors for bad checkpoints and output folders."""
import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest
import timm
import torch

from conftest import write_image_folder
from test_train import METHOD_ARGS
from compat_matrix import matrix_methods
from timm_selfkd.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOPPED = re.compile(r'^train\.py: stopped by (SIG\w+) at epoch (\d+) step (\d+)/(\d+); checkpoint (\S+); '
                     r'resume with: (.+)$')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """4 classes x 16 training images (8 plain steps of 8 per epoch), 4 x 4 validation images, 32x32."""
    root = tmp_path_factory.mktemp('preempt')
    write_image_folder(str(root / 'train'), 16, seed=0)
    write_image_folder(str(root / 'validation'), 4, seed=1)
    return str(root)


def run_args(data, output, experiment, method, workers=0, *extra):
    return ['--data-dir', data, '--output', str(output), '--experiment', experiment, '-b', '8', '--epochs', '2',
            '--warmup-epochs', '0', '--device', 'cpu', '-j', str(workers), '--lr', '0.02', '--img-size', '32',
            '--log-interval', '1', '--selfkd', method, '--model', 'test_resnet', '--drop', '0.1', '--reprob', '0.3',
            *extra]


def rows(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return [{k: v for k, v in row.items() if k != 'train_time'} for row in csv.DictReader(f)]


def assert_same_run(resumed, uninterrupted):
    """Bit-identical: every summary value but the time, the final weights, and the method's task state."""
    assert rows(resumed) == rows(uninterrupted)
    a = torch.load(os.path.join(resumed, 'last.pth.tar'), map_location='cpu', weights_only=False)
    b = torch.load(os.path.join(uninterrupted, 'last.pth.tar'), map_location='cpu', weights_only=False)
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for name, tensor in a['state_dict'].items():
        assert torch.equal(tensor, b['state_dict'][name]), name
    flat_a, flat_b = _tensors(a.get('task_state', {})), _tensors(b.get('task_state', {}))
    assert flat_a.keys() == flat_b.keys() and all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a)


def _tensors(tree, prefix=''):
    """Every tensor of a nested dict/list, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in _tensors(value, f'{prefix}/{key}').items()}


def start_in_own_group(argv, launcher=(sys.executable, 'train.py')):
    """train.py as the leader of a new process group (as a batch job's step is): its workers are in it too."""
    return subprocess.Popen([*launcher, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def run_until(process, after, action, timeout_s=300):
    """Read the output of `process` (the leader of its own process group) until a line holds `after`, call
    `action()`, read on to the end: (status, lines). A run still going after `timeout_s` is killed, its whole group
    (its lines then end the failure message)."""
    lines = []
    deadline = threading.Timer(timeout_s, os.killpg, (process.pid, signal.SIGKILL))
    deadline.start()
    try:
        for line in process.stdout:
            lines.append(line.rstrip('\n'))
            if action is not None and after in line:
                action()
                action = None
    finally:
        deadline.cancel()
    return process.wait(), lines


def signal_run(argv, sig, after='Train 0 [   2/', launcher=(sys.executable, 'train.py')):
    """Start train.py, send `sig` once the log shows `after`; return (exit status, output lines)."""
    process = start_in_own_group(argv, launcher)
    return run_until(process, after, lambda: process.send_signal(sig))


@pytest.mark.parametrize('method, workers, sig', [
    ('none', 2, signal.SIGINT),
    ('dlb', 0, signal.SIGTERM),
    ('bake', 2, signal.SIGTERM),
])
def test_signal_writes_recovery_checkpoint_and_resume_is_bit_identical(folder, tmp_path, method, workers, sig):
    """A real train.py process stops after the step in progress with one line naming the recovery checkpoint
    and the resume command; running that command finishes the run exactly as if it had never stopped."""
    status, lines = signal_run(run_args(folder, tmp_path, 'run', method, workers), sig)
    assert status == 128 + sig, '\n'.join(lines[-20:])
    (stopped,) = [STOPPED.match(line) for line in lines if STOPPED.match(line)]
    name, epoch, step, steps, path, command = stopped.groups()
    assert name == sig.name and epoch == '0' and 2 <= int(step) < int(steps)
    assert path == str(tmp_path / 'run' / f'recovery-0-{step}.pth.tar') and os.path.isfile(path)
    assert not any('Traceback' in line for line in lines)

    argv = shlex.split(command)
    assert argv[:2] == ['python', 'train.py'] and argv[-2:] == ['--resume', path]
    main(argv[2:])  # the printed command, continuing in the same folder
    main(run_args(folder, tmp_path, 'uninterrupted', method, workers))
    assert_same_run(tmp_path / 'run', tmp_path / 'uninterrupted')


def test_torchrun_one_sigterm_stops_both_ranks_at_the_same_step(folder, tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the step, rank 0 writes one recovery checkpoint
    holding both ranks' DLB state, and the resumed two-process run matches the uninterrupted one."""
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py')
    status, lines = signal_run(run_args(folder, tmp_path, 'run', 'dlb'), signal.SIGTERM, launcher=torchrun)
    stopped = [STOPPED.match(line) for line in lines if STOPPED.match(line)]
    assert len(stopped) == 1, '\n'.join(lines[-30:])  # rank 0 speaks for both
    path, command = stopped[0].group(5), stopped[0].group(6)
    # each rank says it received the signal; a rank's line may be lost when torchrun exits on its own signal, so
    # that both stopped is shown by the agreed step and both ranks' state in the one checkpoint (below)
    assert 1 <= sum('SIGTERM received' in line for line in lines) <= 2
    state = torch.load(path, map_location='cpu', weights_only=False)['task_state']
    assert state['last_logits'].shape[0] == 2  # both ranks' kept logits
    argv = shlex.split(command)
    assert argv[:3] == ['torchrun', '--nproc_per_node=2', 'train.py']
    for run in (argv[3:], run_args(folder, tmp_path, 'uninterrupted', 'dlb')):
        result = subprocess.run([*torchrun, *run], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / 'run', tmp_path / 'uninterrupted')


@pytest.mark.parametrize('method', matrix_methods())  # every method and the stacks the recipes use
@pytest.mark.parametrize('workers,mixup', [(0, []), (2, ['--mixup', '0.2', '--cutmix', '1.0'])],
                         ids=['workers0', 'workers2-mixup-cutmix'])
def test_every_method_resumes_exactly_from_recovery_and_epoch_checkpoints(folder, tmp_path, method, workers, mixup,
                                                                           matrix):
    """`--recovery-interval 5` leaves mid-epoch checkpoints in an uninterrupted run (timm keeps the last two);
    resuming the earliest of them ends bit-identical to it, in the main process and with two loader workers plus
    mixup and CutMix (each step's mix comes from its per-step seed, whoever mixes: timm's loader or the method);
    so does resuming the epoch-0 checkpoint (with workers and mixup). (The compatibility matrix's resume cell.)"""
    matrix.expect(method, 'resume')
    method_args = [*METHOD_ARGS.get(method, []), *mixup]  # the 4-class set needs TC's gamma above 1/4
    main(run_args(folder, tmp_path, 'full', method, workers, '--recovery-interval', '5', *method_args))
    recovery = sorted((f for f in os.listdir(tmp_path / 'full') if f.startswith('recovery-')),
                      key=lambda f: tuple(int(n) for n in re.findall(r'\d+', f)))
    assert len(recovery) == 2 and not recovery[0].endswith('-0.pth.tar')
    resumes = [('mid', recovery[0])] + ([('epoch', 'checkpoint-0.pth.tar')] if mixup else [])
    for name, checkpoint in resumes:
        main(run_args(folder, tmp_path, name, method, workers, '--resume', str(tmp_path / 'full' / checkpoint),
                      *method_args))
        first_epoch = int(re.findall(r'\d+', checkpoint)[0]) + (name == 'epoch')
        assert rows(tmp_path / name) == rows(tmp_path / 'full')[first_epoch:]
        assert_weights_equal(tmp_path / name, tmp_path / 'full')


def assert_weights_equal(a, b):
    sd_a = torch.load(a / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    sd_b = torch.load(b / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_b)


def _fails(capsys, argv, expected, status=2, output=None):
    """The run exits with `status`, one error line naming the problem, and (for usage errors) no output."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith('train.py')]
    assert len(err) == 1 and 'error:' in err[0] and expected in err[0], err
    if output is not None:
        assert not output.exists()
    return err[0]


@pytest.mark.parametrize('amp', [[], ['--amp', '--amp-dtype', 'bfloat16']])
def test_diverging_run_stops_at_the_first_non_finite_step(folder, tmp_path, capsys, amp):
    """fp32 and bf16: --lr 1e8 blows up; the run stops with one line naming epoch, step and term, exit 1, and
    the summary's last row says the run diverged."""
    argv = run_args(folder, tmp_path, 'run', 'dlb', 0, '--lr', '1e8', '--reprob', '0', *amp)
    line = _fails(capsys, argv, 'is not finite at epoch 0 step', status=1)
    assert 'the run diverged; last good checkpoint: none' in line
    (row,) = rows(tmp_path / 'run')
    assert row['status'] == 'diverged' and int(row['train_steps']) < 8
    assert not os.path.exists(tmp_path / 'run' / 'last.pth.tar')


def test_skip_mode_skips_a_non_finite_step_and_trains_on(folder, tmp_path, monkeypatch):
    """`--nonfinite skip`: a single NaN loss (step 3) is not applied; the run finishes with finite weights and
    reports the skipped step."""
    from timm_selfkd.methods.plain import PlainTask
    forward, calls = PlainTask.forward, []

    def one_nan(self, input, target):
        out = forward(self, input, target)
        calls.append(1)
        if len(calls) == 3:
            out['loss'] = out['loss'] * float('nan')
        return out

    monkeypatch.setattr(PlainTask, 'forward', one_nan)
    main(run_args(folder, tmp_path, 'run', 'none', 0, '--nonfinite', 'skip', '--epochs', '1'))
    (row,) = rows(tmp_path / 'run')
    assert row['status'] == 'ok' and row['train_skipped'] == '1' and row['train_steps'] == '8'
    weights = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_failed_save_keeps_the_previous_checkpoint(folder, tmp_path, capsys, monkeypatch):
    """A disk that fills up while writing epoch 1's checkpoint: one line, exit 1, and last.pth.tar is still
    epoch 0's complete checkpoint (no partial file left behind)."""
    import timm_selfkd.runtime.checkpoint as checkpoint
    save, calls = torch.save, []

    def disk_full(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b'partial')
            raise OSError(28, 'No space left on device')
        save(obj, f)

    monkeypatch.setattr(checkpoint.torch, 'save', disk_full)
    _fails(capsys, run_args(folder, tmp_path, 'run', 'none'), 'No space left on device', status=1)
    saved = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert saved['epoch'] == 0 and 'state_dict' in saved
    assert sorted(os.listdir(tmp_path / 'run')) == ['args.yaml', 'checkpoint-0.pth.tar', 'last.pth.tar',
                                                    'model_best.pth.tar', 'summary.csv']


@pytest.fixture(scope='module')
def dlb_checkpoint(folder, tmp_path_factory):
    """A one-epoch DLB run's checkpoint (test_resnet, 4 classes)."""
    output = tmp_path_factory.mktemp('ckpt')
    main(run_args(folder, output, 'run', 'dlb', 0, '--epochs', '1'))
    return output / 'run' / 'last.pth.tar'


def test_bad_checkpoints_are_one_line_errors(folder, tmp_path, capsys, dlb_checkpoint):
    out = tmp_path / 'out'
    truncated = tmp_path / 'truncated.pth.tar'
    truncated.write_bytes(dlb_checkpoint.read_bytes()[:5000])
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'not a checkpoint at all')
    weights_only = tmp_path / 'weights.pth'
    torch.save(timm.create_model('test_resnet', num_classes=4).state_dict(), weights_only)
    cases = [
        (['--resume', str(truncated)], 'is truncated or corrupt'),
        (['--resume', str(garbage)], 'is truncated or corrupt'),
        (['--resume', str(tmp_path / 'missing.pth.tar')], 'does not exist'),
        (['--resume', str(weights_only)], 'is not a training checkpoint'),
        (['--resume', str(dlb_checkpoint), '--selfkd', 'bake'], 'was trained with --selfkd dlb, not bake'),
        (['--resume', str(dlb_checkpoint), '--model', 'efficientnet_b0'], "is of model 'test_resnet'"),
        (['--resume', str(dlb_checkpoint), '--num-classes', '7'], 'does not fit test_resnet with 7 classes: size '
                                                                  'mismatch for fc.weight'),
        (['--initial-checkpoint', str(dlb_checkpoint), '--num-classes', '7'], 'does not fit test_resnet with 7'),
        (['--resume', str(dlb_checkpoint), '--initial-checkpoint', str(dlb_checkpoint)], 'exclude each other'),
    ]
    for extra, expected in cases:
        argv = run_args(folder, out, 'run', 'dlb') + extra
        _fails(capsys, argv, expected, output=out)


def test_output_folder_that_cannot_be_created(folder, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    _fails(capsys, run_args(folder, blocker / 'sub', 'run', 'none'), 'cannot write the output folder')


def test_initial_checkpoint_starts_a_new_method_from_trained_weights(folder, tmp_path, dlb_checkpoint):
    """The escape hatch the method-mismatch error names: BAKE from DLB's weights, a fresh optimizer and epoch."""
    main(run_args(folder, tmp_path, 'run', 'bake', 0, '--epochs', '1', '--initial-checkpoint', str(dlb_checkpoint),
                  '--lr', '0'))
    start = torch.load(dlb_checkpoint, map_location='cpu', weights_only=False)['state_dict']
    end = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)['state_dict']
    assert torch.equal(start['conv1.0.weight'], end['conv1.0.weight'])  # lr 0: the DLB weights, unchanged


def descendants(pid):
    """The processes below `pid` (from /proc), deepest last."""
    children = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    parent = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, queue = [], list(children.get(pid, []))
    while queue:
        found.append(queue.pop(0))
        queue += children.get(found[-1], [])
    return found


def test_torchrun_sigterm_to_every_process_stops_cleanly_and_resumes_exactly(folder, tmp_path):
    """As Slurm preempts a job: SIGTERM to the launcher, both ranks and their DataLoader workers at once (torchrun
    also forwards its own to the ranks). The ranks stop after the same step with one recovery checkpoint and one
    resume line, no worker turns it into a crash, and the resumed run matches the uninterrupted one."""
    torchrun = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py')
    process = start_in_own_group(run_args(folder, tmp_path, 'run', 'dlb', 2), torchrun)
    signalled = []

    def signal_every_process():
        signalled.extend([process.pid] + descendants(process.pid))
        for pid in signalled:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    _, lines = run_until(process, 'Train 0 [   2/', signal_every_process)
    assert len(signalled) >= 1 + 2 + 4, signalled  # launcher, two ranks, two workers each
    stopped = [STOPPED.match(line) for line in lines if STOPPED.match(line)]
    assert len(stopped) == 1, '\n'.join(lines[-40:])
    assert not any('DataLoader worker' in line or 'exited unexpectedly' in line for line in lines)
    path, command = stopped[0].group(5), stopped[0].group(6)
    assert os.path.isfile(path)
    argv = shlex.split(command)
    for run in (argv[3:], run_args(folder, tmp_path, 'uninterrupted', 'dlb', 2)):
        result = subprocess.run([*torchrun, *run], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / 'run', tmp_path / 'uninterrupted')
