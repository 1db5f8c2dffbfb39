"""Stacks `LAYOUT+METHOD`: DDGSD's two-view layout on DLB (DLB paper, sec. 4.3, table 3), and what is refused.

The golden value is written with plain `math` from the two papers' losses, never by calling the code under test.
"""
import dataclasses
import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import SequentialSampler

import timm_selfkd
from conftest import hand_ce, hand_kd
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.cli import method_hparams, parse_args
from timm_selfkd.methods.base import RunInfo
from timm_selfkd.methods.dlb import DLBTask
from timm_selfkd.components.samplers import LastBatchSampler, ViewsBatchSampler

NUM_CLASSES = 3


class Identity(nn.Module):
    """Logits = input (times a parameter)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


def test_spec_and_hparams_from_each_parts_flags():
    spec = timm_selfkd.get_method('ddgsd+dlb')
    assert issubclass(spec.task_cls, DLBTask) and 'ddgsd+dlb' not in timm_selfkd.list_methods()
    args = parse_args(['--selfkd', 'ddgsd+dlb', '--dlb-alpha', '0.5', '--ddgsd-weight', '2'])
    hparams = method_hparams(args)
    assert (hparams.dlb.alpha, hparams.dlb.temperature, hparams.ddgsd.weight) == (0.5, 3.0, 2.0)
    assert hparams.method == 'ddgsd+dlb'
    with pytest.raises(SystemExit):
        parse_args(['--selfkd', 'ddgsd+dlb', '--bake-omega', '0.9'])


@pytest.mark.parametrize('name, expected', [
    ('dlb+ddgsd', 'dlb is not a batch layout'),
    ('ddgsd+cskd', 'cskd cannot carry a batch layout'),
    ('ddgsd+ddgsd', 'stacks two batch layouts'),
    ('ddgsd+dlb+bake', 'a stack is one batch layout on one method'),
    ('ddgsd+dbl', "did you mean 'dlb'"),
])
def test_stacks_that_cannot_work(name, expected):
    with pytest.raises(ValueError, match=expected):
        timm_selfkd.get_method(name)


def test_check_setup_of_both_parts():
    spec = timm_selfkd.get_method('ddgsd+dlb')
    spec.task_cls.check_setup(spec.hparams_cls(), batch_size=8)
    MethodWiring(spec, spec.hparams_cls()).check(batch_size=8)
    with pytest.raises(ValueError, match='-b 6 gives dlb batches of 3 images .* even batch size'):
        spec.task_cls.check_setup(spec.hparams_cls(), batch_size=6)
    with pytest.raises(ValueError, match='multiple of 2'):
        spec.task_cls.check_setup(spec.hparams_cls(), batch_size=7)
    # DLB mixes the stack's batches itself, both views of an image alike (test_mixup_pairs.py)
    needs = spec.task_cls.requirements(spec.hparams_cls())
    assert needs.mixup == 'task' and needs.own_batches
    with_mmd = timm_selfkd.registry.build_hparams(spec, {'ddgsd': {'mmd_weight': 0.1}})
    with pytest.raises(ValueError, match='mmd_weight must be 0 when DDGSD is stacked'):
        spec.task_cls.check_setup(with_mmd, batch_size=8)


def test_views_of_dlb_batches():
    """-b 8: DLB batches of 4 images (2 repeated + 2 new), each image as two consecutive rows."""
    task = timm_selfkd.create_task('ddgsd+dlb', Identity(), batch_size=8)
    sampler = task.batch_sampler(index_sampler=SequentialSampler(range(8)), labels=None, batch_size=8, seed=0, rank=0,
                                 world_size=1)
    assert isinstance(sampler, ViewsBatchSampler) and isinstance(sampler.batch_sampler, LastBatchSampler)
    assert list(sampler) == [[0, 0, 1, 1, 2, 2, 3, 3], [2, 2, 3, 3, 4, 4, 5, 5], [4, 4, 5, 5, 6, 6, 7, 7]]
    none_stack = timm_selfkd.create_task('ddgsd+none', Identity())
    plain = none_stack.batch_sampler(index_sampler=SequentialSampler(range(8)), labels=None, batch_size=8, seed=0,
                                     rank=0, world_size=1)
    assert list(plain) == [[0, 0, 1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 6, 6, 7, 7]]


# Step 1: views of images 0, 1 | 2, 3. Step 2: views of images 2, 3 (repeated, re-augmented) | 4, 5.
STEP1 = [[1.0, 2.0, 0.5], [1.2, 1.5, 0.0], [2.0, 0.0, 0.0], [1.5, 0.5, 0.2], [0.3, 0.3, 2.5], [0.0, 0.8, 2.0],
         [1.0, -1.0, 1.0], [0.5, -0.5, 1.5]]
STEP2 = [[0.3, 0.6, 2.0], [0.1, 0.2, 2.6], [1.0, -0.8, 1.2], [0.9, -1.0, 0.9], [0.0, 2.0, 1.0], [0.2, 1.7, 1.0],
         [2.2, 0.1, 0.3], [2.0, 0.4, -0.1]]
LABELS1 = [1, 1, 0, 0, 2, 2, 2, 2]
LABELS2 = [2, 2, 2, 2, 1, 1, 0, 0]


def test_ddgsd_on_dlb_loss_golden():
    """Step 2 loss = ce over all 8 rows + alpha T^2 KL(sm(z1[4:]/T) || sm(z2[:4]/T)) row by row (both views of
    the repeated images) + w T'^2 [KL(b || a) + KL(a || b)] over the view pairs."""
    alpha, weight = 0.5, 2.0
    task = timm_selfkd.create_task('ddgsd+dlb', Identity(), num_epochs=1, steps_per_epoch=3, num_samples=8,
                                   batch_size=8, dlb={'alpha': alpha}, ddgsd={'weight': weight})
    first = task(torch.tensor(STEP1), torch.tensor(LABELS1))
    assert first['loss_kd'].item() == 0.0  # no last batch yet
    out = task(torch.tensor(STEP2), torch.tensor(LABELS2))
    ce = hand_ce(STEP2, LABELS2)
    last_batch = hand_kd(STEP1[4:], STEP2[:4], 3.0)
    views = hand_kd(STEP2[1::2], STEP2[0::2], 4.0) + hand_kd(STEP2[0::2], STEP2[1::2], 4.0)
    assert out['loss_kd'].item() == pytest.approx(last_batch, rel=1e-5)
    assert out['loss_ddgsd_kd'].item() == pytest.approx(views, rel=1e-5)
    assert out['loss'].item() == pytest.approx(ce + alpha * last_batch + weight * views, rel=1e-5)
    assert torch.equal(task.last_logits, torch.tensor(STEP2[4:]))  # both views of the new images are kept


