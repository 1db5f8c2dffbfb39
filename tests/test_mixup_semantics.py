"""Mixup/CutMix semantics of BAKE, LsrKD-TC, Tf-KD_reg and MrKD-TC (issue 15, item 1).

Each loss is checked on a fixed mix: fixed logits (and features), timm's partner of row i (row B-1-i, the batch
flipped), a fixed lambda (one for the batch, or one per row as timm's elem mode draws) and label smoothing 0 and
0.1. The targets the tasks receive are timm's own `mixup_target`; the references are written from the methods'
formulas with plain `math` on lists (BAKE's eq. 9 as the series of eq. 7), never by calling the code under test.
The last tests train each method end to end through `python train.py --mixup 0.2 --cutmix 1.0`.
"""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from timm.data.mixup import mixup_target

import timm_selfkd
from conftest import log_softmax_row
from timm_selfkd.components.losses import mixed_label_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4
LABELS = [0, 2, 2, 1]  # flipped partners: rows 0 and 3 mix classes 0 and 1, rows 1 and 2 both hold class 2
LOGITS = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0], [-1.0, 0.5, 0.25, 1.0]]
LAMS = {'batch': [0.7] * 4, 'elem': [0.7, 0.35, 0.9, 0.2]}
SMOOTHINGS = [0.0, 0.1]


# ---------------------------------------------------------------------------------------------------------------------
# The fixed mix, by hand
# ---------------------------------------------------------------------------------------------------------------------

def partner(i, batch=len(LABELS)):
    return batch - 1 - i


def hand_weights(lams, labels=LABELS):
    """Row i: lam_i on its class, 1 - lam_i on its partner's (1 when they agree)."""
    rows = []
    for i, (lam, y) in enumerate(zip(lams, labels)):
        row = [0.0] * K
        row[y] += lam
        row[labels[partner(i)]] += 1 - lam
        rows.append(row)
    return rows


def hand_targets(lams, smoothing, labels=LABELS):
    """timm's mixed target written out: lam * smoothed one-hot(y_i) + (1 - lam) * smoothed one-hot(partner)."""
    off = smoothing / K
    on = 1 - smoothing + off

    def one_hot(c):
        return [on if k == c else off for k in range(K)]

    return [[lam * a + (1 - lam) * b for a, b in zip(one_hot(y), one_hot(labels[partner(i)]))]
            for i, (lam, y) in enumerate(zip(lams, labels))]


def timm_targets(mode, smoothing):
    """The targets the task receives: timm's `mixup_target` (a per-row lambda column in elem mode)."""
    lam = LAMS[mode][0] if mode == 'batch' else torch.tensor(LAMS[mode]).unsqueeze(1)
    return mixup_target(torch.tensor(LABELS), K, lam, smoothing)


def hand_soft_ce(target_rows, logit_rows):
    return -sum(sum(t * lp for t, lp in zip(tr, log_softmax_row(z))) for tr, z in zip(target_rows, logit_rows)) \
        / len(target_rows)


def kl_row(q, z, temperature):
    log_p = log_softmax_row(z, temperature)
    return sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p) if qk > 0)


def mix_rows(weights, teacher_of_class):
    """sum_c w_c teacher(c), row by row."""
    return [[sum(w[c] * teacher_of_class(c)[k] for c in range(K)) for k in range(K)] for w in weights]


class Fixed(nn.Module):
    """Returns its input as logits (a differentiable function of it) and tells its class count."""

    def __init__(self, num_classes=K):
        super().__init__()
        self.num_classes = num_classes
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


@pytest.mark.parametrize('mode', sorted(LAMS))
@pytest.mark.parametrize('smoothing', SMOOTHINGS)
def test_mixed_label_weights_undo_timm_mixup_target(mode, smoothing):
    """w = (t - off) / (on - off) recovers lam and 1 - lam on the two labels, 0 elsewhere, rows summing to 1."""
    target = timm_targets(mode, smoothing)
    for row, hand in zip(target.tolist(), hand_targets(LAMS[mode], smoothing)):
        assert row == pytest.approx(hand, abs=1e-7)
    weights = mixed_label_weights(target)
    for row, hand in zip(weights.tolist(), hand_weights(LAMS[mode])):
        assert row == pytest.approx(hand, abs=1e-6)
    assert weights.sum(-1).tolist() == pytest.approx([1.0] * 4, abs=1e-6)


