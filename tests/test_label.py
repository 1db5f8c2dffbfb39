"""The label-teacher family (`lsrkd`, `lsrkd_tc`, `tfkd_reg`): one task, three presets.

References are written from the equations with plain `math` on lists (LsrKD paper eq. 10-12) or, for Tf-KD_reg,
with the official code's formula on a materialised teacher matrix; never by calling the code under test.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_selfkd
from conftest import checked_hparams, hand_ce, log_softmax_row
from timm_selfkd.components.losses import class_teacher_kl, corrected_teacher
from timm_selfkd.methods.lsrkd_tfkd import LabelTeacherTask, LsrKDHparams, LsrKDTCHparams, TfKDRegHparams

LOGITS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]
TARGET = [3, 0, 1]


def hand_kl(teacher_rows, logit_rows, temperature):
    """mean_i sum_k q_ik (log q_ik - log softmax(z_i / T)_k), 0 log 0 = 0."""
    total = 0.0
    for q, z in zip(teacher_rows, logit_rows):
        log_p = log_softmax_row(z, temperature)
        total += sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p) if qk > 0)
    return total / len(teacher_rows)


def eq11_rows(gamma, target, num_classes):
    """Eq. 11 written out: gamma on the label, (1 - gamma) / (K - 1) elsewhere."""
    return [[gamma if k == y else (1 - gamma) / (num_classes - 1) for k in range(num_classes)] for y in target]


class Fixed(nn.Module):
    """A 'model' that returns given logits (as a differentiable function of its input) and tells its classes."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


# ---------------------------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------------------------

def test_corrected_teacher_eq11_literal():
    """Eq. 11 for K=4, gamma=0.4: 0.4 on the label, 0.2 elsewhere; gamma=1/K is the uniform teacher."""
    assert corrected_teacher(4, 0.4) == pytest.approx((0.4, 0.2))
    assert corrected_teacher(5, 0.2) == pytest.approx((0.2, 0.2))
    for gamma in (0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match='gamma'):
            corrected_teacher(5, gamma)


@pytest.mark.parametrize('gamma, temperature', [(0.25, 1.0), (0.25, 3.0), (0.4, 2.0), (0.97, 4.0)])
def test_class_teacher_kl_matches_hand_computed(gamma, temperature):
    """KL(q' || softmax(z / T)) with q' from eq. 11 written out row by row (gamma = 1/K: uniform teacher)."""
    true_prob, other_prob = gamma, (1 - gamma) / 3
    value = class_teacher_kl(torch.tensor(LOGITS), torch.tensor(TARGET), true_prob, other_prob, temperature)
    assert value.item() == pytest.approx(hand_kl(eq11_rows(gamma, TARGET, 4), LOGITS, temperature), rel=1e-5)


def test_class_teacher_kl_literal_value():
    """K=2, z = [0, 0], uniform teacher: KL = 0. z = [log 3, 0] at T=1, teacher (0.5, 0.5):
    KL = 0.5 log(0.5 / 0.75) + 0.5 log(0.5 / 0.25) = 0.5 log(4/3) = 0.143841..."""
    assert class_teacher_kl(torch.zeros(1, 2), torch.tensor([0]), 0.5, 0.5, 1.0).item() == pytest.approx(0, abs=1e-7)
    value = class_teacher_kl(torch.tensor([[math.log(3), 0.0]]), torch.tensor([1]), 0.5, 0.5, 1.0)
    assert value.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)


def test_class_teacher_kl_gradient_is_softmax_minus_teacher_over_t():
    """d KL / dz = (softmax(z / T) - q) / (T N) (eq. 8), for the corrected teacher."""
    z = torch.tensor(LOGITS, requires_grad=True)
    temperature, gamma = 2.0, 0.55
    class_teacher_kl(z, torch.tensor(TARGET), gamma, (1 - gamma) / 3, temperature).backward()
    expected = (torch.softmax(torch.tensor(LOGITS) / temperature, dim=1)
                - torch.tensor(eq11_rows(gamma, TARGET, 4))) / (temperature * len(TARGET))
    torch.testing.assert_close(z.grad, expected)


