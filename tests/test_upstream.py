"""The upstream adapter: users' own timm train.py files (../shared/upstream-timm, read in place, never copied
into the repository) driven with every registered method; the compatibility gate and the options it refuses."""
import csv
import functools
import inspect
import json
import logging
import math
import os
import subprocess
import sys

from dataclasses import dataclass

import PIL.Image
import pytest
import timm
import timm.data
import yaml
from timm.data import FastCollateMixup, IterableImageDataset, Mixup

from conftest import NUM_CLASSES, write_image_folder
from test_train import METHOD_ARGS
from wandb_files import offline_wandb, wandb_runs  # noqa: F401 (a fixture)
from timm_selfkd import get_method, list_methods, register_method, registry, upstream
from timm_selfkd.cli import format_methods
from timm_selfkd.errors import UsageError
from timm_selfkd.runtime.data import dataset_labels
from timm_selfkd.methods import PlainTask
from timm_selfkd.methods.base import Needs
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.registry import build_hparams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPSTREAM = os.path.normpath(os.path.join(REPO, '..', 'shared', 'upstream-timm'))
needs_upstream = pytest.mark.skipif(not os.path.isdir(UPSTREAM),
                                    reason=f'the upstream timm train.py fixtures are not in {UPSTREAM} (../shared)')
pytestmark = needs_upstream

V1_0_28, SNAPSHOT, V1_0_22 = 'train_v1.0.28.py', 'train_main_aa4b5850.py', 'train_v1.0.22.py'
BATCH = 8


@pytest.fixture(autouse=True)
def fresh_log_handlers():
    """timm's `setup_default_logging` (every run of a script or of train.py) adds a console handler to the root
    logger, bound to the stderr of that moment, which pytest closes after the test: take them off before and
    after each test, so that no run logs into a closed capture (pytest's own handlers are subclasses)."""
    def console_handlers_off():
        logging.root.handlers[:] = [h for h in logging.root.handlers if type(h) is not logging.StreamHandler]

    console_handlers_off()
    yield
    console_handlers_off()


def script(name):
    return os.path.join(UPSTREAM, name)


def script_args(data_dir, output, *extra):
    return ['--data-dir', data_dir, '--model', 'resnet18', '--num-classes', str(NUM_CLASSES), '--img-size', '32',
            '-b', str(BATCH), '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.01', '--device', 'cpu', '-j', '0',
            '--log-interval', '1', '--output', str(output), '--experiment', 'run', *extra]


def read_summary(output):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return list(csv.DictReader(f))


def train_lines(caplog, epoch=0):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f'Train: {epoch} [')]


def logged_term(line, name):
    return float(line.split(f'{name} ')[1].split()[0])


@pytest.mark.parametrize('method', list_methods())
@pytest.mark.parametrize('name', [V1_0_28, SNAPSHOT])
def test_every_method_trains_through_the_users_script(image_folder, tmp_path, caplog, name, method):
    """One epoch per method and script: the method's loss terms in every training log line and in summary.csv,
    full batches from the method's sampler, the method in args.yaml, and a checkpoint timm loads as is."""
    caplog.set_level('INFO', logger='train')
    extra = METHOD_ARGS.get(method, [])  # the 4-class set needs TC's gamma above 1/4
    upstream.main([script(name), *script_args(image_folder, tmp_path, '--selfkd', method, *extra)])
    (row,) = read_summary(tmp_path)
    terms = [key[len('train_'):] for key in row if key.startswith('train_loss_')]
    assert terms and all(math.isfinite(float(row[f'train_{t}'])) for t in terms)
    lines = train_lines(caplog)
    assert lines and all(f'  {t} ' in line for line in lines for t in terms), lines[-1]
    assert float(row['train_images']) == BATCH * int(row['train_steps'])
    with open(tmp_path / 'run' / 'args.yaml') as f:
        assert yaml.safe_load(f)['selfkd'] == method
    timm.create_model('resnet18', num_classes=NUM_CLASSES, checkpoint_path=str(tmp_path / 'run' / 'last.pth.tar'))


