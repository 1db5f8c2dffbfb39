"""End to end through train.py: every method on real timm models, AMP, resume, DDP and bad input."""
import csv
import glob
import gzip
import math
import os
import subprocess
import sys

import pytest
import timm
import torch

from conftest import NUM_CLASSES, TRAIN_PER_CLASS, epoch_lrs, write_image_folder
from timm_selfkd.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_IMAGES = NUM_CLASSES * TRAIN_PER_CLASS
BATCH = 8

# Images one epoch reads: timm's loader drops the last partial batch; DLB reads its new halves plus the
# repeated ones (the first batch is all new); BAKE reads every image once as an anchor plus one partner each.
IMAGES_PER_EPOCH = {
    'none': TRAIN_IMAGES // BATCH * BATCH,
    'dlb': BATCH + (TRAIN_IMAGES - BATCH) * 2,
    'bake': 2 * TRAIN_IMAGES,
    **dict.fromkeys(['lsrkd', 'lsrkd_tc', 'tfkd_reg'], TRAIN_IMAGES // BATCH * BATCH),
    'cskd': 2 * TRAIN_IMAGES,  # every image an anchor once, with one partner
    'ddgsd': TRAIN_IMAGES // (BATCH // 2) * BATCH,  # B/2 images per step, two views each
    'ddgsd+dlb': 2 * (BATCH // 2 + (TRAIN_IMAGES - BATCH // 2) * 2),  # DLB's count for B/2 images, two views each
}
# Method flags the tiny 4-class data set needs (TC's default gamma 0.25 is the uniform teacher for 4 classes)
METHOD_ARGS = {'lsrkd_tc': ['--lsrkd-tc-gamma', '0.5']}
NEW_METHODS = ['lsrkd', 'lsrkd_tc', 'tfkd_reg', 'cskd', 'ddgsd', 'ddgsd+dlb']

MODELS = {
    'resnet18': ['--img-size', '32'],
    'efficientnet_b0': ['--img-size', '32'],
    'swin_tiny_patch4_window7_224': ['--img-size', '64', '--model-kwargs', 'img_size=64'],
}


def train_args(data_dir, output, *extra):
    return ['--data-dir', data_dir, '--output', str(output), '--experiment', 'run', '-b', str(BATCH),
            '--epochs', '1', '--warmup-epochs', '0', '--device', 'cpu', '-j', '0', '--lr', '0.01',
            '--log-interval', '1', *extra]


def read_summary(output):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('model', sorted(MODELS))
@pytest.mark.parametrize('method', ['none', 'dlb', 'bake'])
def test_one_epoch_end_to_end(image_folder, tmp_path, model, method):
    """One epoch per model family and method: finite losses, the images each method reads, and a
    checkpoint that timm loads as a plain model."""
    main(train_args(image_folder, tmp_path, '--model', model, '--selfkd', method, *MODELS[model],
                    *METHOD_ARGS.get(method, [])))
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss'])) and math.isfinite(float(row['eval_loss']))
    assert float(row['train_images']) == IMAGES_PER_EPOCH[method]
    if method != 'none':
        assert float(row['train_loss_kd']) > 0
    kwargs = {'img_size': 64} if model.startswith('swin') else {}
    timm.create_model(model, num_classes=NUM_CLASSES, checkpoint_path=str(tmp_path / 'run' / 'last.pth.tar'),
                      **kwargs)


@pytest.mark.parametrize('model', ['resnet18', 'swin_tiny_patch4_window7_224'])
@pytest.mark.parametrize('method', NEW_METHODS)
def test_one_epoch_end_to_end_new_methods(image_folder, tmp_path, model, method):
    """The methods of issue 6 on a ResNet and a small Swin; same checks as above."""
    test_one_epoch_end_to_end(image_folder, tmp_path, model, method)


@pytest.mark.parametrize('method', ['dlb', 'bake', *NEW_METHODS])
def test_bf16_autocast_on_cpu_stays_finite(image_folder, tmp_path, method):
    main(train_args(image_folder, tmp_path, '--selfkd', method, '--img-size', '32', '--amp', '--model', 'test_resnet',
                    '--amp-dtype', 'bfloat16', *METHOD_ARGS.get(method, [])))
    (row,) = read_summary(tmp_path)
    for key in ('train_loss', 'train_loss_ce', 'train_loss_kd', 'eval_loss'):
        assert math.isfinite(float(row[key])), key


def test_each_epoch_trains_at_the_lr_of_conftest_epoch_lrs(image_folder, tmp_path):
    """The loop steps timm's scheduler as `conftest.epoch_lrs` (which the recipes' schedule tests use) assumes:
    the lr logged for every epoch is its. timm's multistep milestone m decays from 0-based epoch m - 1 on."""
    argv = train_args(image_folder, tmp_path, '--model', 'test_resnet', '--img-size', '32', '--epochs', '3',
                      '--sched', 'multistep', '--decay-milestones', '2', '3', '--decay-rate', '0.5')
    main(argv)
    logged = [float(row['lr']) for row in read_summary(tmp_path)]
    assert logged == pytest.approx(epoch_lrs(argv))
    assert logged == pytest.approx([0.01, 0.005, 0.0025])


def _first_step_kd(caplog, epoch):
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f'Train {epoch} [   1/'))
    return float(line.split('loss_kd ')[1].split()[0])