def test_class_teacher_kl_bf16_autocast_is_finite_float32():
    z = (torch.randn(6, 100) * 60).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        value = class_teacher_kl(z, torch.arange(6), 0.99, 0.01 / 99, 3.0)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------------
# The three presets
# ---------------------------------------------------------------------------------------------------------------------

def run(name, **hparams):
    task = timm_selfkd.create_task(name, Fixed(), **hparams)
    return task, task(torch.tensor(LOGITS), torch.tensor(TARGET))


def test_lsrkd_eq10_golden_value():
    """(1 - alpha) ce + alpha * T * KL(u || softmax(z / T)) with the paper's alpha = 0.1, T = 3."""
    task, out = run('lsrkd')
    assert isinstance(task, LabelTeacherTask) and isinstance(task.hparams, LsrKDHparams)
    kl = hand_kl([[0.25] * 4] * 3, LOGITS, 3.0)
    ce = hand_ce(LOGITS, TARGET)
    assert out['loss_kd'].item() == pytest.approx(3.0 * kl, rel=1e-5)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-6)
    assert out['loss'].item() == pytest.approx(0.9 * ce + 0.1 * 3.0 * kl, rel=1e-5)


def test_lsrkd_tc_eq12_golden_value():
    """(1 - alpha) ce + alpha * T * KL(q' || softmax(z / T)), q' from eq. 11, alpha 0.2, T 2, gamma 0.7."""
    _, out = run('lsrkd_tc', alpha=0.2, temperature=2.0, gamma=0.7)
    kl = hand_kl(eq11_rows(0.7, TARGET, 4), LOGITS, 2.0)
    ce = hand_ce(LOGITS, TARGET)
    assert out['loss'].item() == pytest.approx(0.8 * ce + 0.2 * 2.0 * kl, rel=1e-5)


def tfkd_reg_official(logits, target, alpha, temperature, multiplier, correct_prob=0.99):
    """The Tf-KD_reg loss of the official code, on a materialised virtual-teacher matrix:
    (1 - a) ce + a * KLDivLoss(mean over all N*K entries)(log_softmax(z), softmax(q / T)) * multiplier."""
    num_classes = logits.shape[1]
    q = torch.full_like(logits, (1 - correct_prob) / (num_classes - 1))
    q[torch.arange(len(target)), target] = correct_prob
    teacher = F.softmax(q / temperature, dim=1)
    kl_mean = (teacher * (teacher.log() - F.log_softmax(logits, dim=1))).mean()
    return (1 - alpha) * F.cross_entropy(logits, target) + alpha * kl_mean * multiplier


@pytest.mark.parametrize('hparams', [{}, {'alpha': 0.95, 'temperature': 40.0, 'multiplier': 1.0}])
def test_tfkd_reg_preset_matches_official_formula(hparams):
    """Defaults 0.99 / T 20 / alpha 0.1 / multiplier 100 (ResNet-18, CIFAR-100) and MobileNetV2's setting."""
    task, out = run('tfkd_reg', **hparams)
    defaults = dict(alpha=0.1, temperature=20.0, multiplier=100.0)
    assert (task.hparams.alpha, task.hparams.temperature, task.hparams.multiplier, task.hparams.gamma) == \
        (*[{**defaults, **hparams}[k] for k in ('alpha', 'temperature', 'multiplier')], 0.99)
    expected = tfkd_reg_official(torch.tensor(LOGITS), torch.tensor(TARGET), **{**defaults, **hparams})
    assert out['loss'].item() == pytest.approx(expected.item(), rel=1e-5)


