"""Runs a user can trust (issue 23): the step and epoch log lines, run folders that are never overwritten and held
by one run at a time, `--resume auto`, and the bookkeeping of steps, images and classes."""
import csv
import os
import re
import signal
import time

import numpy as np
import pytest
import timm
import torch

from conftest import write_image_folder
from test_preemption import assert_same_run, run_until, start_in_own_group
from test_robustness import error_line, fresh_logging  # noqa: F401 (a fixture)
from timm_selfkd import create_task, list_methods
from timm_selfkd.cli import parse_args
from timm_selfkd.registry import get_method, build_hparams
from timm_selfkd.runtime.batch_stream import BatchStream
from timm_selfkd.runtime.progress import StepMeter
from timm_selfkd.runtime.run_folder import FolderLock
from timm_selfkd.train import Setup, main
from timm_selfkd.wiring import batch_sampler

pytestmark = pytest.mark.usefixtures('fresh_logging')


@pytest.fixture
def folder(small_image_folder):
    return small_image_folder


def run_args(data, output, experiment, *extra, method='dlb', epochs=1, workers=0):
    return ['--data-dir', data, '--output', str(output), '--experiment', experiment, '-b', '8', '--epochs',
            str(epochs), '--warmup-epochs', '0', '--device', 'cpu', '-j', str(workers), '--lr', '0.02',
            '--img-size', '32', '--log-interval', '1', '--selfkd', method, '--model', 'test_resnet', *extra]


def summary(run_dir):
    with open(os.path.join(run_dir, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def snapshot(path):
    """Every file under `path`: its modification time and bytes."""
    return {os.path.relpath(os.path.join(root, name), path): (os.stat(os.path.join(root, name)).st_mtime_ns,
                                                              open(os.path.join(root, name), 'rb').read())
            for root, _, names in os.walk(path) for name in names}


# --- the step and epoch lines ----------------------------------------------------------------------------------

STEP = re.compile(r'^Train (\d+) \[ *(\d+)/(\d+) +(\d+)%\]  loss .*  lr (\S+)  ([\d.]+) img/s \(([\d.]+) img/s all\)  '
                  r'data ([\d.]+)s/step  ([\d.]+)s$')
EPOCH = re.compile(r'^Epoch (\d+) took ([\d.]+)s \(training ([\d.]+)s\); estimated time left ([\d.]+)s \((\d+) more '
                   r'epochs? at the mean epoch time ([\d.]+)s\)$')


def test_log_lines_carry_throughput_position_and_time_left(folder, tmp_path, caplog):
    """DLB, 2 epochs: every step line has the position (its last one at 100%), the learning rate, images per second
    of this process and of all (one here), the loader wait; the steps announced are the steps run (epoch 0 one
    shorter), as `train_steps` says; each epoch line gives its time and the time left (mean epoch time x epochs
    left: 0 at the end)."""
    caplog.set_level('INFO', logger='train')
    main(run_args(folder, tmp_path, 'run', epochs=2))
    messages = [record.getMessage() for record in caplog.records]
    assert any('8 steps per epoch (7 in epoch 0)' in message for message in messages)
    steps = [STEP.match(message) for message in messages if message.startswith('Train ')]
    assert steps and all(steps), [message for message in messages if message.startswith('Train ')][:3]
    rows = summary(tmp_path / 'run')
    for epoch, row in enumerate(rows):
        lines = [m for m in steps if int(m[1]) == epoch]
        announced = {int(m[3]) for m in lines}
        assert announced == {int(row['train_steps'])} == {7 if epoch == 0 else 8}
        assert [int(m[2]) for m in lines] == list(range(1, len(lines) + 1))
        assert [int(m[4]) for m in lines] == [round(100 * (i + 1) / len(lines)) for i in range(len(lines))]
        assert lines[-1][4] == '100'
        for m in lines:
            rate, rate_all, wait = float(m[6]), float(m[7]), float(m[8])
            assert rate > 0 and rate_all == rate and wait >= 0 and float(m[5]) == pytest.approx(float(row['lr']), rel=1e-3)
    ends = [EPOCH.match(message) for message in messages if message.startswith('Epoch ')]
    assert len(ends) == 2 and all(ends)
    took = [float(m[2]) for m in ends]
    assert [int(m[5]) for m in ends] == [1, 0]
    assert float(ends[0][4]) == pytest.approx(took[0], abs=0.11)  # one epoch left at epoch 0's time
    assert float(ends[1][4]) == 0 and float(ends[1][6]) == pytest.approx(sum(took) / 2, abs=0.11)
    assert all(float(m[2]) >= float(m[3]) > 0 for m in ends)  # the wall time holds the training time


def test_step_meter_rates_and_loader_wait(monkeypatch):
    """Host clocks only: 3 batches, each waited for 0.5 s and trained 1.5 s, of 8 rows on one of 4 processes:
    8 * 3 / 6 s = 4 img/s here, 16 in all, 0.5 s per step waiting."""
    now = [0.0]
    monkeypatch.setattr(time, 'perf_counter', lambda: now[0])

    class Slow:
        def __iter__(self):
            for _ in range(3):
                now[0] += 0.5
                yield 'batch'

    meter = StepMeter(world_size=4)
    for _ in meter.batches(Slow()):
        now[0] += 1.5
        meter.count(8)
    assert meter.text() == '4.0 img/s (16.0 img/s all)  data 0.500s/step'
    now[0] += 2.0
    assert meter.text() == '0.0 img/s (0.0 img/s all)  data 0.000s/step'  # started over


# --- run folders --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('held', [['summary.csv'], ['last.pth.tar'], ['recovery-0-3.pth.tar'],
                                  ['model_best.pth.tar', 'args.yaml']])
