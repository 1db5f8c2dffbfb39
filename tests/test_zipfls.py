"""Zipf's label smoothing: the official code's loss lines (megvii-research/zipfls, pytorch_zipfls/losses.py and the
models' dense forward, re-written below in numpy/torch) against ours on fixed tensors and a fixed small model; the
soft label by hand; the head at every position on ConvNeXt, ViT, Swin and EfficientNet; mixup; the three families;
bf16; the checkpoint and task state; the recipes' lr at every epoch against the official schedule."""
import math
import os

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup

import timm_selfkd
from conftest import checked_hparams, epoch_lrs
from timm_selfkd.components.losses import mixed_label_weights
from timm_selfkd.components.zipf_targets import (min_rank, position_logits, vote_counts, zipf_distribution,
                                                 zipf_nontarget_kl)
from timm_selfkd.methods.zipfls import DenseVotes, ZipfLSHparams, _eval_mode

try:
    from scipy.stats import rankdata
except ImportError:  # scipy is not a dependency: numpy's equivalent of rankdata(method='min') along axis 1
    def rankdata(a, axis=1, method='min'):
        assert axis == 1 and method == 'min'
        a = np.asarray(a)
        return np.stack([np.searchsorted(np.sort(row), row, side='left') + 1 for row in a])


# ---- the official code, re-written (pytorch_zipfls/losses.py: gen_pdf, get_masked_distribution, kl_loss) ----

def official_gen_pdf(logits, feats, labels, dense, power=1.0):
    """gen_pdf(distribution='rank_zipf', rank='hard', friend=False, with_target=False); `feats` is the dense
    argmax (n, count) when dense."""
    logits, feats, labels = logits.detach().cpu(), feats.detach().cpu(), labels.detach().cpu()
    n, c = logits.shape
    mask = torch.ones_like(logits).scatter_(1, labels.unsqueeze(1), 0.)
    if dense:
        dense_argmax = feats
        n2, count2 = dense_argmax.shape
        assert n == n2
        scores = torch.zeros([n, max(c, count2)])
        values = torch.ones_like(scores)
        logits = scores.scatter_add(1, dense_argmax, values)[:, :c]
    rank = rankdata(-logits.numpy(), axis=1, method='min')
    dist = 1 / rank
    dist = dist ** power
    dist = dist[mask.bool().numpy()].reshape((n, c - 1))
    dist = dist / dist.sum(axis=1, keepdims=True)
    return torch.Tensor(dist)


def official_kl_loss(output, label, pdf):
    """kl_loss(do_mask=False)."""
    mask = torch.ones_like(output).scatter_(1, label.unsqueeze(1), 0.)
    res = output[mask.bool()].view((output.shape[0], output.shape[1] - 1))
    res = F.log_softmax(res, dim=1)
    return F.kl_div(res, pdf, reduction='none').sum(axis=1).mean()


def official_zipf_loss(logits, feats, labels, dense=True, power=1.0):
    return official_kl_loss(logits, labels, official_gen_pdf(logits, feats, labels, dense, power=power))


def official_dense_argmax(featmap, linear, upsample=None):
    """get_dense_info (cifar_models/resnet.py, train.py forward_with_feat_dense): the fc at every position."""
    tmp = F.interpolate(featmap, scale_factor=2., mode=upsample, align_corners=False) if upsample else featmap
    n, c, h, w = tmp.size()
    return linear(tmp.permute(0, 2, 3, 1).reshape(n * h * w, c)).reshape(n, h * w, -1).argmax(axis=2)


