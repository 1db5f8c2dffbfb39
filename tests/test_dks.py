"""DKS (`dks`, Sun et al., CVPR 2019): the synergy loss and the whole objective against the official code's loss
lines (sundw2014/DKS, wrn_DKS/, re-written below), hand-computed terms, the deep branches (fresh copies of the
remaining stages) on a ResNet, an EfficientNet, a ViT and a Swin, refusals, bf16, and the branches as task state."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_selfkd
from conftest import (checked_hparams, hand_ce, hand_kd, restored_task, runs_without_and_with_checkpointing, small_model,
                      train_steps)
from timm_selfkd.components.deep_branch import deep_branches
from timm_selfkd.components.losses import kd_kl_from_logits
from timm_selfkd.methods.dks import DKSHparams, dks_loss, synergy_loss
from timm_selfkd.methods.multi_exit import Exit, MultiExitModule, exit_indices

# Three classifiers (two branches, shallow first, then the model's own), three images, four classes.
BRANCH_LOGITS = [[[1.0, 0.5, -0.5, 2.0], [0.0, 1.5, 0.3, -1.0], [2.5, -0.5, 0.0, 0.4]],
                 [[0.2, 0.1, 1.8, -0.3], [1.0, 1.0, 0.0, 0.0], [-1.0, 0.5, 2.0, 0.7]]]
LOGITS = [[3.0, -1.0, 0.0, 0.5], [0.4, 2.2, -0.6, 0.1], [0.0, 0.0, 1.0, 1.5]]
TARGET = [3, 1, 2]


# ---- the official code's loss lines, re-written (wrn_DKS/KL_divergence.py and main.py's `h`), CPU instead of cuda

def official_kl_divergence(logits_p, logits_q):
    """KL_divergence(logits_p, logits_q) = KL(p || q), probabilities smoothed by epsilon = 1e-8."""
    p = F.softmax(logits_p, dim=1)
    q = F.softmax(logits_q, dim=1)
    num_classes = p.shape[1]
    epsilon = 1e-8
    _p = (p + epsilon * torch.ones(*p.shape)) / (1.0 + num_classes * epsilon)
    _q = (q + epsilon * torch.ones(*q.shape)) / (1.0 + num_classes * epsilon)
    return torch.mean(torch.sum(_p * torch.log(_p / _q), 1))


def official_loss(outputs, targets):
    """main.py's `h`: every classifier's CE plus KL(o2.detach() || o) for every ordered pair o != o2, summed."""
    _loss = []
    for o in outputs:
        _loss.append(F.cross_entropy(o, targets))
        for o2 in outputs:
            if o is not o2:
                _loss.append(official_kl_divergence(o2.detach(), o))
    return sum(_loss)


def _tensors():
    branches = [torch.tensor(v, requires_grad=True) for v in BRANCH_LOGITS]
    return torch.tensor(LOGITS, requires_grad=True), branches, torch.tensor(TARGET)


def test_loss_and_gradients_match_the_official_code():
    """Defaults (beta = lambda = T = 1): the whole objective equals the official `h` (outputs (ep1, ep2, o)), and so
    do its gradients into every classifier. The only difference is the code's 1e-8 smoothing of the probabilities
    (ours is computed from log-softmax): invisible at float32 precision on these logits."""
    logits, branches, target = _tensors()
    ours = dks_loss(logits, branches, target, F.cross_entropy, DKSHparams())
    ours_grads = torch.autograd.grad(ours['loss'], [*branches, logits])
    logits_ref, branches_ref, _ = _tensors()
    reference = official_loss([*branches_ref, logits_ref], target)
    reference_grads = torch.autograd.grad(reference, [*branches_ref, logits_ref])
    torch.testing.assert_close(ours['loss'], reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the synergy term alone is the official KL sum
    classifiers = [*branches_ref, logits_ref]
    kl_sum = sum(official_kl_divergence(o2.detach(), o) for o in classifiers for o2 in classifiers if o is not o2)
    torch.testing.assert_close(ours['loss_synergy'], kl_sum, rtol=1e-6, atol=1e-6)


def test_below_the_official_epsilon_the_official_kl_saturates_and_ours_does_not():
    """The official KL smooths both softmaxes, (p + 1e-8) / (1 + K 1e-8); ours is the exact KL from log-softmax.
    A class the teacher gives p and the student q adds about p log(1 + 1e-8 / q) more to ours, and its gradient into
    the student's logit is q - p in ours, about -p q / (q + 1e-8) in the official: a relative ~1e-8 / q apart,
    negligible while q >> 1e-8; below q = 1e-8 the official term saturates near p log(p / 1e-8) and its gradient
    fades. Teacher (1/2, 1/2), the student's second class at logit gap 10, 15, 25 (the figures dks.py's
    docstring quotes)."""
    eps = 1e-8
    teacher = torch.tensor([[0., 0.]])
    for gap in (10., 15., 25.):
        q = 1 / (1 + math.exp(gap))  # the student's second-class probability: 4.5e-5, 3.1e-7, 1.4e-11
        smooth = [(v + eps) / (1 + 2 * eps) for v in (1 - q, q)]
        official_by_hand = sum(0.5 * math.log(0.5 / s) for s in smooth)  # the teacher's smoothed 1/2 is 1/2
        student = torch.tensor([[0., -gap]], requires_grad=True)
        ours_kl = kd_kl_from_logits(student, teacher, 1.0)  # synergy_loss's term with the teacher's side
        reference_student = student.detach().clone().requires_grad_()
        official = official_kl_divergence(teacher, reference_student)
        grad_ours, = torch.autograd.grad(ours_kl, student)
        grad_official, = torch.autograd.grad(official, reference_student)
        assert ours_kl.item() == pytest.approx(0.5 * math.log(0.5 / (1 - q)) + 0.5 * math.log(0.5 / q), rel=1e-6)
        assert official.item() == pytest.approx(official_by_hand, rel=1e-5)
        assert grad_ours[0, 1].item() == pytest.approx(q - 0.5, rel=1e-6)
        assert grad_official[0, 1].item() == pytest.approx(-0.5 * q / (q + eps), rel=1e-3)
        if gap == 10.:  # q = 4.5e-5: 1.1e-4 apart (p 1e-8 / q), gradients 2e-4 apart (relative)
            assert ours_kl.item() - official.item() == pytest.approx(0.5 * eps / q, rel=0.05)
        elif gap == 15.:  # q = 3.1e-7: 0.016 apart, gradients 3% apart
            assert ours_kl.item() - official.item() == pytest.approx(0.0161, abs=1e-3)
            assert grad_official[0, 1].item() / grad_ours[0, 1].item() == pytest.approx(0.968, abs=1e-3)
        else:  # q = 1.4e-11: 11.81 against 8.52; -0.5 against -6.9e-4
            assert (ours_kl.item(), official.item()) == pytest.approx((11.807, 8.516), abs=1e-3)
            assert grad_official[0, 1].item() == pytest.approx(-6.93e-4, rel=1e-2)


def test_terms_by_hand_with_weights_and_temperature():
    beta, lam, temperature = 0.5, 0.3, 2.0
    logits, branches, target = _tensors()
    out = dks_loss(logits, branches, target, F.cross_entropy,
                   DKSHparams(branch_weight=beta, synergy_weight=lam, temperature=temperature))
    classifiers = BRANCH_LOGITS + [LOGITS]
    ce = hand_ce(LOGITS, TARGET)
    branch_ce = sum(hand_ce(z, TARGET) for z in BRANCH_LOGITS)
    synergy = sum(hand_kd(teacher, student, temperature)  # T^2 KL(P_n || P_m), 6 ordered pairs
                  for m, student in enumerate(classifiers) for n, teacher in enumerate(classifiers) if m != n)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-6)
    assert out['loss_branch_ce'].item() == pytest.approx(branch_ce, rel=1e-6)
    assert out['loss_synergy'].item() == pytest.approx(synergy, rel=1e-5)
    assert out['loss'].item() == pytest.approx(ce + beta * branch_ce + lam * synergy, rel=1e-5)


def test_synergy_gradient_reaches_every_classifier_only_as_student():
    """Dense, both directions: each classifier gets the gradient of the KL terms where it is the student; the
    target side is detached (the code's `o2.detach()`)."""
    a = torch.tensor(LOGITS, requires_grad=True)
    b = torch.tensor(BRANCH_LOGITS[0], requires_grad=True)
    grad_a, grad_b = torch.autograd.grad(synergy_loss([a, b]), [a, b])
    kl_a = F.kl_div(a.log_softmax(-1), b.detach().softmax(-1), reduction='batchmean')  # a the student of b
    kl_b = F.kl_div(b.log_softmax(-1), a.detach().softmax(-1), reduction='batchmean')  # and b of a
    torch.testing.assert_close(grad_a, torch.autograd.grad(kl_a, a)[0])
    torch.testing.assert_close(grad_b, torch.autograd.grad(kl_b, b)[0])
    with pytest.raises(ValueError, match='at least two classifiers'):
        synergy_loss([a])


def _grads_of_every_trained_parameter(task, x, y):
    out = task(x, y)
    out['loss'].backward()
    missing = [n for n, p in task.trainable_module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f'parameters without gradient (DDP would stop): {missing[:5]}'
    return out


def test_resnet_branches_are_fresh_copies_of_the_remaining_stages():
    """Default levels: the ends of the two stages before the last (layer2, layer3, as the official code's branches
    after WRN's first and second of three groups). Each branch is a copy of the later stages and the head (the
    stem and the earlier stages cut away), freshly initialised: given the model's weights it reproduces the model's
    logits from the captured stage output."""
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('dks', model)
    module = task.trainable_module
    assert module.indices == [2, 3] and [b.module_name for b in module.exits] == ['layer2', 'layer3']
    first, second = module.exits

    def cut(m):  # an identity: an empty nn.Sequential
        return isinstance(m, nn.Sequential) and len(m) == 0
    assert all(cut(getattr(first.model, n)) for n in ('conv1', 'bn1', 'maxpool', 'layer1', 'layer2'))
    assert cut(second.model.layer3) and not cut(first.model.layer3)
    model_params = dict(model.named_parameters())
    for branch in (first, second):
        names = [n for n, _ in branch.model.named_parameters()]
        assert names and all(n.startswith(('layer3', 'layer4', 'fc')) for n in names)
        assert all(branch.model.get_parameter(n).shape == model_params[n].shape for n in names)
        assert not torch.equal(branch.model.fc.weight, model.fc.weight)  # independently initialised
        assert not torch.equal(branch.model.layer4[0].conv1.weight, model.layer4[0].conv1.weight)
    assert not torch.equal(first.model.layer4[0].conv1.weight, second.model.layer4[0].conv1.weight)

    x = torch.randn(2, 3, 32, 32)
    task.eval()
    captured = []
    handle = model.layer2.register_forward_hook(lambda m, a, o: captured.append(o))
    expected = model(x)
    handle.remove()
    copied = copy.deepcopy(first)
    copied.model.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(copied(captured[0])[0], expected)
    # one pass gives the model's logits and every branch's; validation reports them too
    logits, _, branch_logits, _ = module(x)
    torch.testing.assert_close(logits, expected)
    eval_logits, eval_branches = task.eval_forward()(x)
    torch.testing.assert_close(eval_logits, expected)
    for a, b in zip(eval_branches, branch_logits):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize('family', ['efficientnet', 'vit', 'swin'])
def test_branches_train_on_more_families(family):
    """EfficientNet (blocks[i+1:], conv_head, bn2), ViT (blocks on the token sequence, norm; its unused position
    embedding and class token frozen) and Swin (layers, norm): every trained parameter gets a gradient, training
    moves the branches, the deployed state_dict is the plain model's."""
    if family == 'efficientnet':
        model, size = timm.create_model('test_efficientnet', num_classes=4), 32
    else:
        model, size = small_model(family)
    reference = copy.deepcopy(model)
    task = timm_selfkd.create_task('dks', model).train()
    module = task.trainable_module
    assert len(module.exits) == 2 and module.exits[0].tokens == (family == 'vit')
    if family == 'vit':
        frozen = {n for n, p in module.exits.named_parameters() if not p.requires_grad}
        assert frozen == {f'{j}.model.{n}' for j in (0, 1) for n in ('cls_token', 'pos_embed')}
    x, y = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])
    before = copy.deepcopy(module.exits.state_dict())
    optimizer = torch.optim.SGD([p for p in task.trainable_module.parameters() if p.requires_grad], lr=0.01)
    out = _grads_of_every_trained_parameter(task, x, y)
    optimizer.step()
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss')) and out['loss_synergy'] > 0
    assert any(not torch.equal(v, module.exits.state_dict()[k]) for k, v in before.items())
    assert set(task.get_checkpoint_state()['state_dict']) == set(reference.state_dict())


