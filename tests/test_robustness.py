"""Real schedulers and real data (issue 18): the PS-KD table's file is private, a checkpoint that cannot be
written is one line and leaves nothing half-written (also after a second signal, or a crash), the validation split
is read with the training split's class map, a signal to the whole process group (workers included) stops a run
as one to the main process does, and an epoch checkpoint resumes on another number of processes."""
import csv
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import write_image_folder
from test_preemption import STOPPED, assert_same_run, run_until, start_in_own_group
from timm_selfkd.runtime import checkpoint
from timm_selfkd.runtime.checkpoint import is_temporary, read_checkpoint
from timm_selfkd.runtime.run_guard import REPEAT_WINDOW_S
from timm_selfkd.train import Run, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the PS-KD table's file in /dev/shm is its owner's only --------------------------------------------------

def _shared_table_modes(rank, init_file, out_dir):
    """Create two shared tables (the node's two ranks map one file each time), under a umask that takes nothing
    away and under one that takes the owner's write bit; record the file's mode as each rank maps it."""
    from timm_selfkd.components import soft_target_memory
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    from_file, modes = torch.from_file, []

    def recording(path, *args, **kwargs):
        modes.append(stat.S_IMODE(os.stat(path).st_mode))
        return from_file(path, *args, **kwargs)

    soft_target_memory.torch.from_file = recording
    for umask in (0o000, 0o277):
        previous = os.umask(umask)
        table = soft_target_memory.shared_zeros((3, 4), torch.float16, local_rank=rank, local_world_size=2,
                                                tag=f'test-{umask:o}')
        os.umask(previous)
        table[rank] = rank + 1  # shared: each rank's row is seen by the other
        dist.barrier()
        modes.append(table.sum().item())
    torch.save(modes, f'{out_dir}/{rank}.pt')
    dist.destroy_process_group()


