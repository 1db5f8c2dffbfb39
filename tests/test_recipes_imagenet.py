"""Every ImageNet recipe in configs/ (`*imagenet*.yaml`) starts: its exact run (model, loaders, optimizer,
scheduler, mixup, method) is built on synthetic 224 px data and trains two steps on the CPU, so a recipe that
cannot start fails here rather than in a user's first hour on a cluster.

The only changes to a recipe are the ones a CPU and a tiny data set force, all on the command line except one:
  -b 4 (two BAKE groups of an anchor and its same-class image, or four images), --epochs 1, --device cpu,
  --workers 0, --num-classes 2, --data-dir/--output/--experiment;
  --amp-dtype bfloat16 when the recipe has amp (fp16 autocast on the CPU runs ~15x slower: 33 s for one
  Swin-T step of four images instead of 2 s);
  pretrained is left out of the copy of the recipe the run reads (the tests download no weights); a recipe's
  sync_bn stays, and does nothing in a single process, as in timm.
Two steps: a BAKE recipe trains on 2 classes x 2 images (each image is an anchor once: 4 anchors, 2 per batch);
the others on 2 classes x 4 images (8 images, 4 per batch).

Each run must exit normally and write one summary row of 2 steps and 8 images with finite losses; the optimizer,
scheduler, mixup and model it built are checked against the recipe's values, and its args.yaml against the
recipe. Each recipe's baseline (`-c recipe --selfkd none`, as its comment says) must parse, and two of them
(a CNN protocol and Swin's) train their two steps too. One recipe for an 8-GPU node trains on a laptop with only its
machine switched on the command line (`-b`, `--workers`, `--device`, `--no-amp`).
"""
import csv
import glob
import math
import os

import pytest
import torch
import yaml
from timm.data import FastCollateMixup, Mixup
from timm.layers import DropPath
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

from conftest import write_image_folder
from timm_selfkd import train as train_module
from timm_selfkd.cli import method_hparams, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(REPO, 'configs', '*imagenet*.yaml')))
BATCH = 4
LEFT_OUT = ('pretrained',)  # recipe keys the offline CPU run leaves out (see the module docstring)
OVERRIDES = {'batch_size': BATCH, 'epochs': 1, 'device': 'cpu', 'workers': 0, 'num_classes': 2}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """224 px image folders: `bake` (2 classes x 2 training images) and `plain` (2 x 4), each with 2 to validate."""
    root = tmp_path_factory.mktemp('imagenet_like')
    for name, per_class in (('bake', 2), ('plain', 4)):
        write_image_folder(str(root / name / 'train'), per_class, num_classes=2, size=224, seed=0)
        write_image_folder(str(root / name / 'validation'), 1, num_classes=2, size=224, seed=1)
    return root