def test_light_and_deep_exits_in_one_module():
    """The generalised machinery: BYOT's light exit on a forward_intermediates() output and a deep branch on the raw
    output of its level's module, from one pass; the light exit's feature is its F_i, the deep branch's its final
    map."""
    model = timm.create_model('test_resnet', num_classes=4)
    exits = nn.ModuleList([Exit(model.feature_info[1]['num_chs'], model.num_features, 4),
                           *deep_branches(model, [3], 'dks')])
    module = MultiExitModule(model, [1, 3], exits).eval()
    x = torch.randn(2, 3, 32, 32)
    logits, features, exit_logits, exit_features = module(x)
    final, (level1, level3) = model.forward_intermediates(x, indices=[1, 3])
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(exit_logits[0], exits[0](level1)[0])
    torch.testing.assert_close(exit_logits[1], exits[1](level3)[0])
    assert [f.shape for f in exit_features] == [features.shape, final.shape]


def test_gradient_checkpointing_gives_the_same_step():
    """A model with timm's gradient checkpointing on (train.py sets it before the task wraps the model): the levels
    are captured though the stages' blocks are called one by one, the branches checkpoint too, and the loss and
    gradients are those of the run without it."""
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3])

    def step(task):
        model, branch = task.get_eval_model(), task.trainable_module.exits[0].model
        assert branch.grad_checkpointing == model.grad_checkpointing
        out = task(x, y)
        return (out['loss'], *torch.autograd.grad(out['loss'], [model.conv1[0].weight, branch.layer4[0].conv1.weight]))
    without, with_checkpointing = runs_without_and_with_checkpointing('dks', step)
    for a, b in zip(without, with_checkpointing):
        torch.testing.assert_close(a, b)