def test_resume_restores_dlb_state(image_folder, tmp_path, caplog):
    """The kept logits travel in the checkpoint, so the first step after --resume already has a KD term."""
    caplog.set_level('INFO', logger='train')
    # --no-aug: the resumed run must see the very same pixels as the uninterrupted one
    main(train_args(image_folder, tmp_path, '--selfkd', 'dlb', '--img-size', '32', '--epochs', '2', '--no-aug'))
    assert _first_step_kd(caplog, 0) == 0  # a fresh stream has no teacher on its first step
    checkpoint = torch.load(tmp_path / 'run' / 'checkpoint-0.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['task_state']['last_logits'].shape == (1, BATCH // 2, NUM_CLASSES)
    uninterrupted = _first_step_kd(caplog, 1)

    caplog.clear()
    resumed = tmp_path / 'resumed'
    main(train_args(image_folder, resumed, '--selfkd', 'dlb', '--img-size', '32', '--epochs', '2', '--no-aug',
                    '--resume', str(tmp_path / 'run' / 'checkpoint-0.pth.tar')))
    assert _first_step_kd(caplog, 1) == pytest.approx(uninterrupted, rel=1e-4)
    assert [int(r['epoch']) for r in read_summary(resumed)] == [1]
    assert float(read_summary(tmp_path)[0]['lr']) == pytest.approx(0.01)  # the lr epoch 0 trained with


def torchrun(*args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           os.path.join(REPO, 'train.py'), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize('method', ['dlb', 'bake'])
def test_torchrun_two_process_gloo(image_folder, tmp_path, method):
    """DDP on CPU: two processes, gloo; the summary counts the images of both ranks."""
    torchrun(*train_args(image_folder, tmp_path, '--selfkd', method, '--img-size', '32'))
    (row,) = read_summary(tmp_path)
    # each rank takes half of the data: per-rank counts follow the same rules with half the images
    per_rank = {'dlb': BATCH + (TRAIN_IMAGES // 2 - BATCH) * 2, 'bake': TRAIN_IMAGES}[method]
    assert float(row['train_images']) == 2 * per_rank
    assert math.isfinite(float(row['train_loss_kd']))


def test_torchrun_resume_restores_every_ranks_dlb_state(image_folder, tmp_path):
    """Each rank keeps its own last-batch logits; the checkpoint holds both, and a resumed 2-process run
    trains its next epoch exactly like the uninterrupted one (same pixels with --no-aug)."""
    common = ('--selfkd', 'dlb', '--img-size', '32', '--epochs', '2', '--no-aug')
    torchrun(*train_args(image_folder, tmp_path / 'full', *common))
    logits = torch.load(tmp_path / 'full' / 'run' / 'checkpoint-0.pth.tar', map_location='cpu',
                        weights_only=False)['task_state']['last_logits']
    assert logits.shape == (2, BATCH // 2, NUM_CLASSES) and not torch.allclose(logits[0], logits[1])
    torchrun(*train_args(image_folder, tmp_path / 'resumed', *common,
                         '--resume', str(tmp_path / 'full' / 'run' / 'checkpoint-0.pth.tar')))
    uninterrupted, resumed = read_summary(tmp_path / 'full')[1], read_summary(tmp_path / 'resumed')[0]
    for key in ('train_loss_kd', 'train_loss_ce'):
        assert float(resumed[key]) == pytest.approx(float(uninterrupted[key]), rel=1e-3), key


def test_fashion_mnist_from_debian_package(tmp_path):
    """The `fashion_mnist` data set reads the IDX files of `dataset-fashion-mnist`, no download."""
    main(['--dataset', 'fashion_mnist', '--train-subset', '64', '--val-subset', '32', '--img-size', '28', '-j', '2',
          '--output', str(tmp_path), '--experiment', 'run', '-b', '16', '--epochs', '1', '--device', 'cpu',
          '--selfkd', 'bake'])
    (row,) = read_summary(tmp_path)
    assert float(row['train_images']) == 128
    assert float(row['eval_top1']) >= 0


def _fails(capsys, tmp_path, argv, expected):
    """The run exits with status 2, one error line naming the problem, and no output folder."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(['--device', 'cpu', '-j', '0', '--epochs', '1'] + argv + ['--output', str(output)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'error:' in err[0] and expected in err[0], err
    assert not output.exists()


@pytest.mark.parametrize('extra, expected', [
    (['--selfkd', 'dbl'], "unknown self-KD method 'dbl' (did you mean 'dlb'?)"),
    (['--selfkd', 'dlb', '-b', '7'], 'even batch size'),
    (['--selfkd', 'bake', '-b', '9'], 'multiple of 2'),
    (['--selfkd', 'bake', '--bake-same-class', '3', '-b', '6'], 'multiple of 4'),
    (['--selfkd', 'dlb', '--mixup', '0.2', '--mixup-mode', 'pair'], 'a replayed mix needs --mixup-mode batch'),
    (['--selfkd', 'dlb', '--bake-omega', '0.9'], 'hyper-parameter of bake'),
    (['--selfkd', 'bake', '--bake-omega', '1.5'], 'omega must be'),
    (['--model', 'no_such_model'], 'Unknown model'),
    (['--selfkd', 'lsrkd_tc', '--lsrkd-tc-gamma', '0.2'], 'lsrkd_tc gamma must be > 1/K = 0.25 for 4 classes'),
    (['--selfkd', 'tfkd_reg', '--tfkd-reg-gamma', '0.2'], 'tfkd_reg gamma must be > 1/K = 0.25 for 4 classes'),
    (['--selfkd', 'lsrkd_tc', '--lsrkd-tc-gamma', '1.0'], 'lsrkd_tc gamma must be in (0, 1), got 1.0'),
    (['--selfkd', 'cskd', '-b', '9'], 'CS-KD batch size 9 cannot hold whole groups'),
    (['--selfkd', 'ddgsd', '-b', '7'], 'DDGSD batch size 7 cannot hold whole sets of 2 views'),
    (['--selfkd', 'ddgsd', '--ddgsd-mmd-weight', '-0.5'], 'ddgsd mmd_weight must be >= 0'),
    (['--selfkd', 'ddgsd+dlb', '--cutmix', '1.0', '--mixup-mode', 'elem'], 'keeps the 2 rows of an image under one '
                                                                            'mix only in --mixup-mode batch'),
    (['--selfkd', 'ddgsd+dlb', '-b', '6'], 'ddgsd+dlb with -b 6 gives dlb batches of 3 images'),
    (['--selfkd', 'ddgsd+cskd'], 'cskd cannot carry a batch layout'),
    (['--selfkd', 'ddgsd+dlb', '--ddgsd-mmd-weight', '0.1'], 'mmd_weight must be 0 when DDGSD is stacked'),
])
def test_bad_input_is_one_line(image_folder, tmp_path, capsys, extra, expected):
    _fails(capsys, tmp_path, ['--data-dir', image_folder, '--img-size', '32', '-b', '8'] + extra, expected)


@pytest.mark.parametrize('extra, expected', [
    (['--epochs', '0'], '--epochs must be >= 1, got 0'),
    (['-b', '0'], '--batch-size must be >= 1, got 0'),
    (['--smoothing', '1.0'], '--smoothing must be >= 0 and < 1'),
    (['--log-interval', '0'], '--log-interval must be >= 1'),
    (['--reprob', '1.5'], '--reprob must be in [0, 1]'),
    (['--checkpoint-hist', '0'], '--checkpoint-hist must be >= 1'),
    (['--train-crop-mode', 'pad', '--train-crop-padding', '-2'], '--train-crop-padding must be >= 0'),
    (['--cutout', '-16'], '--cutout must be >= 0'),
    (['-b', '64'], 'does not fill one batch of 64: lower -b'),
])
def test_bad_values_are_one_line(image_folder, tmp_path, capsys, extra, expected):
    """Values timm would meet with an assertion or a crash mid-run (an empty epoch) are usage errors."""
    _fails(capsys, tmp_path, ['--data-dir', image_folder, '--img-size', '32', '-b', '8'] + extra, expected)


@pytest.mark.parametrize('prefetcher', [[], ['--no-prefetcher']])
def test_dlb_with_pad_crop_and_cutout(image_folder, tmp_path, prefetcher):
    """CutOut + DLB with the CIFAR recipes' crop, through timm's loader with and without its prefetcher."""
    main(train_args(image_folder, tmp_path, '--img-size', '32', '--selfkd', 'dlb', '--train-crop-mode', 'pad',
                    '--cutout', '16', '--model', 'test_resnet', *prefetcher))
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss'])) and float(row['train_loss_kd']) > 0


def test_missing_dataset(tmp_path, capsys):
    _fails(capsys, tmp_path, ['--data-dir', str(tmp_path / 'nowhere')], 'does not exist')
    _fails(capsys, tmp_path, ['--dataset', 'fashion_mnist', '--data-dir', str(tmp_path)], 'Fashion-MNIST files')
    _fails(capsys, tmp_path, ['--dataset', 'torch/cifar10', '--data-dir', str(tmp_path)], 'could not be loaded')


@pytest.mark.parametrize('method, name', [('bake', 'BAKE'), ('cskd', 'CS-KD')])
def test_class_with_single_image(tmp_path, capsys, method, name):
    write_image_folder(str(tmp_path / 'data' / 'train'), [4, 4, 1])
    write_image_folder(str(tmp_path / 'data' / 'validation'), [2, 2, 2])
    _fails(capsys, tmp_path, ['--data-dir', str(tmp_path / 'data'), '--selfkd', method, '-b', '4'],
           f'{name} needs at least two images per class, but class 2 has one')


def test_unknown_recipe_key_names_closest(tmp_path, capsys):
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text('selfkd: dlb\ndlb_alpah: 0.5\n')
    _fails(capsys, tmp_path, ['-c', str(recipe)], "unknown key 'dlb_alpah' in recipe")
    _fails(capsys, tmp_path, ['-c', str(recipe)], "(did you mean 'dlb_alpha'?)")
    recipe.write_text('bach_size: 32\n')
    _fails(capsys, tmp_path, ['-c', str(recipe)], "(did you mean 'batch_size'?)")


def test_plain_training_with_mixup_and_cutmix(image_folder, tmp_path):
    """`none` keeps timm's mixup/cutmix collate and its soft-target cross-entropy."""
    main(train_args(image_folder, tmp_path, '--selfkd', 'none', '--img-size', '32', '--mixup', '0.2',
                    '--cutmix', '1.0'))
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss']))


def test_model_ema_with_wrapped_bake_model(image_folder, tmp_path):
    """EMA of BAKE's (logits, features) module is validated and saved as the plain timm model."""
    main(train_args(image_folder, tmp_path, '--selfkd', 'bake', '--img-size', '32', '--model-ema'))
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['eval_ema_top1']))
    checkpoint = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)
    model = timm.create_model('resnet18', num_classes=NUM_CLASSES)
    model.load_state_dict(checkpoint['state_dict_ema'])


def test_torchvision_grayscale_dataset_feeds_rgb_model(tmp_path):
    """timm's `torch/fashion_mnist` (torchvision layout, grayscale PIL images) with a 3-channel model."""
    raw = tmp_path / 'data' / 'FashionMNIST' / 'raw'
    raw.mkdir(parents=True)
    for path in glob.glob('/usr/share/datasets/fashion-mnist/*.gz'):  # torchvision reads the unpacked files
        with gzip.open(path) as packed:
            (raw / os.path.basename(path)[:-3]).write_bytes(packed.read())
    main(['--dataset', 'torch/fashion_mnist', '--data-dir', str(tmp_path / 'data'), '--train-subset', '32',
          '--val-subset', '16', '--img-size', '28', '--output', str(tmp_path), '--experiment', 'run', '-b', '8',
          '--epochs', '1', '--device', 'cpu', '-j', '0', '--selfkd', 'dlb', '--val-split', 'test'])
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['eval_loss']))


def test_one_channel_input_size_and_a_subset_missing_classes(tmp_path):
    """`--input-size 1 28 28` gives a 1-channel model and data; a 16-image subset lacking some classes
    still gets a model with every class of the data set."""
    main(['--dataset', 'fashion_mnist', '--input-size', '1', '28', '28', '--train-subset', '16', '--seed', '3',
          '--val-subset', '64', '--output', str(tmp_path), '--experiment', 'run', '-b', '8', '--epochs', '1',
          '--device', 'cpu', '-j', '0'])
    checkpoint = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)
    assert checkpoint['state_dict']['conv1.weight'].shape[1] == 1
    assert checkpoint['state_dict']['fc.weight'].shape[0] == 10