def test_mixed_label_weights_two_classes_need_the_smoothing():
    """With K = 2 the rows cannot tell smoothing from mix: the smoothing the task was built with is used."""
    target = mixup_target(torch.tensor([0, 1]), 2, 0.7, 0.1)  # row 0: 0.7 on class 0 (smoothed), 0.3 on class 1
    assert mixed_label_weights(target, 0.1).flatten().tolist() == pytest.approx([0.7, 0.3, 0.3, 0.7], abs=1e-6)
    with pytest.raises(ValueError, match='with 2 classes'):
        mixed_label_weights(target)


def test_two_class_teacher_takes_the_smoothing_the_task_was_built_with():
    """LsrKD-TC with K = 2, gamma 0.75, smoothing 0.1 given as train.py gives it (criterion_kwargs)."""
    logits = [[0.3, -0.4], [1.0, 0.5]]
    task = timm_selfkd.create_task('lsrkd_tc', Fixed(2), gamma=0.75, alpha=0.5, temperature=2.0,
                                   criterion_kwargs=dict(soft_targets=True, smoothing=0.1))
    out = task(torch.tensor(logits), mixup_target(torch.tensor([0, 1]), 2, 0.7, 0.1))
    teachers = [[0.7 * 0.75 + 0.3 * 0.25, 0.7 * 0.25 + 0.3 * 0.75], [0.3 * 0.75 + 0.7 * 0.25, 0.3 * 0.25 + 0.7 * 0.75]]
    kd = 2.0 * sum(kl_row(q, z, 2.0) for q, z in zip(teachers, logits)) / 2
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# LsrKD-TC and Tf-KD_reg: the class teacher of the mixed label, lambda-weighted
# ---------------------------------------------------------------------------------------------------------------------

def eq11(gamma):
    return lambda c: [gamma if k == c else (1 - gamma) / (K - 1) for k in range(K)]


def tfkd_teacher(gamma, temperature):
    """The official Tf-KD_reg teacher: softmax(q / T) of gamma on the label, (1 - gamma) / (K - 1) elsewhere."""
    def teacher(c):
        scaled = [v / temperature for v in eq11(gamma)(c)]
        total = sum(math.exp(v) for v in scaled)
        return [math.exp(v) / total for v in scaled]
    return teacher


@pytest.mark.parametrize('mode', sorted(LAMS))
@pytest.mark.parametrize('smoothing', SMOOTHINGS)
@pytest.mark.parametrize('method', ['lsrkd_tc', 'tfkd_reg'])
def test_class_teacher_of_a_mixed_label(method, smoothing, mode):
    """(1 - alpha) soft-CE(z, t) + alpha * s * mean_i KL(sum_c w_ic q(c) || softmax(z_i / T)) (LsrKD eq. 12; Tf-KD_reg
    official loss), the teacher lambda-weighted over the two labels of each mixed image."""
    hparams = {'lsrkd_tc': dict(gamma=0.5, alpha=0.2, temperature=3.0),
               'tfkd_reg': dict(gamma=0.9, alpha=0.3, temperature=2.0, multiplier=10.0)}[method]
    task = timm_selfkd.create_task(method, Fixed(), criterion_kwargs=dict(soft_targets=True, smoothing=smoothing),
                                   **hparams)
    out = task(torch.tensor(LOGITS), timm_targets(mode, smoothing))

    if method == 'lsrkd_tc':
        teacher, student_t, scale = eq11(0.5), 3.0, 3.0  # KL scale T (eq. 12)
    else:
        teacher, student_t, scale = tfkd_teacher(0.9, 2.0), 1.0, 10.0 / K  # multiplier / K, student at T = 1
    teachers = mix_rows(hand_weights(LAMS[mode]), teacher)
    kd = scale * sum(kl_row(q, z, student_t) for q, z in zip(teachers, LOGITS)) / len(LOGITS)
    ce = hand_soft_ce(hand_targets(LAMS[mode], smoothing), LOGITS)
    alpha = hparams['alpha']
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-5)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert out['loss'].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


@pytest.mark.parametrize('method', ['lsrkd_tc', 'tfkd_reg', 'mrkd_tc'])
def test_unmixed_soft_targets_give_the_hard_label_loss(method):
    """lam = 1 (a batch timm leaves unmixed) without smoothing: the same loss as the class labels."""
    extra = dict(gamma=0.5, copies=1, interval='1000') if method == 'mrkd_tc' else dict(gamma=0.5)
    model = Affine() if method == 'mrkd_tc' else Fixed()
    hard = timm_selfkd.create_task(method, model, **extra)(torch.tensor(LOGITS), torch.tensor(LABELS))
    soft_task = timm_selfkd.create_task(method, model, criterion_kwargs=dict(soft_targets=True), **extra)
    soft = soft_task(torch.tensor(LOGITS), mixup_target(torch.tensor(LABELS), K, 1.0, 0.0))
    for name in ('loss', 'loss_ce', 'loss_kd'):
        assert soft[name].item() == pytest.approx(hard[name].item(), rel=1e-6), name