def test_families_without_a_chain_from_the_level_are_refused():
    """A model whose forward from the level is no chain of modules (CaiT adds its position embedding before the
    blocks and appends the class token later; EVA's blocks take rotary embeddings) is refused in one line."""
    cait = timm.create_model('cait_xxs24_224', num_classes=4, img_size=32, patch_size=8, depth=4)
    with pytest.raises(ValueError, match=r'^dks: no deep branch after forward_intermediates\(\) level 0 \(blocks.0\) '
                                         r'of cait_xxs24_224: .*not a chain of modules') as info:
        timm_selfkd.create_task('dks', cait)
    assert '\n' not in str(info.value)
    eva = timm.create_model('eva02_tiny_patch14_224', num_classes=4, img_size=28, depth=3)
    with pytest.raises(ValueError, match='dks: no deep branch .* of eva02_tiny_patch14_224'):
        timm_selfkd.create_task('dks', eva)


def test_bf16_terms_are_finite_float32_and_soft_targets():
    model, size = small_model('vit')
    task = timm_selfkd.create_task('dks', model).train()
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(torch.randn(4, 3, size, size), soft)
    for name, value in out.items():
        if name.startswith('loss'):
            assert value.dtype == torch.float32 and torch.isfinite(value), name
    expected = -(soft * out['output'].float().log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out['loss_ce'], expected)


