"""GPU cells: fp16 AMP with loss scaling and the fp16 path of the non-finite guard. Skipped without CUDA."""
import csv
import math
import os

import pytest
import torch

import timm_selfkd
from timm_selfkd.train import main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


def cuda_args(data_dir, output, *extra):
    return ['--data-dir', data_dir, '--output', str(output), '--experiment', 'run', '-b', '8', '--epochs', '1',
            '--warmup-epochs', '0', '--device', 'cuda', '-j', '0', '--lr', '0.01', '--img-size', '32',
            '--model', 'test_resnet', '--amp', '--amp-dtype', 'float16', *extra]


def summary(output):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('method', timm_selfkd.list_methods())
def test_fp16_loss_scaling_trains_every_method(image_folder, tmp_path, method):
    main(cuda_args(image_folder, tmp_path, '--selfkd', method))
    (row,) = summary(tmp_path)
    assert row['status'] == 'ok' and math.isfinite(float(row['train_loss']))


def test_fp16_guard_waits_for_consecutive_skipped_steps(image_folder, tmp_path, capsys):
    """With loss scaling a diverged run is stopped only after --nonfinite-patience bad steps in a row."""
    with pytest.raises(SystemExit) as exc:
        main(cuda_args(image_folder, tmp_path, '--lr', '1e12', '--nonfinite-patience', '2', '--epochs', '3',
                       '--check-interval', '1'))
    assert exc.value.code == 1
    assert 'is not finite at epoch' in capsys.readouterr().err
    assert summary(tmp_path)[-1]['status'] == 'diverged'