def test_resume_restores_the_methods_state_and_sampler_epoch(image_folder, tmp_path, caplog):
    """DLB's kept logits travel in the script's checkpoint and the batch stream is told the epoch (v1.0.28
    does not), so a resumed run trains its next epoch exactly like the uninterrupted one."""
    caplog.set_level('INFO', logger='train')
    common = ('--selfkd', 'dlb', '--epochs', '2', '--no-aug')
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path / 'full', *common)])
    uninterrupted = train_lines(caplog, epoch=1)[0]
    caplog.clear()
    checkpoint = str(tmp_path / 'full' / 'run' / 'checkpoint-0.pth.tar')
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path / 'resumed', *common, '--resume', checkpoint)])
    resumed = train_lines(caplog, epoch=1)[0]
    assert logged_term(resumed, 'loss_kd') > 0
    assert logged_term(resumed, 'loss_kd') == pytest.approx(logged_term(uninterrupted, 'loss_kd'), rel=1e-4)
    full, again = read_summary(tmp_path / 'full')[1], read_summary(tmp_path / 'resumed')[0]
    assert float(again['train_loss_kd']) == pytest.approx(float(full['train_loss_kd']), rel=1e-4)


@dataclass
class _NoHparams:
    pass


class _IndexRecordingTask(PlainTask):
    """Plain training that reads the batch-information channel and keeps what it got next to the labels."""

    seen = []

    @classmethod
    def requirements(cls, hparams):
        return Needs(sample_indices=True)

    def forward(self, input, target):
        info = self.batch_info(batch_size=input.shape[0])
        self.seen.append((info.epoch, info.step, info.indices.tolist(), target.tolist()))
        return super().forward(input, target)


@pytest.fixture
def index_recording_method():
    """A method registered for one test only (`--selfkd recordidx`)."""
    _IndexRecordingTask.seen = []
    register_method('recordidx', hparams=_NoHparams)(_IndexRecordingTask)
    yield _IndexRecordingTask
    registry._METHODS.pop('recordidx')


def test_batch_information_channel_through_the_script(image_folder, tmp_path, index_recording_method):
    """A task that reads `batch_info()` gets, at every step of the script's loop (prefetcher and all), the epoch,
    the step and the dataset indices of exactly the images it is given: their labels are the batch's labels."""
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path, '--selfkd', 'recordidx', '--epochs', '2')])
    labels = dataset_labels(timm.data.create_dataset('', root=image_folder, split='train', is_training=True))
    seen = index_recording_method.seen
    assert [(epoch, step) for epoch, step, _, _ in seen] == [(e, s) for e in range(2) for s in range(4)]
    for epoch, _, indices, targets in seen:
        assert labels[indices].tolist() == targets
    for epoch in range(2):  # plain batches: every image once per epoch
        assert sorted(i for e, _, indices, _ in seen if e == epoch for i in indices) == list(range(len(labels)))


def test_flags_in_help_yaml_config_and_args_yaml(image_folder, tmp_path, capsys, caplog):
    """The Self-KD flags join the script's --help; its -c config sets them and its args.yaml records them; a
    recipe's values of another method are dropped when the command line picks another method."""
    with pytest.raises(SystemExit) as exc:
        upstream.main([script(V1_0_28), '--help'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert 'Self-KD' in out and '--selfkd NAME' in out and '--dlb-alpha' in out and '--bake-omega' in out

    caplog.set_level('INFO', logger='train')
    config = tmp_path / 'dlb.yaml'
    config.write_text('selfkd: dlb\ndlb_alpha: 0.5\n')
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path / 'dlb', '-c', str(config))])
    with open(tmp_path / 'dlb' / 'run' / 'args.yaml') as f:
        saved = yaml.safe_load(f)
    assert (saved['selfkd'], saved['dlb_alpha']) == ('dlb', 0.5)
    assert any('DLBHparams(alpha=0.5, temperature=3.0)' in r.getMessage() for r in caplog.records)

    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path / 'base', '-c', str(config),
                                                 '--selfkd', 'none')])
    with open(tmp_path / 'base' / 'run' / 'args.yaml') as f:
        saved = yaml.safe_load(f)
    assert (saved['selfkd'], saved['dlb_alpha']) == ('none', None)