def test_a_new_run_into_a_folder_holding_a_run_is_refused(folder, tmp_path, capsys, held):
    """A summary or any checkpoint makes a run (a temporary file of a save or args.yaml alone does not): one line
    naming the folder and both ways on, exit 2, before anything is built; the folder is as it was."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    for name in held + ['tmp.pth.tar']:
        (run_dir / name).write_bytes(b'an earlier run')
    before = snapshot(run_dir)
    line = error_line(capsys, run_args(folder, tmp_path, 'run'), 2)
    assert line == (f'train.py: error: {run_dir} already holds a run ({", ".join(n for n in held if n != "args.yaml")}'
                    '): continue it with --resume auto (or --resume FILE), or start a new run with another '
                    '--experiment')
    assert snapshot(run_dir) == before


def test_a_folder_with_only_the_arguments_of_a_run_that_ended_early_is_reused(folder, tmp_path):
    """A run killed before its first checkpoint left args.yaml (and a .lock no process holds): a new run starts."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'args.yaml').write_text('selfkd: none\n')
    (run_dir / '.lock').write_text('pid 1 on elsewhere\n')
    main(run_args(folder, tmp_path, 'run', '--lr', '0'))
    assert [row['epoch'] for row in summary(run_dir)] == ['0']
    assert 'selfkd: dlb' in (run_dir / 'args.yaml').read_text() and not (run_dir / '.lock').exists()


def test_a_folder_lock_is_released_by_the_holder_and_by_its_death(tmp_path):
    """Held: a second holder is refused naming the first; released (also by a process that dies holding it, whose
    file stays): the next one holds it."""
    first = FolderLock(str(tmp_path))
    first.acquire()
    with pytest.raises(ValueError, match=rf'another run \(pid {os.getpid()} on .+\) is writing {tmp_path}: wait for '
                                         r'it to end, or start this one with another --experiment'):
        FolderLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / '.lock').exists()
    child = os.fork()
    if child == 0:  # holds the lock and dies without releasing it
        FolderLock(str(tmp_path)).acquire()
        os._exit(0)
    os.waitpid(child, 0)
    assert (tmp_path / '.lock').read_text().startswith(f'pid {child} ')
    again = FolderLock(str(tmp_path))
    again.acquire()
    again.release()


def test_resume_auto_starts_refuses_a_second_start_and_continues_exactly(folder, tmp_path, capsys, caplog):
    """The one command a scheduler requeues: `--resume auto` starts the run (no folder yet); the same command
    started again while the first runs is refused in one line naming it; after a SIGTERM the same command continues
    at the recovery checkpoint and ends bit-identical to an uninterrupted run; once the run is complete it does
    nothing (a damaged newer checkpoint is skipped with a warning)."""
    argv = run_args(folder, tmp_path, 'run', '--resume', 'auto')
    process = start_in_own_group(argv)
    refused = []

    def second_start_then_stop():
        os.kill(process.pid, signal.SIGSTOP)  # the first run holds the folder, mid-epoch
        refused.append(error_line(capsys, argv, 2))
        os.kill(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGCONT)

    status, lines = run_until(process, 'Train 0 [   2/', second_start_then_stop)
    assert status == 128 + signal.SIGTERM, '\n'.join(lines[-20:])
    assert refused == [f'train.py: error: another run (pid {process.pid} on {os.uname().nodename}) is writing '
                       f'{tmp_path / "run"}: wait for it to end, or start this one with another --experiment']
    assert any('--resume auto: no checkpoint in' in line for line in lines)
    (recovery,) = [name for name in os.listdir(tmp_path / 'run') if name.startswith('recovery-')]

    caplog.set_level('INFO')
    main(argv)  # the requeued command
    assert any(f'Resumed {tmp_path / "run" / recovery} at epoch 0' in r.getMessage() for r in caplog.records)
    main(run_args(folder, tmp_path, 'uninterrupted'))
    assert_same_run(tmp_path / 'run', tmp_path / 'uninterrupted')

    (tmp_path / 'run' / 'recovery-5-1.pth.tar').write_bytes((tmp_path / 'run' / 'last.pth.tar').read_bytes()[:4000])
    before = summary(tmp_path / 'run')
    caplog.clear()
    main(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("--resume auto: skipping a checkpoint that does not load: checkpoint "
                            f"'{tmp_path / 'run' / 'recovery-5-1.pth.tar'}' is truncated or corrupt")
               for m in messages), messages
    assert any(m.endswith('at epoch 1, step 0; every epoch is trained, nothing is left to do') for m in messages)
    assert summary(tmp_path / 'run') == before