def _read(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _run(recipe_path, tmp_path, data, monkeypatch, extra=()):
    """Train the recipe two steps; return (its Setup, its args.yaml, its summary rows)."""
    recipe = _read(recipe_path)
    kept = {k: v for k, v in recipe.items() if k not in LEFT_OUT}
    local = tmp_path / os.path.basename(recipe_path)
    local.write_text(yaml.safe_dump(kept))
    method = extra[list(extra).index('--selfkd') + 1] if '--selfkd' in extra else recipe.get('selfkd', 'none')
    argv = ['-c', str(local), '--data-dir', str(data / ('bake' if method == 'bake' else 'plain')),
            '-b', str(BATCH), '--epochs', '1', '--device', 'cpu', '--workers', '0', '--num-classes', '2',
            '--output', str(tmp_path), '--experiment', 'run', *extra]
    if recipe.get('amp'):
        argv += ['--amp-dtype', 'bfloat16']
    built = {}
    init = train_module.Setup.__init__

    def spy(self, args):
        init(self, args)
        built['setup'] = self

    monkeypatch.setattr(train_module.Setup, '__init__', spy)
    train_module.main(argv)  # a failed run exits (SystemExit), which fails the test
    out = tmp_path / 'run'
    with open(out / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    for checkpoint in glob.glob(str(out / '*.pth.tar')):  # up to 1 GB for Swin-B with AdamW's state
        os.remove(checkpoint)
    return built['setup'], _read(out / 'args.yaml'), rows


def _check_summary(rows):
    assert len(rows) == 1, rows
    row = rows[0]
    assert row['status'] == 'ok'
    assert float(row['train_steps']) == 2 and float(row['train_images']) == 2 * BATCH, row
    losses = {k: float(v) for k, v in row.items() if k.startswith(('train_loss', 'eval_loss'))}
    assert losses and all(math.isfinite(v) for v in losses.values()), row


def _check_built(s, recipe):
    """The optimizer, scheduler, mixup and model the run built are the recipe's (or, for a key it does not set,
    train.py's default)."""
    args = s.args
    recipe = {**vars(parse_args([])), **recipe}
    # optimizer: kind, lr (timm's --lr-base rule at this run's global batch), momentum/betas/eps, weight decay
    opt = s.optimizer
    kind = recipe['opt']
    if kind in ('sgd', 'momentum'):  # timm: sgd is Nesterov momentum, momentum is plain (heavy-ball) momentum
        assert isinstance(opt, torch.optim.SGD) and opt.defaults['nesterov'] is (kind == 'sgd')
        assert opt.defaults['momentum'] == recipe['momentum']
    elif kind == 'adamw':
        assert type(opt).__name__ == 'AdamW', type(opt)
        assert opt.defaults['eps'] == recipe['opt_eps'] and list(opt.defaults['betas']) == recipe['opt_betas']
    else:
        raise AssertionError(f'no check for --opt {kind}')
    if recipe['lr'] is not None:
        lr = recipe['lr']
    else:
        ratio = BATCH / recipe['lr_base_size']  # timm's rule: linear, square root for adaptive optimizers
        adaptive = any(o in kind for o in ('ada', 'lamb'))
        scale = recipe['lr_base_scale'] or ('sqrt' if adaptive else 'linear')
        lr = recipe['lr_base'] * (ratio ** 0.5 if scale == 'sqrt' else ratio)
    assert all(g['initial_lr'] == pytest.approx(lr) for g in opt.param_groups)
    decays = sorted({g['weight_decay'] for g in opt.param_groups})
    if recipe['opt_kwargs'].get('filter_bias_and_bn') is False:
        assert decays == [recipe['weight_decay']]  # every parameter decays
    else:
        assert decays == sorted({0.0, recipe['weight_decay']})  # biases and norms do not
    # scheduler
    sched = s.scheduler
    per_step = recipe['sched_on_updates']
    steps = s.updates_per_epoch if per_step else 1
    assert sched.t_in_epochs is (not per_step)
    if recipe['sched'] == 'cosine':
        assert isinstance(sched, CosineLRScheduler)
        assert sched.t_initial == args.epochs * steps  # warm-up inside the schedule (no prefix)
        assert sched.lr_min == recipe['min_lr']
    elif recipe['sched'] == 'multistep':
        assert isinstance(sched, MultiStepLRScheduler)
        assert list(sched.decay_t) == recipe['decay_milestones'] and sched.decay_rate == recipe['decay_rate']
    else:
        raise AssertionError(f'no check for --sched {recipe["sched"]}')
    assert sched.warmup_t == recipe['warmup_epochs'] * steps
    if recipe['warmup_epochs']:
        assert sched.warmup_lr_init == recipe['warmup_lr']
    assert s.num_epochs == args.epochs + recipe['cooldown_epochs']  # the run's --epochs 1
    # mixup / CutMix, label smoothing, the epoch CutMix stops
    if recipe['mixup'] > 0 or recipe['cutmix'] > 0:
        mix = s.mixing.mixer
        assert isinstance(mix, (Mixup, FastCollateMixup)), mix
        assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.mode, mix.label_smoothing) == (
            recipe['mixup'], recipe['cutmix'], recipe['mixup_prob'],
            recipe['mixup_mode'], recipe['smoothing'])
        if recipe['mixup'] > 0 and recipe['cutmix'] > 0:
            assert mix.switch_prob == recipe['mixup_switch_prob']
        assert args.mixup_off_epoch == recipe['mixup_off_epoch'] == s.mixing.off_epoch
    else:
        assert s.mixing is None
    assert getattr(s.task.criterion, 'smoothing', 0.0) == (0.0 if s.mixing is not None else recipe['smoothing'])
    # the model and its stochastic depth; augmentation of the training images
    assert args.model == recipe['model']
    rates = [m.drop_prob for m in s.model.modules() if isinstance(m, DropPath)]
    assert max(rates, default=0.0) == pytest.approx(recipe['drop_path'] or 0.0)
    if recipe['reprob']:
        assert s.random_erasing is not None and s.random_erasing.probability == recipe['reprob']
    if recipe['aa']:
        assert 'RandAugment' in repr(s.train_dataset.transform)
    if recipe['crop_pct'] is not None:
        assert s.data_config['crop_pct'] == recipe['crop_pct']
    if recipe['interpolation']:
        assert s.data_config['interpolation'] == recipe['interpolation']


def test_recipes_are_found():
    names = {os.path.basename(r) for r in RECIPES}
    for name in ('bake_imagenet_resnet50.yaml', 'bake_cutmix_imagenet_resnet50.yaml', 'bake_imagenet_resnet101.yaml',
                 'bake_imagenet_resnet152.yaml', 'bake_imagenet_resnext101_32x4d.yaml',
                 'bake_imagenet_mobilenetv2.yaml', 'bake_imagenet_efficientnet_b0.yaml', 'bake_imagenet_swin_t.yaml',
                 'bake_imagenet_swin_s.yaml', 'bake_imagenet_swin_b.yaml', 'pskd_imagenet_resnet152.yaml'):
        assert name in names, name


@pytest.mark.parametrize('recipe_path', RECIPES, ids=os.path.basename)
def test_recipe_comment_and_baseline(recipe_path):
    """The comment names the paper's table and row, the global batch and how -b and the processes make it, and
    the baseline; `--selfkd none` on the recipe parses (the method's own keys are then ignored)."""
    with open(recipe_path) as f:
        text = f.read()
    comment = ' '.join(line for line in text.splitlines() if line.startswith('#'))
    assert 'table' in comment.lower() and 'global batch' in comment.lower(), recipe_path
    assert '-b ' in comment and 'processes' in comment and '--selfkd none' in comment, recipe_path
    assert method_hparams(parse_args(['-c', recipe_path, '--selfkd', 'none'])).__class__.__name__ == 'PlainHparams'


@pytest.mark.parametrize('recipe_path', RECIPES, ids=os.path.basename)
def test_recipe_trains_two_steps(recipe_path, tmp_path, data, monkeypatch):
    recipe = _read(recipe_path)
    s, saved, rows = _run(recipe_path, tmp_path, data, monkeypatch)
    _check_summary(rows)
    _check_built(s, recipe)
    expected = {k: v for k, v in recipe.items() if k not in LEFT_OUT}
    expected.update(OVERRIDES)
    for key, value in expected.items():
        got = saved[key]
        assert (list(got) if isinstance(got, tuple) else got) == value, (key, got, value)
    if recipe.get('amp'):
        assert saved['amp_dtype'] == 'bfloat16'


@pytest.mark.parametrize('name', ['bake_imagenet_mobilenetv2.yaml', 'bake_imagenet_swin_t.yaml'])
def test_recipe_baseline_trains_two_steps(name, tmp_path, data, monkeypatch):
    """`-c recipe --selfkd none`: plain cross-entropy on random batches, with the recipe's optimizer, schedule and
    mixup (a CNN protocol and Swin's)."""
    path = os.path.join(REPO, 'configs', name)
    recipe = _read(path)
    s, saved, rows = _run(path, tmp_path, data, monkeypatch, extra=('--selfkd', 'none'))
    _check_summary(rows)
    _check_built(s, recipe)
    assert saved['selfkd'] == 'none' and not any(k.startswith('bake_') and v is not None for k, v in saved.items())


def test_a_node_recipe_runs_on_a_laptop(tmp_path, data):
    """bake_imagenet_resnet50.yaml, a recipe for an 8-GPU node (AMP, pinned memory, sync BN, 8 workers, 64 images
    per process), trains a step on the CPU with only its machine switched by the command line: `-b`, `--workers`,
    `--device` and `--no-amp` (its sync BN does nothing in one process, as in timm). The copy the run reads swaps the
    model and the data for tiny ones; args.yaml records what ran: the recipe with those switches."""
    recipe = _read(os.path.join(REPO, 'configs', 'bake_imagenet_resnet50.yaml'))
    assert recipe['amp'] and recipe['sync_bn'] and recipe['pin_mem'] and recipe['workers'] == 8
    tiny = {**recipe, 'model': 'test_resnet', 'img_size': 32, 'num_classes': 2, 'epochs': 1,
            'data_dir': str(data / 'bake'), 'output': str(tmp_path), 'experiment': 'run'}
    local = tmp_path / 'recipe.yaml'
    local.write_text(yaml.safe_dump(tiny))
    train_module.main(['-c', str(local), '-b', '8', '--workers', '0', '--device', 'cpu', '--no-amp'])
    with open(tmp_path / 'run' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert [(row['status'], float(row['train_steps'])) for row in rows] == [('ok', 1.0)]  # 4 anchors + 4 partners
    saved = _read(tmp_path / 'run' / 'args.yaml')
    ran = {**tiny, 'batch_size': 8, 'workers': 0, 'device': 'cpu', 'amp': False}
    assert {key: saved[key] for key in ran} == ran
