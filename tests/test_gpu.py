"""GPU cells: fp16 AMP with loss scaling for every method (the compatibility matrix's fp16 cell), sync-BN under
torchrun on two GPUs (its sync-BN cell), and the fp16 path of the non-finite guard. Skipped without CUDA;
`--matrix-json FILE` records the cells (see benchmarks/compat_matrix.py)."""
import csv
import math
import os

import pytest
import torch

from matrix_support import Probe, ddp_cell
from test_train import METHOD_ARGS  # per-method flags the 4-class set needs
from timm_selfkd import train
from compat_matrix import matrix_methods
from timm_selfkd.train import main


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
METHODS = matrix_methods()


def cuda_args(data_dir, output, *extra):
    return ['--data-dir', data_dir, '--output', str(output), '--experiment', 'run', '-b', '8', '--epochs', '1',
            '--warmup-epochs', '0', '--device', 'cuda', '-j', '0', '--lr', '0.01', '--img-size', '32',
            '--model', 'test_resnet', '--amp', '--amp-dtype', 'float16', *extra]


def summary(output):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize('method', METHODS)
def test_fp16_loss_scaling_trains_every_method(image_folder, tmp_path, method, matrix, monkeypatch):
    """fp16 autocast reaches the model, the loss is scaled (a GradScaler steps the optimizer), and every loss term
    is a finite float32."""
    matrix.expect(method, 'fp16')
    monkeypatch.setattr(train, 'Setup', Probe)
    main(cuda_args(image_folder, tmp_path, '--selfkd', method, *METHOD_ARGS.get(method, [])))
    (row,) = summary(tmp_path)
    assert row['status'] == 'ok' and math.isfinite(float(row['train_loss']))
    probe = Probe.last
    assert probe.grad_scaler is not None and probe.grad_scaler.get_scale() > 0 and probe.updates > 0
    for step in probe.steps:
        assert step['autocast']
        assert all(dtype == torch.float32 for dtype, _, _ in step['terms'].values()), step['terms']


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA devices')
def test_sync_bn_on_two_gpus_for_every_method(image_folder, tmp_path, matrix):
    """`--sync-bn` under torchrun x2 (NCCL), every method in one launch: the model's BatchNorm layers are
    SyncBatchNorm, and both ranks end with the same weights and the same BatchNorm statistics."""
    records = ddp_cell(matrix, 'sync_bn', METHODS, METHOD_ARGS, image_folder, tmp_path, '--device', 'cuda',
                       '--sync-bn', backend='nccl')
    for method, (first, second) in records.items():
        if first['outcome'] == 'passed':
            assert first['sync_bn_layers'] > 0 and first['buffers'] == second['buffers'], method


def test_fp16_guard_waits_for_consecutive_skipped_steps(image_folder, tmp_path, capsys):
    """With loss scaling a diverged run is stopped only after --nonfinite-patience bad steps in a row."""
    with pytest.raises(SystemExit) as exc:
        main(cuda_args(image_folder, tmp_path, '--lr', '1e12', '--nonfinite-patience', '2', '--epochs', '3',
                       '--check-interval', '1'))
    assert exc.value.code == 1
    assert 'is not finite at epoch' in capsys.readouterr().err
    assert summary(tmp_path)[-1]['status'] == 'diverged'
