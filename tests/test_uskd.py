"""USKD (`uskd`): its loss against the official code's (yzd-v/cls_KD, mmcls/models/dis_losses/uskd.py, re-written
below as the reference) on fixed tensors, hard labels and timm's mixed targets; the one deliberate difference
(a mix of one class); the weak head's level and input on four model families; bf16; the task state."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy

import timm_selfkd
from conftest import checked_hparams, small_model, train_steps
from timm_selfkd.methods.uskd import USKDHparams, uskd_level, uskd_loss


def official_uskd(fea_mid, logit_s, gt_label, fc, alpha, beta, mu, num_classes):
    """`USKDLoss.forward` of the official code, line for line (its `.cuda()` left out); `fc` is its `self.fc`."""
    zipf = 1 / torch.arange(1, num_classes + 1)
    log_softmax = nn.LogSoftmax(dim=1)
    if len(gt_label.size()) > 1:
        value, label = torch.sort(gt_label, descending=True, dim=-1)
        value = value[:, :2]
        label = label[:, :2]
    else:
        label = gt_label.view(len(gt_label), 1)
        value = torch.ones_like(label)
    N, c = logit_s.shape
    s_i = F.softmax(logit_s, dim=1)
    s_t = torch.gather(s_i, 1, label)
    p_t = s_t ** 2
    p_t = p_t + value - p_t.mean(0, True)
    p_t[value == 0] = 0
    p_t = p_t.detach()
    s_i = log_softmax(logit_s)
    s_t = torch.gather(s_i, 1, label)
    loss_t = - (p_t * s_t).sum(dim=1).mean()
    if len(gt_label.size()) > 1:
        target = gt_label * 0.9 + 0.1 * torch.ones_like(logit_s) / c
    else:
        target = torch.zeros_like(logit_s).scatter_(1, label, 0.9) + 0.1 * torch.ones_like(logit_s) / c
    w_fc = fc(fea_mid)
    w_i = log_softmax(w_fc)
    loss_weak = - (mu * target * w_i).sum(dim=1).mean()
    w_i = F.softmax(w_fc, dim=1)
    w_t = torch.gather(w_i, 1, label)
    rank = w_i / (1 - w_t.sum(1, True) + 1e-6) + s_i / (1 - s_t.sum(1, True) + 1e-6)
    _, rank = torch.sort(rank, descending=True, dim=-1)
    z_i = zipf.repeat(N, 1)
    ids_sort = torch.argsort(rank)
    z_i = torch.gather(z_i, dim=1, index=ids_sort)
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(N, -1)
    ns_i = log_softmax(logit_s)
    nz_i = z_i[mask].reshape(N, -1)
    nz_i = nz_i / nz_i.sum(dim=1, keepdim=True)
    nz_i = nz_i.detach()
    loss_non = - (nz_i * ns_i).sum(dim=1).mean()
    return alpha * loss_t + beta * loss_non + loss_weak


N, K, D = 8, 10, 6
WEIGHTS = [(1.0, 0.1, 0.005), (0.1, 0.1, 0.1), (0.7, 0.3, 0.2)]  # ImageNet configs, CIFAR-100 config, other


def _fixed(seed=0):
    """Logits, weak-head features and the weak head (a Linear, shared by both sides), each with gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(N, K, generator=g)).requires_grad_()
    features = torch.randn(N, D, generator=g).requires_grad_()
    fc = nn.Linear(D, K)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(K, D, generator=g))
        fc.bias.copy_(torch.randn(K, generator=g))
    return logits, features, fc


def _ours(logits, features, fc, target, alpha, beta, mu, smoothing=None):
    terms = uskd_loss(logits, fc(features), target, weak_smoothing=0.1, smoothing=smoothing)
    return alpha * terms['loss_target'] + beta * terms['loss_nontarget'] + mu * terms['loss_weak']


def _agree(target_ours, target_official, weights, seed=0, smoothing=None):
    """Loss and gradients (logits, features, head) of both sides on the same fixed tensors."""
    results = []
    for side in ('ours', 'official'):
        logits, features, fc = _fixed(seed)
        if side == 'ours':
            loss = _ours(logits, features, fc, target_ours, *weights, smoothing=smoothing)
        else:
            loss = official_uskd(features, logits, target_official, fc, *weights, num_classes=K)
        grads = torch.autograd.grad(loss, [logits, features, fc.weight, fc.bias])
        results.append((loss, grads))
    (ours, ours_grads), (official, official_grads) = results
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, official_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('weights', WEIGHTS)
def test_hard_labels_match_the_official_loss(weights):
    y = torch.tensor([0, 3, 3, 9, 1, 5, 7, 2])
    for seed in range(3):
        _agree(y, y, weights, seed)