def test_resume_auto_needs_the_run_s_folder_and_a_checkpoint_that_loads(folder, tmp_path, capsys):
    line = error_line(capsys, run_args(folder, tmp_path, '', '--resume', 'auto'), 2)
    assert line.endswith('--resume auto needs --experiment NAME: it continues the run in --output/NAME')
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'summary.csv').write_text('epoch,status\n0,diverged\n')
    (run_dir / 'last.pth.tar').write_bytes(b'truncated')
    line = error_line(capsys, run_args(folder, tmp_path, 'run', '--resume', 'auto'), 2)
    assert line.endswith(f'--resume auto: {run_dir} holds a run (last.pth.tar, summary.csv) but no checkpoint that '
                         'loads to continue it: start a new run with another --experiment')


# --- steps, images and classes ------------------------------------------------------------------------------------

def _own_batches(name):
    spec = get_method(name)
    return spec.task_cls.requirements(build_hparams(spec, {})).own_batches


@pytest.mark.parametrize('method', [m for m in list_methods() if m == 'none' or _own_batches(m)] + ['ddgsd+dlb'])
@pytest.mark.parametrize('images', [8, 13, 30])
def test_an_epoch_runs_the_steps_it_announces(method, images):
    """Each method's batches (the sampler `train.py` wraps in its stream): every epoch's announced length is what
    it yields, from its start or from a resumed step, on sizes that leave a remainder."""
    labels = np.arange(images) % 4
    torch.manual_seed(0)
    task = create_task(method, timm.create_model('test_resnet', num_classes=4), num_epochs=3, steps_per_epoch=4,
                       num_samples=images, batch_size=4)
    stream = BatchStream(batch_sampler(task, labels, batch_size=4), seed=0)
    for epoch in range(3):
        stream.start_at(epoch, 0)
        announced = len(stream)
        assert announced > 0 and sum(1 for _ in stream) == announced, epoch
        stream.start_at(epoch, 1)
        assert sum(1 for _ in stream) == announced - 1, epoch


def test_an_unreadable_image_is_named_once_and_not_counted(folder, tmp_path, caplog, capfd):
    """One of 32 training images is not an image: with two loader workers, over two epochs, one warning names it,
    timm's warning at every read is gone, and each epoch trained 4 full steps of which 31 rows are images."""
    data = tmp_path / 'data'
    write_image_folder(str(data / 'train'), 8, seed=0)
    write_image_folder(str(data / 'validation'), 2, seed=1)
    broken = data / 'train' / 'class_2' / '5.png'
    broken.write_bytes(b'not a png')
    caplog.set_level('WARNING')
    main(run_args(str(data), tmp_path, 'run', method='none', epochs=2, workers=2))
    named = [r.getMessage() for r in caplog.records if 'cannot read training image' in r.getMessage()]
    assert named == [f"cannot read training image {broken} (cannot identify image file '{broken}'): each read of it is "
                     'replaced by the next image, and not counted in train_images']
    assert 'Skipped sample' not in capfd.readouterr().err
    assert [(row['train_steps'], row['train_images']) for row in summary(tmp_path / 'run')] == [('4', '31.0')] * 2


def _setup(tmp_path, *extra):
    return Setup(parse_args(run_args(str(tmp_path / 'data'), tmp_path, 'run', *extra)))


@pytest.mark.parametrize('extra, classes', [([], 3), (['--num-classes', '4'], 4), (['--class-map', 'MAP'], 4)])
def test_an_empty_class_folder_is_named_and_counted_only_when_asked(tmp_path, caplog, extra, classes):
    """class_1 has no image: one warning names it. timm's reader leaves it out of the class map, so the model has
    the 3 classes with images, labelled 0-2; --num-classes 4 gives it 4 outputs (the labels stay); a class map
    listing every folder keeps class_1's label 1 and counts it."""
    write_image_folder(str(tmp_path / 'data' / 'train'), [4, 0, 4, 4])
    write_image_folder(str(tmp_path / 'data' / 'validation'), [2, 0, 2, 2])
    (tmp_path / 'data' / 'validation' / 'class_1').rmdir()
    class_map = tmp_path / 'classes.txt'
    class_map.write_text(''.join(f'class_{k}\n' for k in range(4)))
    caplog.set_level('WARNING')
    s = _setup(tmp_path, *[str(class_map) if value == 'MAP' else value for value in extra])
    warned = [r.getMessage() for r in caplog.records if 'without images' in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"the 'train' split ({tmp_path / 'data' / 'train'}) has 1 class "
                                                     'folder(s) without images: class_1; ')
    assert s.model.num_classes == classes
    labels = {os.path.basename(os.path.dirname(path)): label for path, label in s.train_dataset.reader.samples}
    assert labels == ({'class_0': 0, 'class_2': 2, 'class_3': 3} if extra[:1] == ['--class-map'] else
                      {'class_0': 0, 'class_2': 1, 'class_3': 2})
