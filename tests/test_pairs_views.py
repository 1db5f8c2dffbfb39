"""CS-KD (anchor/partner batches) and DDGSD (two views per image): losses, gradients, samplers, bad input.

References are written with plain `math` on lists from the formulas (METHODS.md, CS-KD eq. 3), never by
calling the code under test.
"""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler

import timm_selfkd
from conftest import checked_hparams, hand_ce, hand_kd
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.components.samplers import ClassGroupBatchSampler, ViewsBatchSampler

# Six rows of logits over 3 classes
ROWS = [[1.0, 2.0, 0.5], [0.0, 1.5, -1.0], [2.0, 0.0, 0.0], [0.3, 0.3, 2.5], [1.0, -1.0, 1.0], [0.0, 2.0, 1.0]]
LABELS = [1, 1, 0, 2, 0, 1]


class Identity(nn.Module):
    """Logits = input (times a parameter, so the optimiser has something), with timm's feature interface:
    pooled features = input + 1, head = features - 1."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward_features(self, x):
        return x * self.scale + 1

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else x - 1

    def forward(self, x):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------------
# CS-KD
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('weight, temperature', [(1.0, 4.0), (3.0, 2.0)])
def test_cskd_loss_golden(weight, temperature):
    """Batch [3 anchors, 3 partners]: ce(anchors) + lambda T^2 KL(sm(z_p/T) || sm(z_a/T)); partners get no ce."""
    task = timm_selfkd.create_task('cskd', Identity(), weight=weight, temperature=temperature)
    out = task(torch.tensor(ROWS), torch.tensor(LABELS))
    anchors, partners = ROWS[:3], ROWS[3:]
    ce, kd = hand_ce(anchors, LABELS[:3]), hand_kd(partners, anchors, temperature)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-6)
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-5)
    assert out['loss'].item() == pytest.approx(ce + weight * kd, rel=1e-5)
    assert out['output'].shape == (3, 3)


def test_cskd_partners_are_a_detached_teacher_in_their_own_pass():
    """Anchors forward with gradient, then partners without: the partner rows get no gradient at all."""
    model = Identity()
    task = timm_selfkd.create_task('cskd', model)
    x = torch.tensor(ROWS, requires_grad=True)
    task(x, torch.tensor(LABELS))['loss'].backward()
    assert model.calls == [(3, True), (3, False)]
    assert x.grad[:3].abs().sum() > 0 and (x.grad[3:] == 0).all()


def test_cskd_defaults_and_sampler():
    spec = timm_selfkd.get_method('cskd')
    hparams = spec.hparams_cls()
    assert (hparams.weight, hparams.temperature) == (1.0, 4.0)
    task = timm_selfkd.create_task('cskd', Identity())
    assert task.needs.own_batches
    sampler = task.batch_sampler(index_sampler=None, labels=[0, 1] * 4, batch_size=4, seed=0, rank=0, world_size=1)
    assert isinstance(sampler, ClassGroupBatchSampler) and sampler.layout == 'anchors_first'
    with pytest.raises(ValueError, match='CS-KD needs the class label'):
        task.batch_sampler(index_sampler=None, labels=None, batch_size=4, seed=0, rank=0, world_size=1)


@pytest.mark.parametrize('name, batch_size', [('cskd', 7), ('ddgsd', 9)])
def test_batch_must_hold_whole_pairs(name, batch_size):
    spec = timm_selfkd.get_method(name)
    spec.task_cls.check_setup(spec.hparams_cls(), batch_size=batch_size + 1)
    MethodWiring(spec, spec.hparams_cls()).check(batch_size=batch_size + 1)
    with pytest.raises(ValueError, match='multiple of 2'):
        spec.task_cls.check_setup(spec.hparams_cls(), batch_size=batch_size)
    with pytest.raises(ValueError, match='multiple of 2'):
        MethodWiring(spec, spec.hparams_cls()).check(batch_size=batch_size)
    needs = spec.task_cls.requirements(spec.hparams_cls())
    assert needs.mixup == 'task'  # the pairs are mixed alike (test_mixup_pairs.py)


# ---------------------------------------------------------------------------------------------------------------------
# DDGSD
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('weight, temperature', [(1.0, 4.0), (0.5, 1.0)])
def test_ddgsd_loss_golden(weight, temperature):
    """Rows (0, 1), (2, 3), (4, 5) are views a, b of three images: ce over all six rows +
    w T^2 [KL(sm(z_b/T) || sm(z_a/T)) + KL(sm(z_a/T) || sm(z_b/T))]; no MMD term by default."""
    model = Identity()
    task = timm_selfkd.create_task('ddgsd', model, weight=weight, temperature=temperature)
    out = task(torch.tensor(ROWS), torch.tensor(LABELS))
    view_a, view_b = ROWS[0::2], ROWS[1::2]
    ce = hand_ce(ROWS, LABELS)
    kd = hand_kd(view_b, view_a, temperature) + hand_kd(view_a, view_b, temperature)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-6)
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-5)
    assert out['loss'].item() == pytest.approx(ce + weight * kd, rel=1e-5)
    assert 'loss_mmd' not in out and task.trainable_module is model


def test_ddgsd_each_kl_target_is_detached():
    """d(loss_kd)/d z_a = T (sm(z_a/T) - sm(z_b/T)) / N: only the KL whose student is z_a reaches z_a."""
    temperature = 2.0
    task = timm_selfkd.create_task('ddgsd', Identity(), temperature=temperature)
    x = torch.tensor(ROWS, requires_grad=True)
    task(x, torch.tensor(LABELS))['loss_kd'].backward()
    p = torch.softmax(torch.tensor(ROWS) / temperature, dim=1)
    expected = torch.empty_like(p)
    expected[0::2] = temperature * (p[0::2] - p[1::2]) / 3
    expected[1::2] = temperature * (p[1::2] - p[0::2]) / 3
    torch.testing.assert_close(x.grad, expected)


def test_ddgsd_mmd_on_pooled_features():
    """mmd_weight > 0: features from the same pass; loss_mmd = ||mean f_a - mean f_b||^2 by hand."""
    model = Identity()
    task = timm_selfkd.create_task('ddgsd', model, mmd_weight=0.5)
    out = task(torch.tensor(ROWS), torch.tensor(LABELS))
    features = [[v + 1 for v in row] for row in ROWS]
    mean_a = [sum(col) / 3 for col in zip(*features[0::2])]
    mean_b = [sum(col) / 3 for col in zip(*features[1::2])]
    mmd = sum((a - b) ** 2 for a, b in zip(mean_a, mean_b))
    assert out['loss_mmd'].item() == pytest.approx(mmd, rel=1e-5)
    expected = out['loss_ce'] + out['loss_kd'] + 0.5 * mmd
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-6)
    assert task.get_eval_model() is model and len(model.calls) == 0  # one pass through forward_features/head


def test_ddgsd_negative_mmd_weight():
    with pytest.raises(ValueError, match='ddgsd mmd_weight must be >= 0, got -0.1'):
        checked_hparams('ddgsd', mmd_weight=-0.1)


def test_ddgsd_sampler_views_of_rank_sampler():
    task = timm_selfkd.create_task('ddgsd', Identity())
    assert task.needs.own_batches
    index_sampler = DistributedSampler(range(12), num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler = task.batch_sampler(index_sampler=index_sampler, labels=None, batch_size=8, seed=0, rank=0,
                                 world_size=1)
    assert isinstance(sampler, ViewsBatchSampler) and len(sampler) == 3
    assert all(len(batch) == 8 and batch[0::2] == batch[1::2] for batch in sampler)


@pytest.mark.parametrize('name, kwargs', [('cskd', {}), ('ddgsd', {'mmd_weight': 0.1})])
def test_bf16_autocast_is_finite(name, kwargs):
    import timm
    torch.manual_seed(0)
    task = timm_selfkd.create_task(name, timm.create_model('resnet18', num_classes=5), **kwargs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(torch.randn(4, 3, 32, 32) * 30, torch.tensor([1, 3, 1, 3]))
    for key, value in out.items():
        if key.startswith('loss'):
            assert value.dtype == torch.float32 and torch.isfinite(value), key