# ---------------------------------------------------------------------------------------------------------------------
# MrKD-TC: each copy corrected to each mixed label (eq. 16), lambda-weighted
# ---------------------------------------------------------------------------------------------------------------------

class Affine(nn.Module):
    """logits = x W^T + b: the student is the identity; each copy's W and b are set by hand."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(K))
        self.bias = nn.Parameter(torch.zeros(K))
        self.num_classes = K

    def forward(self, x):
        return x @ self.weight.t() + self.bias


COPIES = [(0.5, [0.3, -0.2, 0.1, 0.0]), (-1.0, [0.0, 0.0, 0.0, 0.0])]  # copy i: logits = scale_i z + bias_i


def corrected(q, c, gamma):
    """Eq. 16: gamma on c, the rest in the teacher's own proportions."""
    return [gamma if k == c else (1 - gamma) * q[k] / (1 - q[c]) for k in range(K)]


@pytest.mark.parametrize('mode', sorted(LAMS))
@pytest.mark.parametrize('smoothing', SMOOTHINGS)
def test_mrkd_tc_corrects_each_copy_to_the_mixed_labels(smoothing, mode):
    """(1 - alpha) soft-CE + alpha * T * (1/n) sum_i mean_r KL(sum_c w_rc corrected(q_ir, c) || softmax(z_r / T))."""
    gamma, alpha, temperature = 0.5, 0.25, 3.0
    task = timm_selfkd.create_task('mrkd_tc', Affine(), copies=len(COPIES), interval='1000', gamma=gamma,
                                   alpha=alpha, temperature=temperature,
                                   criterion_kwargs=dict(soft_targets=True, smoothing=smoothing))
    task.ring.load_state_dict({'weight': torch.stack([s * torch.eye(K) for s, _ in COPIES]),
                               'bias': torch.tensor([b for _, b in COPIES])})
    out = task(torch.tensor(LOGITS), timm_targets(mode, smoothing))

    weights = hand_weights(LAMS[mode])
    total = 0.0
    for scale, bias in COPIES:
        for z, w in zip(LOGITS, weights):
            copy_logits = [scale * v + b for v, b in zip(z, bias)]
            q = [math.exp(lp) for lp in log_softmax_row(copy_logits, temperature)]
            teacher = [sum(w[c] * corrected(q, c, gamma)[k] for c in range(K) if w[c] > 0) for k in range(K)]
            total += kl_row(teacher, z, temperature)
    kd = temperature * total / (len(COPIES) * len(LOGITS))  # T, not T^2 (eq. 17)
    ce = hand_soft_ce(hand_targets(LAMS[mode], smoothing), LOGITS)
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-5)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert out['loss'].item() == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# BAKE: soft CE on the mixed targets, eq. 9 from the mixed images' features and predictions
# ---------------------------------------------------------------------------------------------------------------------

FEATURES = [[1.0, 0.0, 0.5], [0.2, 1.0, -0.3], [0.0, 0.4, 1.0], [0.7, -0.6, 0.1]]
FC_W = [[0.5, -0.2, 0.1], [0.0, 0.3, -0.4], [0.2, 0.2, 0.2], [-0.3, 0.1, 0.6]]
FC_B = [0.1, 0.0, -0.1, 0.05]