def test_pskd_shared_table_file_is_private_whatever_the_umask(tmp_path):
    mp.spawn(_shared_table_modes, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    for rank in range(2):
        modes = torch.load(tmp_path / f'{rank}.pt')
        assert modes == [0o600, 3 * 4, 0o600, 3 * 4], modes  # rw------- and a table the two ranks share
    if os.path.isdir('/dev/shm'):
        assert not [f for f in os.listdir('/dev/shm') if f.startswith('timm_selfkd-test-')]  # unlinked once mapped


# --- a checkpoint that cannot be written ---------------------------------------------------------------------

@pytest.fixture
def folder(small_image_folder):
    return small_image_folder


WRITE_ERROR = re.compile(r'train\.py: error: cannot write checkpoint (\S+): (.+) \(it needs (\d+) bytes[^,]*, '
                         r'(\d+) bytes.* free in (\S+)\)')


def run_args(data, output, experiment, *extra, workers=0, epochs=2, method='none'):
    return ['--data-dir', data, '--output', str(output), '--experiment', experiment, '-b', '8', '--epochs',
            str(epochs), '--warmup-epochs', '0', '--device', 'cpu', '-j', str(workers), '--lr', '0.02',
            '--img-size', '32', '--log-interval', '1', '--selfkd', method, '--model', 'test_resnet', *extra]


@pytest.fixture
def fresh_logging(monkeypatch):
    """No log handler of an earlier test (they write to that test's captured stderr, which is closed)."""
    monkeypatch.setattr(logging.root, 'handlers', [])


def error_line(capsys, argv, status):
    """Run train.py's main in-process: it exits with `status` and one `train.py: error:` line, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith('train.py')]
    assert len(lines) == 1 and lines[0].startswith('train.py: error: '), err[-3000:]
    assert 'Traceback' not in err
    return lines[0]


def leftovers(run_dir):
    return [name for name in os.listdir(run_dir) if is_temporary(name) or name.endswith('.tmp')]


class _FailingFile:
    """A file whose writes fail with `error` once `limit` bytes were written (the first `limit` do reach it)."""

    def __init__(self, file, error, limit):
        self.file, self.error, self.limit = file, error, limit

    def write(self, data):
        data = memoryview(data).cast('B')
        room = self.limit - self.file.tell()
        if room < len(data):
            self.file.write(data[:max(room, 0)])
            raise OSError(self.error, os.strerror(self.error))
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _fail_second_save(monkeypatch, make_failure):
    """From the second checkpoint save on (epoch 1's `last`), `make_failure(path, mode)` opens its file."""
    opened = []

    def failing_open(path, mode='r', *args, **kwargs):
        if 'w' in mode and is_temporary(path):
            opened.append(path)
            if len(opened) >= 2:
                return make_failure(path, mode, *args, **kwargs)
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(checkpoint, 'open', failing_open, raising=False)


def _disk_full(path, mode, *args, **kwargs):
    return _FailingFile(open(path, mode, *args, **kwargs), errno.ENOSPC, limit=100_000)


def _no_permission(path, mode, *args, **kwargs):  # a read-only folder (root ignores the mode bits: injected)
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _folder_gone(path, mode, *args, **kwargs):  # the folder is removed under the run (a lost scratch space)
    shutil.rmtree(os.path.dirname(path))
    return open(path, mode, *args, **kwargs)


@pytest.mark.parametrize('failure, reason', [(_disk_full, 'No space left on device'),
                                             (_no_permission, 'Permission denied'),
                                             (_folder_gone, 'No such file or directory')])
def test_unwritable_checkpoint_is_one_line_and_the_previous_one_stays(folder, tmp_path, capsys, monkeypatch,
                                                                     fresh_logging, failure, reason):
    """Epoch 1's checkpoint cannot be written: one line naming the file, the bytes it needs and the free space,
    exit 1, no traceback; epoch 0's checkpoint loads and no temporary file is left."""
    _fail_second_save(monkeypatch, failure)
    run_dir = tmp_path / 'run'
    line = error_line(capsys, run_args(folder, tmp_path, 'run'), status=1)
    match = WRITE_ERROR.match(line)
    assert match, line
    path, why, needed, free, where = match.groups()
    assert path == str(run_dir / 'last.pth.tar') and why == reason
    if failure is _folder_gone:
        assert where == str(tmp_path) and line.endswith(f'the folder {run_dir} is gone; the previous checkpoint is '
                                                        'intact: none')
        return
    assert where == str(run_dir) and line.endswith(f'the previous checkpoint is intact: {run_dir / "last.pth.tar"}')
    saved = read_checkpoint(str(run_dir / 'last.pth.tar'))
    assert saved['epoch'] == 0 and int(needed) == pytest.approx(os.path.getsize(run_dir / 'last.pth.tar'), rel=0.01)
    assert leftovers(run_dir) == []
    for name in ('checkpoint-0.pth.tar', 'model_best.pth.tar'):
        assert read_checkpoint(str(run_dir / name))['epoch'] == 0


def train_py(argv, **kwargs):
    """A real train.py process (its output lines, merged)."""
    return subprocess.Popen([sys.executable, 'train.py', *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of a given size (root with CAP_SYS_ADMIN only; else the test is skipped)."""
    mounted = []

    def mount(size):
        point = tmp_path / 'tmpfs'
        point.mkdir()
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(point)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f'cannot mount a tmpfs here: {result.stderr.strip()}')
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(['umount', str(point)], check=True)


def test_full_disk_is_one_line_in_a_real_process(folder, tmp_path, small_tmpfs):
    """The issue's case: the output on a tmpfs with room for one checkpoint and half of the next. A real train.py
    stops at epoch 1's checkpoint with one line (no torch 'unexpected pos' traceback), exit 1; epoch 0's
    checkpoint loads and the half-written temporary file is gone."""
    main(run_args(folder, tmp_path, 'sizing', epochs=1))
    size = os.path.getsize(tmp_path / 'sizing' / 'last.pth.tar')
    disk = small_tmpfs(size * 3 // 2 + 64 * 1024)
    process = train_py(run_args(folder, disk, 'run'))
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 1, out[-3000:]
    (line,) = [line for line in out.splitlines() if line.startswith('train.py')]
    path, why, needed, free, where = WRITE_ERROR.match(line).groups()
    assert (path, why, where) == (str(disk / 'run' / 'last.pth.tar'), 'No space left on device', str(disk / 'run'))
    assert int(needed) > int(free) and 'Traceback' not in out
    assert read_checkpoint(str(disk / 'run' / 'last.pth.tar'))['epoch'] == 0
    assert leftovers(disk / 'run') == []


def test_second_signal_during_a_save_leaves_no_temporary_file(folder, tmp_path):
    """SIGTERM, then another while the recovery checkpoint is being written (the write is held half-way): the run
    exits at once with 143 and removes the half-written file."""
    driver = tmp_path / 'slow_save.py'
    driver.write_text(SLOW_SAVE)
    process = subprocess.Popen([sys.executable, str(driver), *run_args(folder, tmp_path, 'run', epochs=1)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, first = [], 0.
    for line in process.stdout:
        lines.append(line.rstrip('\n'))
        if 'Train 0 [   2/' in line:
            process.send_signal(signal.SIGTERM)
            first = time.monotonic()
        if 'HALF WRITTEN' in line:  # a second request, not the first one delivered twice
            time.sleep(max(0., REPEAT_WINDOW_S + 0.2 - (time.monotonic() - first)))
            process.send_signal(signal.SIGTERM)
            break
    out, _ = process.communicate(timeout=120)
    lines += out.splitlines()
    assert process.returncode == 128 + signal.SIGTERM, '\n'.join(lines[-20:])
    assert any('HALF WRITTEN' in line for line in lines) and not any('Traceback' in line for line in lines)
    # the exit at once leaves the run's lock file (no process holds its lock any more: run_folder.FolderLock)
    assert sorted(os.listdir(tmp_path / 'run')) == ['.lock', 'args.yaml']


SLOW_SAVE = '''
import os, sys, time
from timm_selfkd.runtime import checkpoint
from timm_selfkd.train import main


class Slow:
    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data)
        self.file.flush()
        print('HALF WRITTEN', flush=True)
        time.sleep(60)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


checkpoint.open = lambda path, mode='r': Slow(open(path, mode)) if checkpoint.is_temporary(path) else open(path, mode)
main(sys.argv[1:])
'''


def test_stale_temporary_files_are_removed_and_never_loaded(folder, tmp_path, capsys, fresh_logging):
    """A run killed mid-save left its temporary files: resuming one is refused in one line, and the next start
    in that folder removes them."""
    main(run_args(folder, tmp_path, 'run', epochs=1))
    run_dir = tmp_path / 'run'
    shutil.copy(run_dir / 'last.pth.tar', run_dir / 'recovery_tmp.pth.tar')  # complete, yet never a checkpoint
    (run_dir / 'tmp.pth.tar').write_bytes(b'half')
    (run_dir / 'checkpoint-0.pth.tar.tmp').write_bytes(b'half')
    line = error_line(capsys, run_args(folder, tmp_path, 'run', '--resume', str(run_dir / 'recovery_tmp.pth.tar')),
                      status=2)
    assert 'is the temporary file of a checkpoint save that did not finish' in line
    main(run_args(folder, tmp_path, 'run', '--resume', str(run_dir / 'last.pth.tar')))
    assert leftovers(run_dir) == []
    assert read_checkpoint(str(run_dir / 'last.pth.tar'))['epoch'] == 1


# --- the validation split is labelled by the training split's class folders -------------------------------------

def split_data(root, layout, val_classes):
    """`train` with class_0..class_3 (4 images each) and `validation` with the classes `val_classes` (2 each), as
    image folders or as one tar file per split; returns train.py's data arguments."""
    for split, classes, count in (('train', range(4), 4), ('validation', val_classes, 2)):
        write_image_folder(str(root / 'src' / split), [count if k in classes else 0 for k in range(max(classes) + 1)])
        for k in set(range(max(classes) + 1)) - set(classes):
            shutil.rmtree(root / 'src' / split / f'class_{k}')
        if layout == 'tar':
            with tarfile.open(root / f'{split}.tar', 'w') as tar:
                for name in sorted(os.listdir(root / 'src' / split)):
                    tar.add(root / 'src' / split / name, arcname=name)
    if layout == 'tar':
        return ['--data-dir', str(root), '--train-split', 'train.tar', '--val-split', 'validation.tar']
    return ['--data-dir', str(root / 'src')]


def labels_by_class(dataset):
    """{class folder: label} over the images of a timm folder or tar data set."""
    reader = dataset.reader
    if hasattr(reader, 'targets'):  # tar: (member, tar, child tar) samples
        pairs = [(sample[0].name, target) for sample, target in zip(reader.samples, reader.targets)]
    else:
        pairs = reader.samples
    return {os.path.basename(os.path.dirname(path)): int(label) for path, label in pairs}


@pytest.mark.parametrize('layout', ['folder', 'tar'])
def test_validation_missing_a_class_keeps_the_training_labels(tmp_path, capsys, monkeypatch, fresh_logging, layout):
    """Validation lacks class_0: classes 1-3 are evaluated with labels 1-3 (timm would give them 0-2), and the log
    says which class is missing."""
    data = split_data(tmp_path, layout, val_classes=[1, 2, 3])
    seen, validate = [], Run.validate

    def recording(self, ema=False):
        seen.append(labels_by_class(self.s.eval_dataset))
        return validate(self, ema)

    monkeypatch.setattr(Run, 'validate', recording)
    main(run_args('', tmp_path / 'out', 'run', *data, epochs=1)[2:])
    assert seen == [{'class_1': 1, 'class_2': 2, 'class_3': 3}]
    err = capsys.readouterr().err
    assert re.search(r"the 'validation(\.tar)?' split \(.*\) lacks 1 of the 4 training classes: class_0; "
                     r"evaluating its 3 "
                     r"classes with their training labels", err), err[-2000:]


@pytest.mark.parametrize('layout', ['folder', 'tar'])
def test_validation_class_that_training_lacks_is_a_one_line_error(tmp_path, capsys, fresh_logging, layout):
    data = split_data(tmp_path, layout, val_classes=[0, 1, 2, 3, 5])
    line = error_line(capsys, run_args('', tmp_path / 'out', 'run', *data, epochs=1)[2:], status=2)
    assert re.search(r"the 'validation(\.tar)?' split", line)
    assert 'has 1 class folder(s) the training split lacks: class_5;' in line
    assert not (tmp_path / 'out').exists()


# --- a stop signal to the whole process group ------------------------------------------------------------------

@pytest.fixture(scope='module')
def long_folder(tmp_path_factory):
    """4 classes x 16 training images: 8 steps of 8 per epoch, time enough to signal the run mid-epoch."""
    root = tmp_path_factory.mktemp('group')
    write_image_folder(str(root / 'train'), 16, seed=0)
    write_image_folder(str(root / 'validation'), 2, seed=1)
    return str(root)


def children(pid):
    """The DataLoader workers of process `pid` (its forked children; not multiprocessing's resource tracker)."""
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        pids = [int(child) for child in f.read().split()]
    return [child for child in pids if b'resource_tracker' not in open(f'/proc/{child}/cmdline', 'rb').read()]


@pytest.mark.parametrize('method, sig', [('dlb', signal.SIGTERM), ('none', signal.SIGINT)])
def test_signal_to_the_process_group_stops_cleanly_and_resumes_exactly(long_folder, tmp_path, method, sig):
    """SIGTERM (Slurm, timeout, a container runtime) or SIGINT (Ctrl-C) to the run's whole process group, its two
    DataLoader workers included: a recovery checkpoint, one line with the resume command, exit 128 + signal, no
    traceback; the printed command finishes the run bit-identical to an uninterrupted one."""
    process = start_in_own_group(run_args(long_folder, tmp_path, 'run', workers=2, method=method))
    workers = []

    def signal_the_group():
        workers.extend(children(process.pid))
        os.killpg(process.pid, sig)

    status, lines = run_until(process, 'Train 0 [   2/', signal_the_group)
    assert len(workers) == 2  # the two training workers were running, and got the signal too
    assert status == 128 + sig, '\n'.join(lines[-20:])
    assert not any('Traceback' in line or 'DataLoader worker' in line for line in lines), '\n'.join(lines[-20:])
    (stopped,) = [STOPPED.match(line) for line in lines if STOPPED.match(line)]
    name, epoch, step, steps, path, command = stopped.groups()
    assert name == sig.name and epoch == '0' and int(step) < int(steps) and os.path.isfile(path)
    argv = shlex.split(command)
    main(argv[2:])  # the printed command, continuing in the same folder
    main(run_args(long_folder, tmp_path, 'uninterrupted', workers=2, method=method))
    assert_same_run(tmp_path / 'run', tmp_path / 'uninterrupted')


def test_a_worker_killed_otherwise_is_a_one_line_error(long_folder, tmp_path):
    """A worker that dies of something else (here SIGKILL, as from the OOM killer) is still an error: exit 1 and one
    line naming the worker and the last checkpoint, no traceback. The loader finds the death when it next needs
    that worker's batch: at once, or after the batches the worker had already sent (then past a checkpoint)."""
    process = start_in_own_group(run_args(long_folder, tmp_path, 'run', workers=2))
    killed = []

    def kill_a_worker():
        killed.append(children(process.pid)[0])
        os.kill(killed[0], signal.SIGKILL)

    status, lines = run_until(process, 'Train 0 [   2/', kill_a_worker)
    assert status == 1, '\n'.join(lines[-20:])
    errors = [line for line in lines if line.startswith('train.py')]
    assert len(errors) == 1, '\n'.join(lines[-20:])
    named = re.match(r'train\.py: error: DataLoader worker \(pid\(?s?\)? (\d+)\) .*; last checkpoint: (.*)$', errors[0])
    assert named and int(named[1]) == killed[0], errors[0]
    assert named[2] == 'none' or os.path.isfile(named[2]), errors[0]
    assert not any('Traceback' in line for line in lines), '\n'.join(lines[-20:])


INJECTED_ERROR = """
import sys
from timm_selfkd import train
step = train.Run._optimizer_step
def failing_third_update(self, calls=[]):
    calls.append(1)
    if len(calls) == 3:
        raise ValueError('injected at the third update')
    step(self)
train.Run._optimizer_step = failing_third_update
train.main(sys.argv[1:])
"""


def test_an_error_escaping_the_loop_ends_the_process_despite_live_workers(long_folder, tmp_path):
    """An exception out of the loop mid-epoch ends the process (status 1, its traceback) instead of leaving it
    waiting at exit for its two DataLoader workers: they ignore SIGTERM, which multiprocessing's exit hook sends."""
    result = subprocess.run([sys.executable, '-c', INJECTED_ERROR, *run_args(long_folder, tmp_path, 'run', workers=2)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.rstrip().endswith('ValueError: injected at the third update'), result.stderr[-2000:]


# --- resuming on another number of processes ------------------------------------------------------------------

TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', 'train.py')


def torchrun(argv):
    result = subprocess.run([*TORCHRUN, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_epoch_checkpoint_resumes_on_another_world_size(folder, tmp_path, capsys, fresh_logging):
    """DLB, one process -> two (torchrun) -> one: each epoch checkpoint resumes, saying the run is not bit-identical
    any more and that DLB's kept logits (per process) are dropped; a mid-epoch recovery checkpoint of two processes
    resumed by one, or with another batch size, is refused in one line naming the way out."""
    main(run_args(folder, tmp_path, 'one', epochs=1, method='dlb'))
    err = torchrun(run_args(folder, tmp_path, 'two', '--resume', str(tmp_path / 'one' / 'last.pth.tar'),
                            '--recovery-interval', '1', epochs=2, method='dlb'))
    assert 'written by 1 process(es) with -b 8, on 2 with -b 8: the batches differ from here on, so the run is not ' \
           'bit-identical' in err
    assert err.count('DLB: the saved last-batch logits') == 2  # each rank says it drops them
    assert [row['epoch'] for row in csv.DictReader(open(tmp_path / 'two' / 'summary.csv'))] == ['1']
    recovery = sorted(name for name in os.listdir(tmp_path / 'two') if name.startswith('recovery-'))[0]

    capsys.readouterr()
    main(run_args(folder, tmp_path, 'back', '--resume', str(tmp_path / 'two' / 'last.pth.tar'), epochs=3,
                  method='dlb'))
    assert 'written by 2 process(es) with -b 8, on 1 with -b 8' in capsys.readouterr().err
    assert read_checkpoint(str(tmp_path / 'back' / 'last.pth.tar'))['epoch'] == 2

    line = error_line(capsys, run_args(folder, tmp_path, 'refused', '--resume', str(tmp_path / 'two' / recovery),
                                       method='dlb'), status=2)
    assert 'was written by 2 processes and this run has 1: resume it with as many, or resume the last epoch ' \
           'checkpoint' in line
    main(run_args(folder, tmp_path, 'mid', '--recovery-interval', '2', epochs=1))
    line = error_line(capsys, run_args(folder, tmp_path, 'refused', '--resume', str(tmp_path / 'mid' /
                                                                                    'recovery-0-2.pth.tar'), '-b', '4'),
                      status=2)
    assert 'written with -b 8 per process and this run has -b 4' in line
    assert not (tmp_path / 'refused').exists()