def test_task_state_round_trip_and_ema():
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('dks', model).train()
    task.setup_ema(decay=0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    train_steps(task, x, y, steps=1)
    task.update_ema(step=10)
    state = task.get_checkpoint_state()
    assert not any('exits' in key for key in state['state_dict']) and state['task_state']['exit_indices'] == [2, 3]
    assert any(k.startswith('0.model.layer3') for k in state['task_state']['exits'])
    ema_state = task.get_checkpoint_state(ema=True)
    assert not torch.equal(ema_state['task_state_ema']['exits']['0.model.fc.weight'],
                           state['task_state']['exits']['0.model.fc.weight'])

    fresh = restored_task('dks', state, ema_state)
    task.eval(), fresh.eval()
    for ema in (False, True):
        got, expected = fresh.eval_forward(ema=ema)(x), task.eval_forward(ema=ema)(x)
        for a, b in zip([got[0]] + got[1], [expected[0]] + expected[1]):
            torch.testing.assert_close(a, b)
    evaluator = task.create_evaluator()
    evaluator.update(task.eval_forward()(x), y)
    assert {'exit1_top1', 'exit2_top1', 'ensemble_top1'} <= set(evaluator.compute())

    other = timm_selfkd.create_task('dks', timm.create_model('test_resnet', num_classes=4), indices='3')
    with pytest.raises(ValueError, match=r"part 'exits' was built for \{'exit_indices': \[2, 3\]\}, this run's for "
                                         r"\{'exit_indices': \[3\]\} \(set --dks-indices to match\)"):
        other.load_task_state(state['task_state'])


def test_bad_input():
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=6)
    assert exit_indices(vit, method='dks', default_exits=2) == [1, 3]  # blocks at 1/3 and 2/3 of the depth
    with pytest.raises(ValueError, match='dks: exit index 5 does not exist for vit_tiny_patch16_224: valid indices '
                                         'are 0-4'):
        timm_selfkd.create_task('dks', vit, indices='5')
    with pytest.raises(ValueError, match='dks needs a model with a classifier'):
        timm_selfkd.create_task('dks', timm.create_model('test_resnet', num_classes=0))
    with pytest.raises(ValueError, match='dks indices must be comma-separated integers'):
        checked_hparams('dks', indices='a')
    for name in ('branch_weight', 'synergy_weight'):
        with pytest.raises(ValueError, match=f'dks {name} must be >= 0, got -1.0'):
            checked_hparams('dks', **{name: -1.0})
    with pytest.raises(ValueError, match='dks temperature must be > 0, got 0.0'):
        checked_hparams('dks', temperature=0.)