class Pooled(nn.Module):
    """A timm-like model whose pooled features are its input and whose classifier is a fixed linear layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, K)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor(FC_W))
            self.fc.bias.copy_(torch.tensor(FC_B))
        self.num_classes = K

    def get_classifier(self):
        return self.fc

    def forward_features(self, x):
        return x

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def hand_bake_targets(features, logits, omega, temperature, terms=200):
    """Eq. 3-4 affinities and the series of eq. 7, (1 - w) sum_t w^t A^t P, in plain math."""
    n = len(features)
    normed = [[v / math.sqrt(sum(x * x for x in f)) for v in f] for f in features]
    affinity = []
    for i in range(n):
        dots = [sum(a * b for a, b in zip(normed[i], normed[j])) if j != i else None for j in range(n)]
        total = sum(math.exp(d) for d in dots if d is not None)
        affinity.append([math.exp(d) / total if d is not None else 0.0 for d in dots])
    term = [[math.exp(lp) for lp in log_softmax_row(z, temperature)] for z in logits]
    result = [[(1 - omega) * v for v in row] for row in term]
    for t in range(1, terms):
        term = [[sum(affinity[i][j] * term[j][k] for j in range(n)) for k in range(K)] for i in range(n)]
        result = [[r + (1 - omega) * omega ** t * v for r, v in zip(rr, tr)] for rr, tr in zip(result, term)]
    return result


@pytest.mark.parametrize('mode', sorted(LAMS))
@pytest.mark.parametrize('smoothing', SMOOTHINGS)
def test_bake_on_a_mixed_batch(smoothing, mode):
    """The official BAKE + CutMix: soft-CE(z, t) + lambda T^2 mean_i KL(Q_i || softmax(z_i / T)), Q from eq. 9 on the
    mixed images' own features and logits (here the images are feature vectors mixed by hand with timm's partner
    and lambda)."""
    omega, temperature, weight = 0.5, 4.0, 0.7
    task = timm_selfkd.create_task('bake', Pooled(), omega=omega, temperature=temperature, weight=weight,
                                   criterion_kwargs=dict(soft_targets=True, smoothing=smoothing))
    lams = LAMS[mode]
    mixed = [[lam * a + (1 - lam) * b for a, b in zip(FEATURES[i], FEATURES[partner(i)])]
             for i, lam in enumerate(lams)]
    out = task(torch.tensor(mixed), timm_targets(mode, smoothing))

    logits = [[sum(w * x for w, x in zip(row, f)) + b for row, b in zip(FC_W, FC_B)] for f in mixed]
    soft = hand_bake_targets(mixed, logits, omega, temperature)
    kd = temperature ** 2 * sum(kl_row(q, z, temperature) for q, z in zip(soft, logits)) / len(logits)
    ce = hand_soft_ce(hand_targets(lams, smoothing), logits)
    assert out['output'].tolist() == [pytest.approx(row, abs=1e-6) for row in logits]
    assert out['loss_kd'].item() == pytest.approx(kd, abs=1e-6)  # a small KL (~5e-3), float32 on one side
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert out['loss'].item() == pytest.approx(ce + weight * kd, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The record and end to end
# ---------------------------------------------------------------------------------------------------------------------

METHODS = ['bake', 'lsrkd_tc', 'tfkd_reg', 'mrkd_tc']


@pytest.mark.parametrize('method', METHODS)
def test_methods_take_mixup_from_the_loader(method):
    spec = timm_selfkd.get_method(method)
    hparams = spec.hparams_cls()
    needs = spec.task_cls.requirements(hparams)
    assert needs.mixup == 'loader'


METHOD_ARGS = {'lsrkd_tc': ['--lsrkd-tc-gamma', '0.5']}  # the default 2.5 / K is 0.625 for 4 classes; any > 1/K
RUNS = [(method, ['--mixup', '0.2', '--cutmix', '1.0']) for method in METHODS] + [
    ('bake', ['--cutmix', '1.0', '--mixup-mode', 'pair', '--mixup-off-epoch', '1', '--epochs', '2']),
    ('mrkd_tc', ['--mixup', '0.2', '--cutmix-minmax', '0.2', '0.8', '--mixup-mode', 'elem', '--mixup-prob', '0.8',
                 '--mixup-switch-prob', '0.5', '--smoothing', '0.0']),
]


@pytest.mark.parametrize('method, mix', RUNS, ids=[f'{m}-{i}' for i, (m, _) in enumerate(RUNS)])
def test_train_py_with_mixup_and_cutmix(image_folder, tmp_path, method, mix):
    """`python train.py --selfkd METHOD --mixup 0.2 --cutmix 1.0` on a tiny image folder trains and writes
    summary.csv with finite losses and a positive KD term."""
    args = ['--data-dir', image_folder, '--output', str(tmp_path), '--experiment', 'run', '--model', 'resnet18',
            '--img-size', '32', '-b', '8', '--epochs', '1', '--warmup-epochs', '0', '--device', 'cpu',
            '--workers', '0', '--lr', '0.01', '--selfkd', method, *METHOD_ARGS.get(method, []), *mix]
    result = subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'run' / 'summary.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (2 if '--epochs' in mix else 1)
    for row in rows:
        assert math.isfinite(float(row['train_loss'])) and math.isfinite(float(row['eval_loss']))
        assert float(row['train_loss_kd']) > 0
