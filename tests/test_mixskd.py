"""MixSKD (`--selfkd mixskd`) against its official code (winycg/Self-KD-Lib), whose loss lines are re-written below
as the reference; the two reference-code defects we fix (the CIFAR script's unadded mixup CE, the never-optimised
discriminators) are checked on our side; branches on three model families; bf16; the task state round trip."""
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import Mixup

import timm_selfkd
from conftest import checked_hparams, runs_without_and_with_checkpointing, small_model, train_steps
from timm_selfkd.components.deep_branch import LevelCapture
from timm_selfkd.methods.mixskd import MixSKDHparams, grad_reverse, mixskd_loss

N = 4
Y = torch.tensor([0, 1, 2, 3])


def _task(seed=0, model='test_resnet', **hparams):
    torch.manual_seed(seed)
    net = timm.create_model(model, num_classes=4)
    return timm_selfkd.create_task('mixskd', net, **hparams).train()


def _images(seed=1, size=32):
    return torch.randn(N, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _capture(task):
    """Record the trainable module's call: its input (2n rows), lam, partner and output dict."""
    calls = []
    task.trainable_module.register_forward_hook(lambda m, args, out: calls.append((args, out)))
    return calls


# ---- the official code's lines (main_mixskd_imagenet.py / main_mixskd_cifar.py, methods/adversarial.py,
# ---- utils.DistillKL, models/resnet_imagenet_mixskd.py), re-written as the reference

def official_distill_kl(y_s, y_t, T):
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction='batchmean') * (T ** 2)


def official_final_aux_classifier(teacher, features):
    """ResNet_Final_Auxiliary_Classifer: conv1x1(cat) -> avg_pool -> fc (our weights in conv form)."""
    out = F.conv2d(torch.cat(features, dim=1), teacher.fuse.weight[:, :, None, None])
    out = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return teacher.fc(out)


