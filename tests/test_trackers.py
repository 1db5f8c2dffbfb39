"""wandb (offline) and TensorBoard from train.py, read back from the files they write: the run's options, every
summary.csv row, the loss terms at each log interval, and the wandb run a resumed run continues."""
import csv
import os
import sys

import pytest
import torch

from timm_selfkd.cli import parse_args
from timm_selfkd.runtime.trackers import RunLog
from timm_selfkd.train import main

from wandb_files import offline_wandb, wandb_runs  # noqa: F401 (a fixture)

pytest.importorskip('wandb', reason='the wandb extra is not installed (pip install -e ".[test]")')
pytest.importorskip('tensorboard', reason='the tensorboard extra is not installed (pip install -e ".[test]")')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def train_args(data_dir, output, experiment, *extra):
    return ['--data-dir', data_dir, '--output', str(output), '--experiment', experiment, '--model', 'test_resnet',
            '--img-size', '32', '--selfkd', 'dlb', '-b', '8', '--epochs', '2', '--warmup-epochs', '0',
            '--device', 'cpu', '-j', '0', '--lr', '0.01', *extra]


def read_summary(folder):
    with open(os.path.join(folder, 'summary.csv')) as f:
        return list(csv.DictReader(f))


def same_row(logged, row):
    """A logged row holds exactly the summary.csv row's columns and values (the csv has them as text)."""
    assert set(logged) == set(row), set(logged) ^ set(row)
    for key, text in row.items():
        value = logged[key]
        assert value == text if isinstance(value, str) else value == pytest.approx(float(text), rel=1e-6), key


def test_wandb_logs_the_options_and_every_summary_row_and_a_resumed_run_continues_it(image_folder, tmp_path,
                                                                                      offline_wandb):
    main(train_args(image_folder, tmp_path, 'run', '--log-wandb', '--wandb-project', 'selfkd-tests',
                    '--wandb-tags', 'dlb', 'tiny'))
    (run,) = wandb_runs(offline_wandb)
    assert (run['project'], run['name'], run['tags'], run['exit_code']) == ('selfkd-tests', 'run', ['dlb', 'tiny'], 0)
    config = run['config']
    assert (config['model'], config['selfkd'], config['lr'], config['epochs']) == ('test_resnet', 'dlb', 0.01, 2)
    assert config['selfkd_hparams'] == {'alpha': 1.0, 'temperature': 3.0}  # the paper's defaults, resolved
    summary = read_summary(tmp_path / 'run')
    assert len(run['history']) == 2 and 'train_loss_kd' in summary[0] and 'eval_ece' in summary[0]
    for logged, row in zip(run['history'], summary):
        same_row(logged, row)
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint-0.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['loop']['log'] == {'wandb_id': run['id']}

    # resumed from epoch 0 (no id given): the same wandb run gets epoch 1; TensorBoard into a folder of its own
    main(train_args(image_folder, tmp_path, 'again', '--log-wandb', '--resume',
                    str(tmp_path / 'run' / 'checkpoint-0.pth.tar'), '--log-tensorboard', str(tmp_path / 'tb')))
    first, resumed = wandb_runs(offline_wandb)
    assert first['id'] == run['id'] and resumed['id'] == run['id']
    (row,) = read_summary(tmp_path / 'again')
    assert row['epoch'] == '1' and len(resumed['history']) == 1
    same_row(resumed['history'][0], row)
    events = EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars('eval_top1')] == [(1, pytest.approx(float(row['eval_top1'])))]


def test_tensorboard_gets_every_summary_column_and_the_loss_terms_every_log_interval(image_folder, tmp_path):
    """Epoch scalars by epoch; `step/<term>` at the batches trained, each the mean over the steps since the
    previous point: weighted by those steps, an epoch's points average to its summary.csv term."""
    main(train_args(image_folder, tmp_path, 'run', '--log-tensorboard', '--log-interval', '2'))
    summary = read_summary(tmp_path / 'run')
    events = EventAccumulator(str(tmp_path / 'run'))  # no DIR: the run's folder
    events.Reload()
    numeric = [key for key in summary[0] if key not in ('epoch', 'status')]
    assert set(events.Tags()['scalars']) == set(numeric) | {'step/loss', 'step/loss_ce', 'step/loss_kd'}
    for key in numeric:
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
               [(int(row['epoch']), pytest.approx(float(row[key]), rel=1e-6)) for row in summary]
    # the points of an epoch of n steps: its steps 1, 3, 5, ... and n, at the batches of the run (DLB: 7, then 8)
    epochs, offset = [], 0
    for row in summary:
        steps = int(row['train_steps'])
        epochs.append([offset + step for step in range(1, steps + 1) if step % 2 == 1 or step == steps])
        offset += steps
    assert epochs == [[1, 3, 5, 7], [8, 10, 12, 14, 15]]
    for term in ('loss', 'loss_ce', 'loss_kd'):
        points = {e.step: e.value for e in events.Scalars(f'step/{term}')}
        assert sorted(points) == epochs[0] + epochs[1]
        for batches, row in zip(epochs, summary):
            spans = [b - a for a, b in zip([batches[0] - 1] + batches, batches)]
            mean = sum(points[b] * n for b, n in zip(batches, spans)) / sum(spans)
            assert mean == pytest.approx(float(row[f'train_{term}']), rel=1e-5, abs=1e-7), (term, row['epoch'])


@pytest.mark.parametrize('flags, missing, expected', [
    (['--log-wandb'], ['wandb'], '--log-wandb needs the wandb package, which is not installed: pip install '
                                 '"timm-selfkd[wandb]"'),
    (['--log-tensorboard'], ['tensorboard', 'torch.utils.tensorboard'],
     '--log-tensorboard needs the tensorboard package, which is not installed: pip install "timm-selfkd[tensorboard]"'),
    (['--log-wandb', '--wandb-resume-id', 'abc'], [], '--wandb-resume-id continues the wandb run of a resumed '
                                                      'training run: it needs --resume'),
])
def test_a_tracker_that_cannot_run_is_one_line_before_training(image_folder, tmp_path, monkeypatch, capsys, flags,
                                                               missing, expected):
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # `import` of it fails, as when it is not installed
    with pytest.raises(SystemExit) as exc:
        main(train_args(image_folder, tmp_path, 'run', *flags))
    assert exc.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f'train.py: error: {expected}'), line
    assert not os.path.exists(tmp_path / 'run')


def test_a_given_wandb_id_is_continued_over_the_checkpoints(tmp_path, offline_wandb):
    """`--wandb-resume-id` (timm's flag) wins over the id a checkpoint names."""
    log = RunLog(parse_args(['--log-wandb', '--resume', 'last.pth.tar', '--wandb-resume-id', 'given1']))
    log.load_state_dict({'wandb_id': 'saved1'})
    log.start(str(tmp_path), config={})
    with log:
        pass
    (run,) = wandb_runs(offline_wandb)
    assert run['id'] == 'given1' and log.state_dict() == {'wandb_id': 'given1'}
