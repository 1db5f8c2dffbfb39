"""CS-KD, DDGSD and CutMix + DLB under torchrun: two CPU processes (gloo), in one module so that the process
starts stay few."""
import math

import pytest
import torch

from conftest import NUM_CLASSES, TRAIN_PER_CLASS
from test_train import BATCH, read_summary, torchrun, train_args

PER_RANK = NUM_CLASSES * TRAIN_PER_CLASS // 2


@pytest.mark.parametrize('method, extra, per_rank_images', [
    ('cskd', [], 2 * PER_RANK),  # each rank's anchors (half the data) with one partner each
    ('ddgsd', ['--ddgsd-mmd-weight', '0.1'], PER_RANK // (BATCH // 2) * BATCH),  # two views, features for MMD
    ('dlb', ['--cutmix', '1.0', '--mixup-prob', '0.5'], BATCH + (PER_RANK - BATCH) * 2),
])
def test_torchrun_two_process_gloo(image_folder, tmp_path, method, extra, per_rank_images):
    torchrun(*train_args(image_folder, tmp_path, '--selfkd', method, '--img-size', '32', '--model', 'test_resnet',
                         *extra))
    (row,) = read_summary(tmp_path)
    assert float(row['train_images']) == 2 * per_rank_images
    assert math.isfinite(float(row['train_loss_kd'])) and float(row['train_loss_kd']) > 0
    if method == 'ddgsd':
        assert math.isfinite(float(row['train_loss_mmd']))
    if method == 'dlb':  # each rank's kept mix is gathered into the checkpoint with its kept logits
        state = torch.load(tmp_path / 'run' / 'last.pth.tar', map_location='cpu', weights_only=False)['task_state']
        assert state['last_mix'].shape == (2, 6) and state['last_logits'].shape == (2, BATCH // 2, NUM_CLASSES)