def official_adjust_learning_rate(dataset, epoch, base_lr, max_epoch):
    """pytorch_zipfls/utils.py adjust_learning_rate, its CIFAR and ImageNet branches, returning the lr it sets."""
    lr = base_lr
    if dataset.lower() in ['cifar10', 'cifar100', 'tinyimagenet']:
        if epoch >= 0.5 * max_epoch:
            lr /= 10
        if epoch >= 0.75 * max_epoch:
            lr /= 10
    elif dataset.lower() in ['imagenet', 'inat19', 'inat21']:
        lr = 0.1 * (0.1 ** (epoch // 30))
    return lr


def official_epoch_lrs(dataset, base_lr, stop_epoch):
    """pytorch_zipfls/train.py: the optimizer starts at `base_lr`; `for epoch in range(start_epoch, stop_epoch)`
    trains (and validates) the epoch, then calls adjust_learning_rate(dataset_name, optimizer, epoch, base_lr,
    stop_epoch), which sets the lr of the next epoch."""
    lr, lrs = base_lr, []
    for epoch in range(0, stop_epoch):
        lrs.append(lr)  # train(...)
        lr = official_adjust_learning_rate(dataset, epoch, base_lr, stop_epoch)
    return lrs


# ---- ours ----

def ours(logits, votes, labels, power=1.0):
    return zipf_nontarget_kl(logits, zipf_distribution(votes, labels, power), labels).mean()


def _votes(dense_argmax, classes):
    return vote_counts(F.one_hot(dense_argmax, classes).float())  # argmax of a one-hot is its class


@pytest.mark.parametrize('power', [1.0, 0.5, 2.0])
def test_dense_loss_matches_the_official_code_on_fixed_tensors(power):
    g = torch.Generator().manual_seed(0)
    n, c, positions = 16, 10, 49
    logits = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(c, (n,), generator=g)
    # few classes get votes: ties among the unvoted classes (all rank alike), some rows' target voted first
    dense_argmax = torch.randint(4, (n, positions), generator=g)
    dense_argmax[:4] = labels[:4, None]
    expected = official_zipf_loss(logits, dense_argmax, labels, power=power)
    torch.testing.assert_close(ours(logits, _votes(dense_argmax, c), labels, power), expected, rtol=1e-6, atol=1e-6)
    # the soft label itself: ours has K columns, 0 on the target; the official one has the K - 1 others
    zipf = zipf_distribution(_votes(dense_argmax, c), labels, power)
    others = torch.ones(n, c).scatter_(1, labels[:, None], 0.).bool()
    torch.testing.assert_close(zipf[others].view(n, c - 1), official_gen_pdf(logits, dense_argmax, labels, True,
                                                                               power), rtol=1e-6, atol=1e-7)
    assert (zipf.gather(1, labels[:, None]) == 0).all()


def test_logit_ranking_matches_the_official_code():
    """`dense=False`: the classes ranked by the logits themselves (ties included)."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 7, generator=g).round()  # integer logits: many ties
    labels = torch.randint(7, (12,), generator=g)
    expected = official_zipf_loss(logits, torch.zeros(12, 3), labels, dense=False)
    torch.testing.assert_close(ours(logits, logits, labels), expected, rtol=1e-6, atol=1e-6)


def test_min_rank_is_rankdata_min():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(5, (20, 9), generator=g).float()
    assert np.array_equal(min_rank(scores).numpy(), rankdata(-scores.numpy(), axis=1, method='min'))


def test_soft_label_and_kl_by_hand():
    # votes (3, 1, 1, 0), target 1: ranks (1, 2, 2, 4); the others 1, 1/2, 1/4 -> (4/7, 0, 2/7, 1/7).
    # Zero logits: the non-target softmax is uniform over 3 classes, KL = sum q log(3 q).
    votes = torch.tensor([[3., 1., 1., 0.]])
    target = torch.tensor([1])
    q = zipf_distribution(votes, target)
    torch.testing.assert_close(q, torch.tensor([[4 / 7, 0., 2 / 7, 1 / 7]]))
    kl = sum(p * math.log(3 * p) for p in (4 / 7, 2 / 7, 1 / 7))
    assert zipf_nontarget_kl(torch.zeros(1, 4), q, target).item() == pytest.approx(kl, abs=1e-6)
    # power 2 on the same ranks: 1, 1/4, 1/16 -> (16/21, 0, 4/21, 1/21)
    torch.testing.assert_close(zipf_distribution(votes, target, 2.), torch.tensor([[16 / 21, 0., 4 / 21, 1 / 21]]))
    # the target's logit takes no part: changing it changes neither the term nor its gradient elsewhere
    z = torch.tensor([[0.3, -2., 1.1, 0.4]], requires_grad=True)
    a = zipf_nontarget_kl(z, q, target)
    a.backward()
    assert z.grad[0, 1] == 0 and torch.isfinite(z.grad).all()
    assert zipf_nontarget_kl(torch.tensor([[0.3, 50., 1.1, 0.4]]), q, target).item() == pytest.approx(a.item())


@pytest.mark.parametrize('upsample', ['none', 'bilinear'])
def test_task_matches_the_official_dense_forward_on_a_fixed_model(upsample):
    """The whole term on a fixed ResNet: the official get_dense_info (the fc at every position, upsampled x2 in
    its CIFAR recipes) and zipf_loss against the task's `loss_zipf`, `loss_ce` and `loss`."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10)
    task = timm_selfkd.create_task('zipfls', model, upsample=upsample, weight=0.1)
    task.train()
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 5])  # a 2x2 final map
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
        dense_argmax = official_dense_argmax(features, model.fc, None if upsample == 'none' else upsample)
        expected = official_zipf_loss(logits, dense_argmax, y)
    assert dense_argmax.shape[1] == (4 if upsample == 'none' else 16)
    out = task(x, y)
    torch.testing.assert_close(out['loss_zipf'].detach(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['output'].detach(), logits, rtol=1e-5, atol=1e-5)
    ce = F.cross_entropy(logits, y)
    torch.testing.assert_close(out['loss'].detach(), ce + 0.1 * expected, rtol=1e-5, atol=1e-5)


def _manual_position_logits(name, model, features):
    """Each family's head written out per position."""
    if name == 'convnext':  # head: pool, LayerNorm2d, flatten, pre-logits (identity), fc
        tokens = features.permute(0, 2, 3, 1)
        normed = F.layer_norm(tokens, tokens.shape[-1:], model.head.norm.weight, model.head.norm.bias,
                              model.head.norm.eps)
        return model.head.fc(normed).flatten(1, 2)
    if name == 'vit':  # mean pooling: fc_norm then the head, on the patch tokens
        return model.head(model.fc_norm(features[:, model.num_prefix_tokens:]))
    if name == 'swin':  # NHWC
        return model.head.fc(features).flatten(1, 2)
    return model.get_classifier()(features.permute(0, 2, 3, 1)).flatten(1, 2)  # NCHW


FAMILIES = {
    'resnet': ('test_resnet', {}, 32),
    'efficientnet': ('test_efficientnet', {}, 32),
    'convnext': ('convnext_atto', {}, 32),
    'vit': ('test_vit', {'global_pool': 'avg', 'fc_norm': True}, 32),
    'swin': ('swin_tiny_patch4_window7_224', {'img_size': 64, 'embed_dim': 24, 'depths': (1, 1, 1, 1),
                                              'num_heads': (1, 1, 1, 1), 'window_size': 4}, 64),
}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_head_at_every_position(name):
    model_name, kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, **kwargs).eval()
    with torch.no_grad():
        features = model.forward_features(torch.randn(2, 3, size, size))
        got = position_logits(model, features)
        torch.testing.assert_close(got, _manual_position_logits(name, model, features), rtol=1e-5, atol=1e-5)
    if name == 'vit':
        assert got.shape[1] == features.shape[1] - model.num_prefix_tokens
    with pytest.raises(ValueError, match='upsample') if name == 'vit' else torch.no_grad():
        position_logits(model, features, 'bilinear')