def test_tfkd_reg_softened_teacher_by_hand():
    """K=2, gamma 0.99, T 20: softmax([0.99, 0.01] / 20) puts e^0.049 / (1 + e^0.049) on the label."""
    true_prob, other_prob = TfKDRegHparams().teacher(2)
    assert true_prob == pytest.approx(math.exp(0.049) / (1 + math.exp(0.049)), rel=1e-9)
    assert true_prob + other_prob == pytest.approx(1.0)


def test_teacher_is_built_once_per_class_count(monkeypatch):
    """The teacher comes from the model's num_classes at construction; steps never rebuild it; a model that
    does not tell its class count gets it at its first step."""
    calls = []
    original = LsrKDTCHparams.teacher
    monkeypatch.setattr(LsrKDTCHparams, 'teacher', lambda self, k: calls.append(k) or original(self, k))
    task = timm_selfkd.create_task('lsrkd_tc', Fixed(), gamma=0.5)
    for _ in range(3):
        task(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert calls == [4]
    model = Fixed()
    del model.num_classes
    task = timm_selfkd.create_task('lsrkd_tc', model, gamma=0.5)
    for _ in range(3):
        task(torch.tensor(LOGITS), torch.tensor(TARGET))
    assert calls == [4, 4]


@pytest.mark.parametrize('name, gamma', [('lsrkd_tc', 0.25), ('lsrkd_tc', 0.1), ('tfkd_reg', 0.2)])
def test_gamma_not_above_one_over_k_fails_when_k_is_known(name, gamma):
    """gamma in (0, 1) passes the hyper-parameters' check; with a 4-class model, gamma <= 1/4 is refused at
    construction."""
    hparams = checked_hparams(name, gamma=gamma)
    with pytest.raises(ValueError, match=r'gamma must be > 1/K = 0.25 for 4 classes'):
        timm_selfkd.create_task(name, Fixed(), gamma=hparams.gamma)


@pytest.mark.parametrize('name, hparams', [('lsrkd_tc', {'gamma': 1.0}), ('lsrkd_tc', {'gamma': 0.0}),
                                           ('tfkd_reg', {'gamma': 1.2}), ('lsrkd', {'alpha': 1.5}),
                                           ('lsrkd', {'temperature': 0.0}), ('tfkd_reg', {'multiplier': -1.0})])
def test_out_of_range_hparams(name, hparams):
    with pytest.raises(ValueError, match=f'^{name} {next(iter(hparams))} must be '):
        checked_hparams(name, **hparams)


def test_every_preset_takes_mixup_from_the_loader():
    """LsrKD's uniform teacher ignores the label; TC and Tf-KD_reg build a mixed image's teacher from its mixed
    label, lambda-weighted (tests/test_mixup_semantics.py): all three take timm's mixed batches."""
    for name in ('lsrkd', 'lsrkd_tc', 'tfkd_reg'):
        spec = timm_selfkd.get_method(name)
        needs = spec.task_cls.requirements(spec.hparams_cls())
        assert needs.mixup == 'loader'


def test_lsrkd_with_soft_mixup_targets():
    """With mixup targets (N, K) the CE is timm's soft-target CE and the uniform teacher never reads the label."""
    task = timm_selfkd.create_task('lsrkd', Fixed(), criterion_kwargs=dict(soft_targets=True))
    soft = torch.tensor([[0.0, 0.0, 0.3, 0.7], [1.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
    out = task(torch.tensor(LOGITS), soft)
    ce = -sum(sum(t * lp for t, lp in zip(row, log_softmax_row(z))) for row, z in zip(soft.tolist(), LOGITS)) / 3
    kl = hand_kl([[0.25] * 4] * 3, LOGITS, 3.0)
    assert out['loss'].item() == pytest.approx(0.9 * ce + 0.3 * kl, rel=1e-5)


def test_bf16_autocast_with_timm_model_is_finite():
    import timm
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10)
    for name in ('lsrkd', 'lsrkd_tc', 'tfkd_reg'):
        task = timm_selfkd.create_task(name, model)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = task(torch.randn(2, 3, 32, 32), torch.tensor([1, 7]))
        assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss']), name