@pytest.mark.parametrize('smoothing', [0.0, 0.1])
def test_timm_mixed_targets_match_the_official_top2(smoothing):
    """timm's mixed (and label-smoothed) targets reach the task; the official code gets mmcls's unsmoothed mixed
    label (its smoothing is the CE's): same top-2 labels and lam, same loss and gradients. Batch mode (one lam,
    image i with image N-1-i) and per-row lams (elem mode)."""
    y = torch.tensor([0, 3, 4, 9, 1, 5, 7, 2])  # every row's partner y.flip(0) is another class
    lam = 0.7
    _agree(mixup_target(y, K, lam, smoothing), mixup_target(y, K, lam, 0.), WEIGHTS[0], smoothing=smoothing)
    lams = torch.tensor([0.9, 0.2, 0.65, 0.45, 0.55, 0.35, 0.8, 0.1])[:, None]
    one_hot, partner = F.one_hot(y, K).float(), F.one_hot(y.flip(0), K).float()
    raw = lams * one_hot + (1 - lams) * partner
    timm_style = lams * (one_hot * (1 - smoothing) + smoothing / K) + (1 - lams) * (partner * (1 - smoothing)
                                                                                     + smoothing / K)
    for weights in WEIGHTS:
        _agree(timm_style, raw, weights, smoothing=smoothing)


def test_a_mix_of_one_class_has_one_label():
    """Deliberate difference: a row whose two images share a class (or lam = 1) has one label. The official code's
    top-2 then takes an arbitrary zero-weight class as the second label, with p_t zeroed but the class dropped from
    the non-target labels and counted in the rank's sums and in the batch mean of S_t^2. Ours: such a row is a
    hard-label row (a batch of them gives exactly the official hard-label loss), and in a batch with two-class rows
    the second column's batch mean counts 0 for it."""
    y = torch.tensor([0, 3, 4, 9, 9, 4, 3, 0])  # y == y.flip(0): every mix is of one class
    _agree(mixup_target(y, K, 0.6, 0.1), y, WEIGHTS[2], smoothing=0.1)

    # mixed batch: rows 0-1 (and 6-7) two classes, rows 2-5 one class
    y = torch.tensor([0, 3, 4, 9, 9, 4, 8, 1])
    lam = 0.7
    target = mixup_target(y, K, lam, 0.1)
    logits, features, fc = _fixed(1)
    terms = uskd_loss(logits, fc(features), target, weak_smoothing=0.1)
    one = torch.tensor([False, False, True, True, True, True, False, False])
    # non-target and weak terms are per row: a one-class row as the official hard-label row, the others as the
    # official two-label row
    expected_non, expected_weak = [], []
    for i in range(N):
        row_target = y[i:i + 1] if one[i] else mixup_target(y, K, lam, 0.)[i:i + 1]
        expected_non.append(official_uskd(features[i:i + 1], logits[i:i + 1], row_target, fc, 0., 1., 0., K))
        expected_weak.append(official_uskd(features[i:i + 1], logits[i:i + 1], row_target, fc, 0., 0., 1., K))
    torch.testing.assert_close(terms['loss_nontarget'], torch.stack(expected_non).mean())
    torch.testing.assert_close(terms['loss_weak'], torch.stack(expected_weak).mean())
    # target term, by hand: column 1 (the second label) exists in rows 0, 1, 6, 7 only
    with torch.no_grad():
        p = logits.softmax(-1)
        first, second = y.clone(), y.flip(0)
        values = torch.tensor([lam, lam, 1., 1., 1., 1., lam, lam])
        s1 = p.gather(1, first[:, None]).squeeze(1)
        s2 = p.gather(1, second[:, None]).squeeze(1) * (~one)
        v1 = s1 ** 2 + values - (s1 ** 2).mean()
        v2 = (s2 ** 2 + (1 - values) - (s2 ** 2).mean()) * (~one)
    log_p = logits.log_softmax(-1)
    expected = -(v1 * log_p.gather(1, first[:, None]).squeeze(1)
                 + v2 * log_p.gather(1, second[:, None]).squeeze(1)).mean()
    torch.testing.assert_close(terms['loss_target'], expected)