def test_votes_run_in_eval_mode_and_every_module_keeps_its_mode():
    """Dropout does not reach the votes, a head BatchNorm's running statistics do not move, and each module's own
    mode (a frozen BatchNorm here) is given back."""
    torch.manual_seed(0)
    model = timm.create_model('mobilenetv3_small_050', num_classes=5, head_norm=True, drop_rate=0.5)
    wrapper = DenseVotes(model)
    wrapper.train()
    model.bn1.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
    head_bn = model.norm_head
    stats = head_bn.running_mean.clone()
    _, votes_a = wrapper(x)
    _, votes_b = wrapper(x)
    assert torch.equal(votes_a, votes_b)  # no dropout
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    with torch.no_grad():
        expected = vote_counts(position_logits(model, features))
    torch.testing.assert_close(votes_a, expected)
    assert votes_a.sum(1).eq(features.shape[2] * features.shape[3]).all()
    # the pooled forward (training mode) moved the head BN's statistics; the dense pass alone does not
    model.train()
    with torch.no_grad():
        moved = head_bn.running_mean.clone()
        before = model.norm_head.running_mean.clone()
        with _eval_mode(model):
            position_logits(model, features)
        assert torch.equal(model.norm_head.running_mean, before)
    assert not torch.equal(moved, stats)


def _row_loss(task, logits, votes, label):
    return zipf_nontarget_kl(logits, zipf_distribution(votes, label, task.hparams.power), label)