def official_discriminator_loss(discriminators, features1, features2):
    gan_loss = torch.tensor(0.)
    for i in range(len(discriminators)):
        inputs = torch.cat((features1[i], features2[i]), 0)
        if len(inputs.size()) > 2:
            inputs = F.adaptive_avg_pool2d(inputs, 1).view(inputs.size(0), -1)
        batch_size = inputs.size(0)
        target = torch.FloatTensor([[1, 0] for _ in range(batch_size // 2)] + [[0, 1] for _ in range(batch_size // 2)])
        outputs = discriminators[i].classifier(inputs)
        gan_loss = gan_loss + nn.BCEWithLogitsLoss()(outputs, target)
    return gan_loss


def official_losses(logits, features, ensemle_logits, ensemble_mixup_logits, discriminators, targets, lam, index,
                    kd_T=3.):
    """The training step's loss lines; returns the ImageNet script's total, the CIFAR script's total and terms."""
    criterion_cls = nn.CrossEntropyLoss()
    bs = targets.size(0)
    targets_a, targets_b = targets, targets[index]

    def mixup_criterion(criterion, pred, y_a, y_b, lam):
        return lam * criterion(pred, y_a) + (1 - lam) * criterion(pred, y_b)

    mix_logits = [lam * logit[:bs] + (1 - lam) * logit[index] for logit in logits]
    ensemble_features = [lam * (fea[:bs]) + (1 - lam) * (fea[index]) for fea in features]
    mixup_logits = [logit[bs:] for logit in logits]
    mixup_features = [fea[bs:] for fea in features]

    loss_cls = torch.tensor(0.)
    loss_mixcls = torch.tensor(0.)
    for logit in logits:
        loss_cls = loss_cls + criterion_cls(logit[:bs], targets)
    for mixup_logit in mixup_logits:
        loss_mixcls = loss_mixcls + mixup_criterion(criterion_cls, mixup_logit, targets_a, targets_b, lam)
    loss_mixcls = loss_mixcls + mixup_criterion(criterion_cls, ensemle_logits, targets_a, targets_b, lam)
    loss_mixcls = loss_mixcls + mixup_criterion(criterion_cls, ensemble_mixup_logits, targets_a, targets_b, lam)

    loss_div = torch.tensor(0.)
    loss_div = loss_div + official_distill_kl(mix_logits[-1], ensemble_mixup_logits.detach(), kd_T)
    loss_div = loss_div + official_distill_kl(mixup_logits[-1], ensemle_logits.detach(), kd_T)
    for i in range(len(mix_logits) - 1):
        loss_div = loss_div + official_distill_kl(mix_logits[i], mixup_logits[i].detach(), kd_T)
        loss_div = loss_div + official_distill_kl(mixup_logits[i], mix_logits[i].detach(), kd_T)

    loss_fea = torch.tensor(0.)
    for fi in range(len(features)):
        loss_fea = loss_fea + F.mse_loss(ensemble_features[fi], mixup_features[fi])
    loss_gan = official_discriminator_loss(discriminators, ensemble_features, mixup_features)
    imagenet = (loss_cls + loss_mixcls) + loss_div + loss_fea + loss_gan  # ImageNet: loss_cls includes the mix CE
    cifar = loss_cls + loss_div + loss_fea + loss_gan  # CIFAR: loss_mixcls computed, never added
    return imagenet, cifar, dict(cls=loss_cls, mixcls=loss_mixcls, div=loss_div, fea=loss_fea, gan=loss_gan)


def _official_from(out, module, lam, index):
    teacher = module.aux.teacher
    n = index.shape[0]
    ensemble = [lam * f[:n] + (1 - lam) * f[index] for f in out['maps']]
    ensemble_logits = official_final_aux_classifier(teacher, ensemble)
    ensemble_mixup_logits = official_final_aux_classifier(teacher, [f[n:] for f in out['maps']])
    return ensemble_logits, ensemble_mixup_logits


@pytest.mark.parametrize('seed, pairing', [(3, [1, 2, 3, 0]), (6, [0, 3, 1, 2])])
def test_loss_matches_the_official_imagenet_lines_and_fixes_the_cifar_script(seed, pairing):
    """One step of our task (its own Beta(0.4, 0.4) mixup) against the official lines on the same logits and maps:
    mixup_data's lambda, then its random permutation (torch.randperm there, NumPy's seeded generator here: at these
    seeds a 4-cycle, whose pairs are not mutual, and a permutation mixing image 0 with itself, neither of which
    timm's pairing i <-> n-1-i can give); the self-teacher's logits (conv-then-pool there, pool-then-linear here),
    every term, the ImageNet script's total; the CIFAR script's total (mix CE never added) is ours with
    mix_ce_weight 0."""
    task = _task()
    calls = _capture(task)
    x = _images()
    np.random.seed(seed)
    out = task(x, Y)
    np.random.seed(seed)
    lam = float(np.random.beta(0.4, 0.4))  # mixup_data: lam = np.random.beta(alpha, alpha)
    index = torch.from_numpy(np.random.permutation(N))  # index = torch.randperm(batch_size)
    assert index.tolist() == pairing
    (inputs, lam_rows, partner), got = calls[0]
    assert torch.equal(partner, index) and torch.equal(lam_rows, torch.full((N,), lam, dtype=torch.float32))
    torch.testing.assert_close(inputs[:N], x, rtol=0, atol=0)
    torch.testing.assert_close(inputs[N:], lam * x + (1 - lam) * x[index, :], rtol=0, atol=0)  # mixed_x

    module = task.trainable_module
    ensemble_logits, ensemble_mixup_logits = _official_from(got, module, lam, index)
    torch.testing.assert_close(got['teacher_interp'], ensemble_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got['teacher_mixed'], ensemble_mixup_logits, rtol=1e-5, atol=1e-5)
    imagenet, cifar, terms = official_losses(got['logits'], got['maps'], ensemble_logits, ensemble_mixup_logits,
                                             module.aux.discriminators, Y, lam, index)
    torch.testing.assert_close(out['loss_ce'] + out['loss_branch_ce'], terms['cls'])
    torch.testing.assert_close(out['loss_mix_ce'], terms['mixcls'])
    torch.testing.assert_close(out['loss_kd'], terms['div'])
    torch.testing.assert_close(out['loss_feature'], terms['fea'])
    torch.testing.assert_close(out['loss_adv'], terms['gan'])
    torch.testing.assert_close(out['loss'], imagenet)
    torch.testing.assert_close(out['output'], got['logits'][-1][:N])

    # the CIFAR script's total is ours without the mix CE (its defect): recompute our loss on the same outputs
    no_mix = mixskd_loss(got, lam_rows, partner, lambda z: F.cross_entropy(z, Y),
                         lambda z: lam * F.cross_entropy(z, Y) + (1 - lam) * F.cross_entropy(z, Y[index]),
                         MixSKDHparams(mix_ce_weight=0.))
    torch.testing.assert_close(no_mix['loss'], cifar)
    assert not torch.isclose(out['loss'], cifar)


def test_self_teacher_is_trained_by_the_mix_ce_that_the_cifar_script_drops():
    """The self-teacher is detached wherever it teaches, so the mix CE is its only gradient: none with the CIFAR
    script's sum (weight 0), some with ours."""
    for weight, trained in ((1., True), (0., False)):
        task = _task(mix_ce_weight=weight)
        np.random.seed(0)
        out = task(_images(), Y)
        grad = torch.autograd.grad(out['loss'], task.trainable_module.aux.teacher.fc.weight)[0]
        assert (grad.abs().sum() > 0) == trained


def test_discriminators_are_optimised_and_the_network_fools_them():
    """The discriminators are registered modules (optimised, saved); their BCE gradient is the official one for
    them and the negated one for the network (gradient reversal)."""
    task = _task()
    module = task.trainable_module
    names = [name for name, _ in module.named_parameters()]
    assert sum(name.startswith('aux.discriminators.') for name in names) == 4 * 4  # 4 classifiers x (W, b) x 2
    assert any(key.startswith('discriminators.') for key in task.get_task_state()['aux'])
    calls = _capture(task)
    np.random.seed(0)
    out = task(_images(), Y)
    (_, lam_rows, partner), got = calls[0]
    lam = lam_rows[0].item()
    ensemble = [lam * f[:N] + (1 - lam) * f[partner] for f in got['maps']]
    official = official_discriminator_loss(module.aux.discriminators, ensemble, [f[N:] for f in got['maps']])
    disc, conv = module.aux.discriminators[0].classifier[0].weight, module.model.conv1[0].weight
    ours = torch.autograd.grad(out['loss_adv'], [disc, conv], retain_graph=True)
    reference = torch.autograd.grad(official, [disc, conv], retain_graph=True)
    torch.testing.assert_close(ours[0], reference[0])
    torch.testing.assert_close(ours[1], -reference[1])
    assert reference[1].abs().sum() > 0

    before = copy.deepcopy(module.aux.state_dict())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    optimizer.zero_grad()
    out['loss'].backward()
    optimizer.step()
    after = module.aux.state_dict()
    for part in ('discriminators', 'teacher', 'branches'):
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(part)), part


def test_grad_reverse():
    x = torch.tensor([1., -2.], requires_grad=True)
    y = grad_reverse(x)
    assert torch.equal(y, x)
    (3 * y).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-3., -3.]))