def test_the_users_own_log_wandb_reaches_their_script(image_folder, tmp_path, offline_wandb):
    """Nothing of ours refuses or takes the script's own `--log-wandb` and companions: its own wandb run (offline)
    has its args, the method's among them, and each epoch's row with the method's loss terms."""
    import wandb
    upstream.main([script(SNAPSHOT), *script_args(image_folder, tmp_path, '--selfkd', 'dlb', '--log-wandb',
                                                  '--wandb-project', 'theirs', '--wandb-tags', 'mine')])
    wandb.finish()  # the script leaves its run to end when the process does
    (run,) = wandb_runs(offline_wandb)
    assert (run['project'], run['tags']) == ('theirs', ['mine'])
    assert (run['config']['log_wandb'], run['config']['selfkd']) == (True, 'dlb')
    (row,) = read_summary(tmp_path)
    (logged,) = run['history']
    assert logged['train_loss_kd'] == pytest.approx(float(row['train_loss_kd'])) and logged['train_loss_kd'] > 0


def test_list_selfkd(capsys):
    with pytest.raises(SystemExit) as exc:
        upstream.main([script(SNAPSHOT), '--list-selfkd'])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == format_methods()


def _refused(capsys, tmp_path, argv, expected, logged_before=False, exact=False):
    """Exit status 2, one error line naming the problem (`exact`: the whole message), and no output folder.
    Refusals that depend on the data or the loader come after the script's first log lines (on stderr), the
    others before any."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        upstream.main(argv + ['--output', str(output)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) > 1 if logged_before else len(err) == 1, err
    assert err[-1].startswith('timm_selfkd.upstream: error: ') and expected in err[-1], err
    if exact:
        assert err[-1] == f'timm_selfkd.upstream: error: {expected}', err
    assert not any('error' in line.lower() or 'Traceback' in line for line in err[:-1]), err
    assert not output.exists()


def test_too_old_script_is_refused(image_folder, tmp_path, capsys):
    _refused(capsys, tmp_path, [script(V1_0_22), *script_args(image_folder, tmp_path, '--selfkd', 'dlb')],
             'train_v1.0.22.py is too old to drive: it does not use timm\'s task API (no import from timm.task')


# each edit of v1.0.28's source takes away one thing the adapter relies on; the last is found when the task is built
GATE_EDITS = {
    'optimizer from the model': ('optimizer = create_optimizer_v2(\n        model,',
                                 'optimizer = create_optimizer_v2(\n        task.trainable_module,',
                                 'its optimizer is not built from task.get_trainable_module() (timm >= 1.0.27)'),
    'task built another way': ('task = ClassificationTask(', 'task = timm_task.ClassificationTask(',
                               'does not build a timm.task.ClassificationTask'),
    'task argument we lack': ('task = ClassificationTask(\n            model=model,',
                              'task = ClassificationTask(\n            model=model, label_key=\'y\',',
                              'arguments a self-KD task does not take: label_key'),
    'no loaders from create_loader': ('= create_loader(', '= timm_data.create_loader(',
                                      'does not build its loaders with timm.data.create_loader'),
    'training loader built another way': ('loader_train = create_loader(', 'loader_train = timm_data.create_loader(',
                                          'builds its task before a training loader'),
    'no train_one_epoch': ('def train_one_epoch(', 'def one_epoch(', 'it defines no train_one_epoch()'),
    'epoch not first': ('def train_one_epoch(\n        epoch,', 'def train_one_epoch(\n        epoch_,',
                        'its train_one_epoch() does not take the epoch as first argument'),
    'saver without task': ('            max_history=args.checkpoint_hist,\n            task=task,\n',
                           '            max_history=args.checkpoint_hist,\n',
                           'does not give its CheckpointSaver the task (task=...)'),
    'no logger': ("_logger = logging.getLogger('train')", "log = logging.getLogger('train')",
                  'no module-level `_logger'),
}


@pytest.mark.parametrize('edit', sorted(GATE_EDITS))
def test_gate_names_the_failed_check(image_folder, tmp_path, capsys, edit):
    old, new, expected = GATE_EDITS[edit]
    with open(script(V1_0_28)) as f:
        source = f.read()
    assert old in source
    edited = tmp_path / 'train.py'
    edited.write_text('import timm.data as timm_data\nimport timm.task as timm_task\n' + source.replace(old, new))
    _refused(capsys, tmp_path, [str(edited), *script_args(image_folder, tmp_path, '--selfkd', 'dlb')], expected,
             logged_before=edit == 'training loader built another way')


def test_not_a_train_script_is_refused(tmp_path, capsys):
    (tmp_path / 'hello.py').write_text('def main():\n    print("hello")\n')
    _refused(capsys, tmp_path, [str(tmp_path / 'hello.py')], 'hello.py is not a timm train.py: it defines no '
                                                             '_parse_args()')
    _refused(capsys, tmp_path, [os.path.join(REPO, 'README.md')], 'README.md is not a Python script')
    _refused(capsys, tmp_path, [str(tmp_path / 'missing.py')], "cannot read '")


@pytest.mark.parametrize('extra, expected', [
    (['--naflex-loader'], '--naflex-loader cannot be used with --selfkd none: NaFlex batches'),
    (['--selfkd', 'dlb', '--aug-splits', '2'], '--aug-splits cannot be used with --selfkd dlb'),
    (['--jsd-loss'], '--jsd-loss cannot be used'),
    (['--split-bn'], '--split-bn cannot be used with --selfkd none: it needs --aug-splits'),
    (['--resplit'], '--resplit cannot be used with --selfkd none: it needs --aug-splits'),
    (['--selfkd', 'bake', '--kd-model-name', 'resnet18'], '--kd-model-name cannot be used with --selfkd bake: a '
                                                          'teacher-distillation task would replace the self-KD task '
                                                          '(here the model is its own teacher)'),
    (['--selfkd', 'bake', '--torchscript'], '--torchscript cannot be used'),
    (['--use-multi-epochs-loader'], '--use-multi-epochs-loader cannot be used'),
    (['--selfkd', 'bake', '-b', '7'], 'use a multiple of 2'),
    (['--selfkd', 'dlb', '--dlb-alpha', '-1'], 'dlb alpha must be >= 0, got -1.0'),
    (['--selfkd', 'dlb', '--dlb-alpha', 'x'], "argument --dlb-alpha: invalid float value: 'x'"),
    (['--selfkd', 'dlb', '--bake-omega', '0.3'], 'is a hyper-parameter of bake, but the method is \'dlb\''),
    (['--selfkd', 'dbl'], "unknown self-KD method 'dbl' (did you mean 'dlb'?)"),
])
def test_options_the_methods_cannot_take(image_folder, tmp_path, capsys, extra, expected):
    _refused(capsys, tmp_path, [script(V1_0_28), *script_args(image_folder, tmp_path, *extra)], expected)


def test_scheduled_image_sizes_of_the_snapshot(image_folder, tmp_path, capsys):
    _refused(capsys, tmp_path, [script(SNAPSHOT), *script_args(image_folder, tmp_path, '--selfkd', 'dlb',
                                                               '--train-img-sizes', '32', '48')],
             '--train-img-sizes cannot be used with --selfkd dlb: variable image or batch sizes change the batch '
             'layout the methods rely on')


def test_data_the_method_cannot_batch(tmp_path, capsys):
    write_image_folder(str(tmp_path / 'data' / 'train'), [4, 4, 1])
    write_image_folder(str(tmp_path / 'data' / 'validation'), [2, 2, 2])
    _refused(capsys, tmp_path, [script(V1_0_28), *script_args(str(tmp_path / 'data'), tmp_path, '--selfkd', 'bake',
                                                              '--num-classes', '3', '-b', '4')], 'class 2 has one',
             logged_before=True)


@pytest.mark.parametrize('method', list_methods())
def test_every_method_trains_with_the_script_s_mixup(image_folder, tmp_path, monkeypatch, method):
    """Every method takes the script's mixup/CutMix as its record says (`Needs.mixup`): a method that takes mixed
    batches gets the script's collate mixup and soft-target loss; one that mixes its batches itself (DLB, CS-KD,
    DDGSD, PS-KD) gets unmixed batches (the script's collate mixup taken out) and timm's batch-form `Mixup` with
    the script's options, as under our train.py."""
    needs = get_method(method).task_cls.requirements(build_hparams(get_method(method), {}))
    assert needs.mixup in ('loader', 'task')  # no built-in method refuses mixup
    seen = {}
    real_attach = MethodWiring.attach

    def recording_attach(self, task, **kwargs):
        mixing = kwargs['mixing']
        seen.update(mixup=mixing.task_mixup if mixing is not None else None,
                    collate=kwargs['loader'].loader.collate_fn)
        return real_attach(self, task, **kwargs)

    monkeypatch.setattr(MethodWiring, 'attach', recording_attach)
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path, '--selfkd', method, '--mixup', '0.2',
                                                 '--cutmix', '1.0', '--mixup-mode', 'batch')])
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss']))
    if needs.mixup == 'task':
        assert isinstance(seen['mixup'], Mixup) and not isinstance(seen['mixup'], FastCollateMixup)
        assert (seen['mixup'].mixup_alpha, seen['mixup'].cutmix_alpha, seen['mixup'].num_classes) == (0.2, 1.0, 4)
        assert not isinstance(seen['collate'], FastCollateMixup)
    else:
        assert seen['mixup'] is None and isinstance(seen['collate'], FastCollateMixup)