def test_zipf_labels_by_hand():
    """A uniform weak head leaves the rank to the final logits: the non-target classes get 1/rank (the target's own
    rank skipped), normalized; the loss is the CE to the softmax over the non-target logits."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    weak = torch.zeros(1, 5)
    terms = uskd_loss(logits, weak, torch.tensor([3]))
    # rank by logit: class 1 (1st), 3 (2nd, the target), 4 (3rd), 0 (4th), 2 (5th)
    z = torch.tensor([1 / 4, 1 / 1, 1 / 5, 0., 1 / 3])
    z = z / z.sum()
    others = torch.tensor([0, 1, 2, 4])
    log_q = logits[0, others].log_softmax(-1)
    torch.testing.assert_close(terms['loss_nontarget'], -(z[others] * log_q).sum())
    # one row: V_t = S_t^2 + 1 - S_t^2 = 1, so the target term is the target's CE; uniform weak head: log K
    torch.testing.assert_close(terms['loss_target'], F.cross_entropy(logits, torch.tensor([3])))
    torch.testing.assert_close(terms['loss_weak'], torch.log(torch.tensor(5.)))


def test_levels_of_the_families():
    assert uskd_level(small_model('resnet')[0]) == 3  # layer3, the official fea_s[-2]
    assert uskd_level(small_model('efficientnet')[0]) == 3  # blocks.4, stride 16
    assert uskd_level(small_model('swin')[0]) == 2  # third stage
    assert uskd_level(small_model('vit', depth=12)[0]) == 5  # DeiT: block depth/2 - 1, the official mid token
    assert uskd_level(small_model('resnet')[0], 1) == 1
    with pytest.raises(ValueError, match='level 4 does not exist for resnet18: valid levels are 0-3'):
        uskd_level(small_model('resnet')[0], 4)
    with pytest.raises(ValueError, match='forward_intermediates'):
        timm_selfkd.create_task('uskd', nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match='uskd mu must be >= 0, got -1.0'):
        checked_hparams('uskd', mu=-1.)
    with pytest.raises(ValueError, match='uskd level must be >= -1, got -2'):
        checked_hparams('uskd', level=-2)


@pytest.mark.parametrize('family', ['resnet', 'efficientnet', 'swin', 'vit'])
def test_families_train_with_a_training_only_weak_head(family):
    """One pass gives the plain model's logits and the weak head's (on the pooled level output; a ViT's class
    token); training moves the head; the deployed state_dict is the plain model's."""
    model, size = small_model(family)
    reference = copy.deepcopy(model)
    task = timm_selfkd.create_task('uskd', model, weak_norm=family == 'swin').train()
    module = task.trainable_module
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    logits, weak = module(x)
    torch.testing.assert_close(logits, reference(x))
    if family == 'vit':
        _, ((_, prefix),) = reference.forward_intermediates(x, indices=[module.level], return_prefix_tokens=True)
        torch.testing.assert_close(weak, module.head.fc(prefix[:, 0]))
    else:
        _, (feature,) = reference.forward_intermediates(x, indices=[module.level])
        pooled = F.layer_norm(feature.permute(0, 2, 3, 1), feature.shape[1:2]).mean((1, 2)) if family == 'swin' \
            else feature.mean((2, 3))
        torch.testing.assert_close(weak, module.head.fc(pooled), rtol=1e-5, atol=1e-5)
    head_before = copy.deepcopy(module.head.state_dict())
    out = train_steps(task, x, y)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss'))
    assert set(out) == {'loss', 'output', 'loss_ce', 'loss_target', 'loss_nontarget', 'loss_weak'}
    assert not torch.equal(head_before['fc.weight'], module.head.state_dict()['fc.weight'])
    assert set(task.get_checkpoint_state()['state_dict']) == set(reference.state_dict())


def test_bf16_autocast_terms_are_float32_and_mixup_goes_through_the_criterion():
    model, size = small_model('resnet')
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    task = timm_selfkd.create_task('uskd', model, mixup=mixup).train()
    assert task.needs.mixup == 'loader' and not task.needs.bce_refusal
    x, y = mixup(torch.randn(8, 3, size, size), torch.tensor([0, 1, 2, 3, 0, 2, 1, 3]))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(x, y)
    assert all(out[k].dtype == torch.float32 and torch.isfinite(out[k]) for k in out if k.startswith('loss'))
    torch.testing.assert_close(out['loss_ce'], SoftTargetCrossEntropy()(out['output'].float(), y))
    h = task.hparams
    torch.testing.assert_close(out['loss'], out['loss_ce'] + h.alpha * out['loss_target']
                               + h.beta * out['loss_nontarget'] + h.mu * out['loss_weak'])


def test_task_state_round_trip_and_ema(tmp_path):
    model, size = small_model('resnet')
    task = timm_selfkd.create_task('uskd', model)
    task.setup_ema(decay=0.5)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    train_steps(task.train(), x, y)
    task.update_ema(step=10)
    state = task.get_checkpoint_state()
    assert not any('head.fc' in key and not key.startswith('fc') for key in state['state_dict'])
    torch.save({'state_dict': state['state_dict']}, tmp_path / 'model.pth')
    plain = timm.create_model('resnet18', num_classes=4, checkpoint_path=str(tmp_path / 'model.pth'))
    torch.testing.assert_close(plain.fc.weight, model.fc.weight)
    live, ema = task.get_task_state(), task.get_task_state(ema=True)
    assert live['weak_level'] == 3 and not torch.equal(live['weak_head']['fc.weight'], ema['weak_head']['fc.weight'])

    fresh = timm_selfkd.create_task('uskd', small_model('resnet', seed=1)[0])
    fresh.setup_ema(decay=0.5)
    fresh.load_checkpoint_state(state['state_dict'], copy.deepcopy(live))
    fresh.load_task_state(copy.deepcopy(ema), ema=True)
    for a, b in ((fresh.get_task_state(), live), (fresh.get_task_state(ema=True), ema)):
        assert all(torch.equal(a['weak_head'][k], b['weak_head'][k]) for k in b['weak_head'])
    task.eval(), fresh.eval()
    for a, b in zip(fresh.trainable_module(x), task.trainable_module(x)):
        torch.testing.assert_close(a, b)

    other = timm_selfkd.create_task('uskd', small_model('resnet')[0], level=2)
    with pytest.raises(ValueError, match=r"part 'weak_head' was built for \{'weak_level': 3\}, this run's for "
                                         r"\{'weak_level': 2\} \(set --uskd-level to match\)"):
        other.load_task_state(live)