def test_branches_are_fresh_copies_of_the_later_stages():
    """ResNet: branches after layer1-3 of copies of the remaining stages and the head (the official
    block_extractor1-3, avg_pool and fc1-3), freshly initialised as the official separate layers; given the model's
    weights, a branch reproduces the backbone's final map and logits from its level's output."""
    task = _task()
    model, branches = task.get_eval_model(), task.trainable_module.aux.branches
    assert [branch.module_name for branch in branches] == ['layer1', 'layer2', 'layer3']
    stages = [{name.split('.')[1] for name, _ in branch.named_parameters()} for branch in branches]
    assert stages == [{'layer2', 'layer3', 'layer4', 'fc'}, {'layer3', 'layer4', 'fc'}, {'layer4', 'fc'}]
    for branch in branches:
        assert not torch.equal(branch.model.fc.weight, model.fc.weight)
        assert not torch.equal(branch.model.layer4[0].conv1.weight, model.layer4[0].conv1.weight)

    model.eval()
    x = _images()
    with torch.no_grad(), LevelCapture(model, ['layer1']) as capture:
        final = model.forward_features(x)
        level1, = capture.outputs
        with_model_weights = copy.deepcopy(branches[0]).eval()
        with_model_weights.model.load_state_dict(model.state_dict(), strict=False)
        logits, branch_map = with_model_weights(level1)
    torch.testing.assert_close(branch_map, final)
    torch.testing.assert_close(logits, model.forward_head(final))


def test_users_mixup_and_cutmix_replace_the_own_mix():
    """--mixup/--cutmix: timm's draw mixes the second half (image i with n-1-i; the box for CutMix), lam per row
    in 'elem' mode; the mixed images' CE is on timm's mixed targets, the originals' on smoothed one-hots."""
    for mode, kwargs in (('batch', dict(cutmix_alpha=1.0)), ('elem', dict(mixup_alpha=1.0))):
        mixup = Mixup(mode=mode, label_smoothing=0.1, num_classes=4, **kwargs)
        torch.manual_seed(0)
        task = timm_selfkd.create_task('mixskd', timm.create_model('test_resnet', num_classes=4), mixup=mixup,
                                       criterion_kwargs=dict(soft_targets=True)).train()
        calls = _capture(task)
        x = _images()
        np.random.seed(5)
        out = task(x, Y)
        np.random.seed(5)
        expected_x, expected_y = mixup(x.clone(), Y)
        (inputs, lam_rows, partner), got = calls[0]
        torch.testing.assert_close(inputs[N:], expected_x)
        lam_from_targets = (expected_y.gather(1, Y[:, None]).squeeze(1) - 0.025) / 0.9  # on 0.925, off 0.025
        torch.testing.assert_close(lam_rows, lam_from_targets)
        if mode == 'elem':
            assert len(set(lam_rows.tolist())) > 1
        logits = got['logits']
        soft_ce = lambda z, t: -(t * z.log_softmax(-1)).sum(-1).mean()  # noqa: E731
        one_hot = F.one_hot(Y, 4) * 0.9 + 0.025
        torch.testing.assert_close(out['loss_ce'], soft_ce(logits[-1][:N], one_hot))
        mix = sum(soft_ce(z[N:], expected_y) for z in logits) + soft_ce(got['teacher_interp'], expected_y) \
            + soft_ce(got['teacher_mixed'], expected_y)
        torch.testing.assert_close(out['loss_mix_ce'], mix)