def test_a_self_mixing_method_without_prefetcher_mixes_once_and_stops_at_the_off_epoch(image_folder, tmp_path,
                                                                                       monkeypatch):
    """Without the prefetcher the script mixes in its loop (`mixup_fn`): for DLB the adapter hands it None and DLB
    mixes; `--mixup-off-epoch` switches the method's mix off as the script's own switch would."""
    enabled = []
    real = upstream.Injection._wrap_train_one_epoch

    def spying(self, train_one_epoch):
        @functools.wraps(train_one_epoch)  # the adapter reads the script's signature through it
        def spy(*a, **kw):
            call = inspect.signature(train_one_epoch).bind(*a, **kw)
            assert 'mixup_fn' in call.arguments and call.arguments['mixup_fn'] is None  # the loop does not mix
            enabled.append(self.mixing.mixer.mixup_enabled)
            return train_one_epoch(*a, **kw)
        return real(self, spy)

    monkeypatch.setattr(upstream.Injection, '_wrap_train_one_epoch', spying)
    upstream.main([script(V1_0_28), *script_args(image_folder, tmp_path, '--selfkd', 'dlb', '--cutmix', '1.0',
                                                 '--no-prefetcher', '--mixup-off-epoch', '1', '--epochs', '2')])
    assert enabled == [True, False]
    assert all(math.isfinite(float(row['train_loss'])) for row in read_summary(tmp_path))


