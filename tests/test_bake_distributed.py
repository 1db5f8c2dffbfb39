"""BAKE under DDP: with `global_batch`, each rank's targets are eq. 9 over the batch of all ranks."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import timm_selfkd
from timm_selfkd.components.losses import bake_targets

WORLD = 2
PER_RANK = 4


class TinyNet(nn.Module):
    """forward_features / forward_head(pre_logits) like a timm model."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward_features(self, x):
        return self.body(x)

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * PER_RANK, 6, generator=generator)


def _worker(rank, init_file, out_dir, global_batch):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    task = timm_selfkd.create_task('bake', TinyNet(), global_batch=global_batch)
    x = _data()[rank * PER_RANK:(rank + 1) * PER_RANK]
    output, features = task.trainable_module(x)
    torch.save(task.soft_targets(output, features), os.path.join(out_dir, f'{rank}.pt'))
    dist.destroy_process_group()


def _run(tmp_path, global_batch):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path), global_batch), nprocs=WORLD)
    return torch.cat([torch.load(tmp_path / f'{rank}.pt') for rank in range(WORLD)])


def _reference(rows):
    torch.manual_seed(0)
    model = TinyNet()
    x = _data()
    with torch.no_grad():
        features = model.forward_features(x)
        parts = [bake_targets(features[r], model.forward_head(features)[r], 0.5, 4.0) for r in rows]
    return torch.cat(parts)


def test_global_batch_targets_equal_single_process_eq9(tmp_path):
    targets = _run(tmp_path, global_batch=True)
    assert torch.allclose(targets, _reference([slice(0, WORLD * PER_RANK)]), atol=1e-6)


def test_local_batch_targets_stay_within_each_rank(tmp_path):
    targets = _run(tmp_path, global_batch=False)
    per_rank = [slice(r * PER_RANK, (r + 1) * PER_RANK) for r in range(WORLD)]
    assert torch.allclose(targets, _reference(per_rank), atol=1e-6)
    assert not torch.allclose(targets, _reference([slice(0, WORLD * PER_RANK)]), atol=1e-4)