def test_ddgsd_on_dlb_new_part_from_bind_run():
    """A new half is batch_size // 2 rows (both views of B/4 images), whatever the wrapped sampler counts."""
    task = timm_selfkd.create_task('ddgsd+dlb', Identity(), batch_size=16)
    assert task.new_per_step == 8
    task.bind_run(RunInfo(num_epochs=1, steps_per_epoch=3, num_samples=8, num_classes=NUM_CLASSES, batch_size=8))
    assert task.new_per_step == 4


def test_bf16_autocast_is_finite():
    import timm
    torch.manual_seed(0)
    task = timm_selfkd.create_task('ddgsd+dlb', timm.create_model('resnet18', num_classes=5), batch_size=8)
    x, y = torch.randn(8, 3, 32, 32) * 30, torch.tensor([1, 1, 3, 3, 0, 0, 2, 2])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        task(x, y)
        out = task(torch.cat([x[4:], x[:4]]), torch.cat([y[4:], y[:4]]))
    for key in ('loss', 'loss_kd', 'loss_ddgsd_kd'):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key


def test_stack_recipe_and_its_parts_as_baselines():
    """The DDGSD + DLB recipe runs as its parts too: the other part's recipe values are then ignored."""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                          'ddgsd_dlb_cifar100.yaml')
    assert method_hparams(parse_args(['-c', recipe])).ddgsd.weight == 1.0
    assert type(method_hparams(parse_args(['-c', recipe, '--selfkd', 'ddgsd']))).__name__ == 'DDGSDHparams'
    assert type(method_hparams(parse_args(['-c', recipe, '--selfkd', 'dlb']))).__name__ == 'DLBHparams'


def test_a_stack_keeps_either_part_s_bce_refusal(monkeypatch):
    """A stack's record refuses --bce-loss when its layout does, not only when its method does."""
    from timm_selfkd.methods.ddgsd import DDGSDTask
    spec = timm_selfkd.get_method('ddgsd+dlb')
    hparams = spec.hparams_cls()
    assert spec.task_cls.requirements(hparams).bce_refusal == ''
    layout_needs = DDGSDTask.requirements(hparams.ddgsd)
    monkeypatch.setattr(DDGSDTask, 'requirements', classmethod(
        lambda cls, hp: dataclasses.replace(layout_needs, bce_refusal='views need softmax')))
    assert spec.task_cls.requirements(hparams).bce_refusal == 'views need softmax'