# a method that keeps timm's batches and writes, per rank, the dataset indices and labels of every batch it trains on
RECORDING_RUN = '''
import json, os, sys
from dataclasses import dataclass
import torch.distributed as dist
from timm_selfkd import register_method, upstream
from timm_selfkd.methods import PlainTask
from timm_selfkd.methods.base import Needs


@dataclass
class RecordHparams:
    pass


@register_method('recordidx', hparams=RecordHparams)
class Recording(PlainTask):
    @classmethod
    def requirements(cls, hparams):
        return Needs(sample_indices=True)

    def forward(self, input, target):
        info = self.batch_info(batch_size=input.shape[0])
        with open(os.path.join(os.path.dirname(__file__), f'seen{dist.get_rank()}.jsonl'), 'a') as f:
            f.write(json.dumps([info.epoch, info.indices.tolist(), target.tolist()]) + '\\n')
        return super().forward(input, target)


upstream.main(sys.argv[1:])
'''


def _torchrun(tmp_path, *argv):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_aug_repeats_with_a_method_that_keeps_timms_batches_gloo(image_folder, tmp_path):
    """--aug-repeats 2 (distributed only, as in timm) with a method that keeps timm's batches: the run trains, and
    the batches are timm's repeated-augmentation sampler's: each epoch both ranks train on the same 16 of the
    32 images (each image's two copies on different ranks), where plain batches would split the set in two."""
    runner = tmp_path / 'record_run.py'
    runner.write_text(RECORDING_RUN)
    _torchrun(tmp_path, str(runner), script(V1_0_28),
              *script_args(image_folder, tmp_path / 'out', '--selfkd', 'recordidx', '--aug-repeats', '2',
                           '--epochs', '2'))
    labels = dataset_labels(timm.data.create_dataset('', root=image_folder, split='train', is_training=True))
    seen = [[json.loads(line) for line in (tmp_path / f'seen{rank}.jsonl').read_text().splitlines()]
            for rank in range(2)]
    for rank_seen in seen:
        assert [epoch for epoch, _, _ in rank_seen] == [0, 0, 1, 1]
        assert all(labels[indices].tolist() == targets for _, indices, targets in rank_seen)
    per_epoch = [[sorted(i for e, indices, _ in rank_seen if e == epoch for i in indices) for rank_seen in seen]
                 for epoch in range(2)]
    for rank0, rank1 in per_epoch:
        assert rank0 == rank1 and len(set(rank0)) == len(rank0) == 16
    assert per_epoch[0][0] != per_epoch[1][0]  # reshuffled every epoch
    rows = read_summary(tmp_path / 'out')
    assert [float(row['train_images']) for row in rows] == [32.0, 32.0]
    assert all(math.isfinite(float(row['train_loss'])) for row in rows)