def test_mixup_is_the_lambda_weighted_loss_of_both_labels():
    torch.manual_seed(0)
    task = timm_selfkd.create_task('zipfls', timm.create_model('test_resnet', num_classes=6))
    task.train()
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=6)
    np.random.seed(0)
    xm, target = mixup(x.clone(), y.clone())
    out = task(xm, target)
    with torch.no_grad():
        logits, votes = task.trainable_module(xm)
    weights = mixed_label_weights(target)
    lam = weights.max().item()
    assert 0.5 <= lam < 1
    label_b = y.flip(0)  # timm's batch mode pairs image i with image B-1-i
    expected = torch.stack([weights[i, y[i]] * _row_loss(task, logits[i:i + 1], votes[i:i + 1], y[i:i + 1])
                            + (weights[i, label_b[i]] * _row_loss(task, logits[i:i + 1], votes[i:i + 1],
                                                                  label_b[i:i + 1]) if label_b[i] != y[i] else 0.)
                            for i in range(8)]).mean()
    torch.testing.assert_close(out['loss_zipf'].detach(), expected, rtol=1e-5, atol=1e-6)
    # an unmixed soft target (smoothed one-hot) gives the hard-label term
    smooth = F.one_hot(y, 6).float() * 0.9 + 0.1 / 6
    hard = task.zipf_loss(logits, votes, y)
    torch.testing.assert_close(task.zipf_loss(logits, votes, smooth), hard, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', ['resnet', 'efficientnet', 'vit', 'swin'])
def test_a_few_steps_on_each_family(name):
    model_name, kwargs, size = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=4, **kwargs)
    task = timm_selfkd.create_task('zipfls', model, weight=1.0)
    task.train()
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.05)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        out = task(x, y)
        assert out['output'].shape == (4, 4)
        assert all(torch.isfinite(out[k]) for k in ('loss', 'loss_ce', 'loss_zipf'))
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    assert task.get_eval_model() is model
    assert set(task.get_eval_model().state_dict()) == set(model.state_dict())


def test_bf16_terms_are_float32_and_finite():
    torch.manual_seed(0)
    task = timm_selfkd.create_task('zipfls', timm.create_model('test_resnet', num_classes=4))
    task.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    for key in ('loss', 'loss_ce', 'loss_zipf'):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key


def test_checkpoint_is_the_plain_model_and_there_is_no_task_state():
    """The wrapper adds no parameters or buffers: the checkpoint is the timm model, and a resumed run has
    nothing else to restore."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('zipfls', model)
    assert [n[len('model.'):] for n, _ in task.trainable_module.named_parameters()] == \
        [n for n, _ in model.named_parameters()]
    assert not task.get_task_state()
    task.load_checkpoint_state(model.state_dict(), task.get_task_state())


def test_logit_ranking_and_bad_hyper_parameters():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('zipfls', model, dense=False)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    out = task(x, y)
    with torch.no_grad():
        logits = model(x)
    expected = official_zipf_loss(logits, torch.zeros(4, 1), y, dense=False)
    torch.testing.assert_close(out['loss_zipf'].detach(), expected, rtol=1e-5, atol=1e-6)
    for bad, message in ((dict(weight=-1.), 'zipfls weight must be >= 0, got -1.0'),
                         (dict(power=-0.5), 'zipfls power must be >= 0, got -0.5'),
                         (dict(upsample='nearest'), 'zipfls upsample must be one of none, bilinear, bicubic')):
        with pytest.raises(ValueError, match=message):
            checked_hparams('zipfls', **bad)
    needs = timm_selfkd.get_method('zipfls').task_cls.requirements(ZipfLSHparams())
    assert needs.mixup == 'loader' and not needs.bce_refusal and needs.streamed_data


@pytest.mark.parametrize('recipe,dataset,epochs,processes', [('zipfls_cifar100.yaml', 'CIFAR100', 200, 1),
                                                             ('zipfls_imagenet_resnet50.yaml', 'ImageNet', 100, 4)])
def test_recipe_trains_every_epoch_at_the_official_lr(recipe, dataset, epochs, processes):
    """The official lr is set after each epoch for the next one, so it decays from 0-based epochs 101/151
    (CIFAR) and 31/61/91 (ImageNet): the recipes' milestones, on timm's convention, give the same lr every epoch
    (ImageNet at the official global batch 256: -b 64 on 4 processes)."""
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', recipe)
    ours = epoch_lrs(['-c', recipe], processes)
    official = official_epoch_lrs(dataset, 0.1, epochs)
    assert len(ours) == epochs and ours == pytest.approx(official, rel=1e-9)
    first_lower = [epoch for epoch in range(1, epochs) if official[epoch] < official[epoch - 1]]
    assert first_lower == ([101, 151] if dataset == 'CIFAR100' else [31, 61, 91])