@pytest.mark.parametrize('name,size', [('test_efficientnet', 32), ('test_vit', 32), ('swin', 64)])
def test_trains_on_other_families(name, size):
    """A few steps on an EfficientNet, a ViT and a Swin: finite terms, every training-only part moves, and the
    deployed state_dict is the plain model's."""
    model = small_model('swin')[0] if name == 'swin' else timm.create_model(name, num_classes=4)
    reference_keys = set(model.state_dict())
    task = timm_selfkd.create_task('mixskd', model).train()
    module = task.trainable_module
    before = copy.deepcopy(module.aux.state_dict())
    np.random.seed(0)
    out = train_steps(task, _images(size=size), Y, lr=0.01)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss'))
    assert out['output'].shape == (N, 4)
    after = module.aux.state_dict()
    for part in ('discriminators', 'teacher', 'branches'):
        assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.startswith(part)), part
    assert set(task.get_checkpoint_state()['state_dict']) == reference_keys


def test_gradient_checkpointing_gives_the_same_step():
    """timm's checkpointing (set before the task wraps the model, as train.py does) calls a stage's blocks one by
    one: the levels are still captured (on the last block), with their gradient, the branches checkpoint too, and
    the loss and gradients are those of the run without it."""
    def step(task):
        np.random.seed(0)
        out = task(_images(), Y)
        return out['loss'], torch.autograd.grad(out['loss_branch_ce'], task.get_eval_model().conv1[0].weight)[0]
    (loss, grad), (loss_checkpointed, grad_checkpointed) = runs_without_and_with_checkpointing('mixskd', step)
    torch.testing.assert_close(loss, loss_checkpointed)
    torch.testing.assert_close(grad, grad_checkpointed)
    assert grad_checkpointed.abs().sum() > 0


def test_bf16_terms_are_float32_and_finite():
    task = _task()
    np.random.seed(0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(_images(), Y)
    terms = {k: v for k, v in out.items() if k.startswith('loss')}
    assert len(terms) == 7
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())


def test_task_state_round_trip_ema_and_mismatch():
    """Branches, self-teacher and discriminators survive a save/load (same next step bit for bit); the EMA's are
    its own; a checkpoint from other levels is refused naming the flag; eval is the plain model."""
    task = _task()
    np.random.seed(0)
    train_steps(task, _images(), Y, steps=1)
    task.setup_ema(decay=0.5)
    state = copy.deepcopy(task.get_checkpoint_state())
    assert not any(key.startswith('aux') for key in state['state_dict'])
    assert state['task_state']['branch_indices'] == [1, 2, 3]

    fresh = _task(seed=7)
    fresh.load_checkpoint_state(state['state_dict'], copy.deepcopy(state['task_state']))
    for k, v in task.trainable_module.state_dict().items():
        assert torch.equal(v, fresh.trainable_module.state_dict()[k]), k
    x = _images(seed=2)
    np.random.seed(1)
    a = task(x, Y)['loss']
    np.random.seed(1)
    b = fresh(x, Y)['loss']
    assert torch.equal(a, b)

    fresh.setup_ema(decay=0.5)
    fresh.load_task_state(task.get_task_state(ema=True), ema=True)
    assert torch.equal(fresh.get_task_state(ema=True)['aux']['teacher.fc.weight'],
                       task.get_task_state(ema=True)['aux']['teacher.fc.weight'])

    other = _task(indices='2,3')
    with pytest.raises(ValueError, match=r"part 'aux' was built for \{'branch_indices': \[1, 2, 3\]\}, this run's "
                                         r"for \{'branch_indices': \[2, 3\]\} \(set --mixskd-indices to match\)"):
        other.load_checkpoint_state(state['state_dict'], state['task_state'])

    task.eval()
    x = _images(seed=3)
    torch.testing.assert_close(task.eval_forward()(x), task.get_eval_model()(x))
    assert task(x, Y)['output'].shape == (N, 4)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match='mixskd alpha must be > 0, got 0.0'):
        checked_hparams('mixskd', alpha=0.)
    with pytest.raises(ValueError, match='mixskd indices must be comma-separated integers'):
        checked_hparams('mixskd', indices='a')
    with pytest.raises(ValueError, match=r'branch index 4 does not exist for test_resnet: valid indices are 0-3'):
        _task(indices='4')

    with pytest.raises(ValueError, match='has no forward_intermediates'):
        timm_selfkd.create_task('mixskd', nn.Sequential(nn.Linear(2, 4)))