class _StreamReader:
    """A streamed reader of an image folder's samples (what wds/, hfids/, tfds/ readers give: images in their
    order, no index)."""

    def __init__(self, samples):
        self.samples = list(samples)

    def __iter__(self):
        for path, target in self.samples:
            with open(path, 'rb') as f:
                yield PIL.Image.open(f).convert('RGB'), target

    def __len__(self):
        return len(self.samples)


@pytest.fixture
def streamed_training_set(monkeypatch):
    """The script's training set as a streamed data set (timm's `IterableImageDataset`), its validation set as is."""
    create_dataset = timm.data.create_dataset

    def streamed(*a, is_training=False, **kw):
        dataset = create_dataset(*a, is_training=is_training, **kw)
        return IterableImageDataset('', reader=_StreamReader(dataset.reader.samples)) if is_training else dataset

    monkeypatch.setattr(timm.data, 'create_dataset', streamed)  # the script imports it when it is loaded


@pytest.mark.parametrize('method', ['none', 'lsrkd', 'multi_exit', 'dlb', 'bake', 'pskd'])
def test_streamed_data_sets_where_the_method_allows(tmp_path, image_folder, capsys, caplog, streamed_training_set,
                                                    method):
    """A streamed training set trains a method that neither chooses its batches nor reads sample indices, in the
    data set's own batches (timm's loader, no batch stream); the others are refused once the data set exists."""
    spec = get_method(method)
    needs = spec.task_cls.requirements(build_hparams(spec, {}))
    assert needs.streamed_data == (method in ('none', 'lsrkd', 'multi_exit'))
    argv = [script(V1_0_28), *script_args(image_folder, tmp_path, '--selfkd', method, '--epochs', '2')]
    if not needs.streamed_data:
        _refused(capsys, tmp_path, argv,
                 f'{method} chooses its batches or reads sample indices, which a streamed data set (wds/, '
                 'hfids/, tfds/) cannot give; use a map-style data set', logged_before=True, exact=True)
        return
    caplog.set_level('INFO', logger='train')
    upstream.main(argv)
    assert any(f'--selfkd {method}:' in r.getMessage() and "batches from the data set's stream, 4 per epoch"
               in r.getMessage() for r in caplog.records)
    rows = read_summary(tmp_path)
    assert [(float(row['train_images']), float(row['train_steps'])) for row in rows] == [(32.0, 4.0)] * 2
    assert all(math.isfinite(float(row['train_loss'])) for row in rows)


def test_torchrun_two_process_gloo(image_folder, tmp_path):
    """DDP on CPU through the user's script: BAKE's global batch, images of both ranks in the summary."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'timm_selfkd.upstream', script(V1_0_28), *script_args(image_folder, tmp_path, '--selfkd', 'bake')]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = read_summary(tmp_path)
    assert float(row['train_images']) == 2 * 32  # each rank: its 16 images as anchors, each with a partner
    assert math.isfinite(float(row['train_loss_kd']))
