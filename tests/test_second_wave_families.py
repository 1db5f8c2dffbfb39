"""The second wave of methods (issue 17) on the model families beside the matrix's ResNet: each method trains one
epoch through our train.py on a ViT and through a user's unmodified timm train.py (the upstream adapter) on an
EfficientNet, with finite loss terms of its own, and leaves a checkpoint timm loads as the plain model (the
methods' heads, branches and self-teachers are training-only). The ResNet runs, bf16, mixup/CutMix, torchrun x2 and
exact resume of every method are the compatibility matrix (tests/test_matrix.py, tests/test_preemption.py)."""
import csv
import math
import os

import pytest
import timm

from conftest import NUM_CLASSES
from test_upstream import SNAPSHOT, fresh_log_handlers, needs_upstream, script  # noqa: F401  (the fixture, for the adapter's runs)
from timm_selfkd import upstream
from timm_selfkd.train import main

SECOND_WAVE = ['uskd', 'zipfls', 'dks', 'frskd', 'mixskd', 'rdrop']
VIT = ('test_vit', {'img_size': 32, 'patch_size': 8})  # 4x4 patch tokens, 6 blocks
EFFICIENTNET = ('test_efficientnet', {})


def run_args(data, output, model, model_kwargs, *extra):
    kwargs = [f'{k}={v}' for k, v in model_kwargs.items()]
    return ['--data-dir', data, '--output', str(output), '--experiment', 'run', '--model', model,
            *(['--model-kwargs', *kwargs] if kwargs else []), '--num-classes', str(NUM_CLASSES), '--img-size', '32',
            '-b', '8', '--epochs', '1', '--warmup-epochs', '0', '--lr', '0.01', '--device', 'cpu', '-j', '0',
            '--log-interval', '50', *extra]


def check_run(output, method, model, model_kwargs):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        (row,) = list(csv.DictReader(f))
    terms = {k: float(v) for k, v in row.items() if k.startswith('train_loss_') and k != 'train_loss_ce'}
    assert terms and all(math.isfinite(v) for v in terms.values()), (method, row)
    assert math.isfinite(float(row['train_loss'])) and math.isfinite(float(row['eval_loss'])), (method, row)
    timm.create_model(model, num_classes=NUM_CLASSES, checkpoint_path=str(output / 'run' / 'last.pth.tar'),
                      **model_kwargs)  # strict: the plain timm model, nothing of the method's training-only parts


@pytest.mark.parametrize('method', SECOND_WAVE)
def test_trains_a_vit_through_train_py(image_folder, tmp_path, method):
    model, kwargs = VIT
    main(run_args(image_folder, tmp_path, model, kwargs, '--selfkd', method))
    check_run(tmp_path, method, model, kwargs)


@needs_upstream
@pytest.mark.parametrize('method', SECOND_WAVE)
def test_trains_an_efficientnet_through_the_users_script(image_folder, tmp_path, method):
    model, kwargs = EFFICIENTNET
    upstream.main([script(SNAPSHOT), *run_args(image_folder, tmp_path, model, kwargs, '--selfkd', method)])
    check_run(tmp_path, method, model, kwargs)
