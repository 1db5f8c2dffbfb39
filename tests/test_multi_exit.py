"""Multi-exit training (`multi_exit`: BYOT eq. 2, DMFL eq. 3): golden losses, exits on six model families,
checkpoints without exits, task state, the per-exit evaluator and bad input."""
import copy
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_selfkd
from conftest import SMALL_FAMILIES, checked_hparams, small_model, train_steps
from timm_selfkd.methods.multi_exit import MultiExitEvaluator, MultiExitHparams, exit_indices, multi_exit_loss

# Two images, three classes, features of size four, two exits.
LOGITS = [[2.0, 0.5, -1.0], [0.0, 1.0, 0.3]]
FEATURES = [[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.0, 1.5]]
EXIT_LOGITS = [[[1.0, 1.0, 0.0], [0.2, -0.4, 1.0]], [[0.0, 2.0, -1.0], [1.5, 0.0, 0.0]]]
EXIT_FEATURES = [[[0.0, 1.0, 1.0, 0.0], [2.0, 0.0, -1.0, 0.5]], [[1.0, -1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]]
TARGET = [0, 2]


def _softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _ce(rows, target=TARGET):
    return sum(-math.log(_softmax(r)[y]) for r, y in zip(rows, target)) / len(rows)


def _kl(teacher_rows, student_rows, temperature=1.0):
    """Batch mean of KL(softmax(t / T) || softmax(s / T))."""
    return sum(sum(q * math.log(q / p) for q, p in zip(_softmax(t, temperature), _softmax(s, temperature)))
               for t, s in zip(teacher_rows, student_rows)) / len(teacher_rows)


def _hint(exit_rows, deep_rows):
    """BYOT's official `feature_loss_function` re-written: `(fea - target_fea)**2 * ((fea > 0) | (target_fea >
    0)).float()`, `.abs().sum()`: summed over the batch and the features, entries where both are <= 0 left out."""
    fea, target_fea = torch.tensor(exit_rows), torch.tensor(deep_rows)
    return torch.abs((fea - target_fea) ** 2 * ((fea > 0) | (target_fea > 0)).float()).sum().item()


def _tensors(requires_grad=False):
    make = lambda v: torch.tensor(v, requires_grad=requires_grad)
    return (make(LOGITS), make(FEATURES), [make(v) for v in EXIT_LOGITS], [make(v) for v in EXIT_FEATURES],
            torch.tensor(TARGET))


@pytest.mark.parametrize('byot, dmfl', [(True, True), (True, False), (False, True)])
def test_golden_loss(byot, dmfl):
    alpha, weight, temperature = 0.3, 0.05, 2.0
    hp = MultiExitHparams(byot=byot, dmfl=dmfl, alpha=alpha, feature_weight=weight, temperature=temperature)
    out = multi_exit_loss(*_tensors(), F.cross_entropy, hp)
    ce = _ce(LOGITS)
    exit_ce = sum(_ce(z) for z in EXIT_LOGITS)
    kl = sum(temperature ** 2 * _kl(LOGITS, z, temperature) for z in EXIT_LOGITS)
    hint = sum(_hint(f, FEATURES) for f in EXIT_FEATURES)
    dmfl_term = sum(_kl(f, FEATURES) + _kl(FEATURES, f) for f in EXIT_FEATURES) / len(EXIT_FEATURES)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-6)
    assert out['loss_exit_ce'].item() == pytest.approx(exit_ce, rel=1e-6)
    expected = ce + ((1 - alpha) * exit_ce + alpha * kl + weight * hint if byot else exit_ce)
    if byot:
        assert out['loss_exit_kl'].item() == pytest.approx(kl, rel=1e-6)
        assert out['loss_hint'].item() == pytest.approx(hint, rel=1e-6)
        assert hint == pytest.approx(12.25)  # by hand: (3 + 3.5) + (4 + 1.75), entries both <= 0 left out
    else:
        assert 'loss_exit_kl' not in out and 'loss_hint' not in out
    if dmfl:
        assert out['loss_dmfl'].item() == pytest.approx(dmfl_term, rel=1e-6)
        expected += dmfl_term
    else:
        assert 'loss_dmfl' not in out
    assert out['loss'].item() == pytest.approx(expected, rel=1e-6)


def test_gradient_directions():
    """BYOT's KL and hint treat the deepest classifier as the teacher (no gradient into P_N or F_N); DMFL is
    mutual (gradient into both F_i and F_N)."""
    hp = MultiExitHparams(byot=True, dmfl=False)
    logits, features, exit_logits, exit_features, target = _tensors(requires_grad=True)
    out = multi_exit_loss(logits, features, exit_logits, exit_features, target, F.cross_entropy, hp)
    (out['loss_exit_kl'] + out['loss_hint']).backward()
    assert logits.grad is None and features.grad is None
    assert exit_logits[0].grad.abs().sum() > 0 and exit_features[0].grad.abs().sum() > 0
    logits, features, exit_logits, exit_features, target = _tensors(requires_grad=True)
    out = multi_exit_loss(logits, features, exit_logits, exit_features, target, F.cross_entropy,
                          MultiExitHparams(byot=False, dmfl=True))
    out['loss_dmfl'].backward()
    assert features.grad.abs().sum() > 0 and all(f.grad.abs().sum() > 0 for f in exit_features)


@pytest.mark.parametrize('family', sorted(SMALL_FAMILIES))
def test_exits_on_six_families(family):
    """Three exits built on the stage outputs; one pass gives the model's own logits; training moves the exits;
    the deployed state_dict is the plain model's."""
    model, size = small_model(family)
    reference = copy.deepcopy(model)
    task = timm_selfkd.create_task('multi_exit', model)
    module = task.trainable_module
    assert len(module.exits) == 3
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    task.train(), reference.train()
    logits, features, exit_logits, exit_features = module(x)
    torch.testing.assert_close(logits, reference(x))
    assert [z.shape for z in exit_logits] == [logits.shape] * 3
    assert [f.shape for f in exit_features] == [features.shape] * 3
    exits_before = copy.deepcopy(module.exits.state_dict())
    out = train_steps(task, x, y)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss'))
    assert any(not torch.equal(v, module.exits.state_dict()[k]) for k, v in exits_before.items())
    assert set(task.get_checkpoint_state()['state_dict']) == set(reference.state_dict())


def test_checkpoint_loads_in_plain_timm_and_exits_round_trip(tmp_path):
    model, size = small_model('resnet')
    task = timm_selfkd.create_task('multi_exit', model)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    train_steps(task.train(), x, y)
    state = task.get_checkpoint_state()
    assert not any('exit' in key for key in state['state_dict'])
    torch.save({'state_dict': state['state_dict']}, tmp_path / 'model.pth')
    plain = timm.create_model('resnet18', num_classes=4, checkpoint_path=str(tmp_path / 'model.pth'))
    torch.testing.assert_close(plain.fc.weight, model.fc.weight)

    fresh = timm_selfkd.create_task('multi_exit', small_model('resnet', seed=1)[0])
    fresh.load_checkpoint_state(state['state_dict'], copy.deepcopy(state['task_state']))
    task.eval(), fresh.eval()
    got, expected = fresh.eval_forward()(x), task.eval_forward()(x)
    for a, b in zip([got[0]] + got[1], [expected[0]] + expected[1]):
        torch.testing.assert_close(a, b)

    other = timm_selfkd.create_task('multi_exit', small_model('resnet')[0], indices='2,3')
    with pytest.raises(ValueError, match=r"part 'exits' was built for \{'exit_indices': \[1, 2, 3\]\}, this run's "
                                         r"for \{'exit_indices': \[2, 3\]\} \(set --multi-exit-indices to match\)"):
        other.load_task_state(state['task_state'])


def test_ema_exits_are_evaluated_and_saved():
    model, size = small_model('convnext')
    task = timm_selfkd.create_task('multi_exit', model)
    task.setup_ema(decay=0.5)
    x, y = torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3])
    train_steps(task.train(), x, y, steps=1)
    task.update_ema(step=10)  # timm's EMA copies the weights up to step 1
    live, ema = task.get_task_state()['exits'], task.get_task_state(ema=True)['exits']
    assert not torch.equal(live['0.fc.weight'], ema['0.fc.weight'])
    assert type(task.get_eval_model(ema=True)) is type(model)
    logits, exit_logits = task.eval_forward(ema=True)(x)
    torch.testing.assert_close(logits, task.get_eval_model(ema=True)(x))
    assert len(exit_logits) == 3


def test_dmfl_only_exit_classifiers_are_probes():
    """Without BYOT the exits' CE trains their classifiers only; the backbone learns from DMFL."""
    model, size = small_model('resnet')
    task = timm_selfkd.create_task('multi_exit', model, byot=False, dmfl=True).train()
    out = task(torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3]))
    backbone = model.layer1[0].conv1.weight
    fc = task.trainable_module.exits[0].fc.weight
    grads = torch.autograd.grad(out['loss_exit_ce'], [backbone, fc], allow_unused=True)
    assert grads[0] is None and grads[1].abs().sum() > 0
    assert torch.autograd.grad(out['loss_dmfl'], backbone)[0].abs().sum() > 0


def test_soft_targets_and_bf16_autocast():
    """Mixup's (or PS-KD's) target distributions go through a soft-target CE; bf16 autocast stays finite."""
    model, size = small_model('vit')
    task = timm_selfkd.create_task('multi_exit', model).train()
    x = torch.randn(4, 3, size, size)
    soft = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.0, 1.0, 0.0, 0.0], [0.25] * 4, [0.1, 0.2, 0.3, 0.4]])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(x, soft)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss'))
    expected = -(soft * out['output'].float().log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(out['loss_ce'], expected)


def test_evaluator_golden_values():
    """Per-exit top-1 and the ensemble (mean softmax of all classifiers), with the padding rows left out."""
    main = timm_selfkd.create_task('multi_exit', small_model('resnet')[0]).create_evaluator(max_samples=3).main
    evaluator = MultiExitEvaluator(main, 2, torch.device('cpu'), max_samples=3)
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0], [9.0, 0.0]])
    exit1 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [9.0, 0.0]])
    exit2 = torch.tensor([[0.0, 5.0], [4.0, 0.0], [0.0, 0.1], [9.0, 0.0]])
    target = torch.tensor([0, 1, 0, 1])
    evaluator.update((logits[:2], [exit1[:2], exit2[:2]]), target[:2])
    evaluator.update((logits[2:], [exit1[2:], exit2[2:]]), target[2:])
    metrics = evaluator.compute()
    # ensemble p(class 0): image 0 (0.953 + 0.269 + 0.007) / 3 = 0.41 -> 1 (wrong); image 1 (0.269 + 0.269 + 0.982)
    # / 3 = 0.51 -> 0 (wrong); image 2 (0.881 + 0.731 + 0.475) / 3 = 0.70 -> 0 (right); image 3 is padding
    assert metrics['top1'] == pytest.approx(100.0)
    assert metrics['exit1_top1'] == pytest.approx(200 / 3)
    assert metrics['exit2_top1'] == pytest.approx(0.0)
    assert metrics['ensemble_top1'] == pytest.approx(100 / 3)
    assert evaluator.metric_names[-3:] == ('exit1_top1', 'exit2_top1', 'ensemble_top1')


class NoIntermediates(nn.Module):
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def test_bad_input():
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=32, patch_size=8, depth=8)
    assert exit_indices(vit) == [1, 3, 5]
    assert exit_indices(vit, '6,0') == [0, 6]
    for indices in ('7', '-1'):
        with pytest.raises(ValueError, match=f'exit index {indices} does not exist for vit_tiny_patch16_224: '
                                             'valid indices are 0-6'):
            exit_indices(vit, indices)
    with pytest.raises(ValueError, match='has no forward_intermediates'):
        timm_selfkd.create_task('multi_exit', NoIntermediates())
    with pytest.raises(ValueError, match=r"multi_exit indices must be comma-separated integers \(e.g. 2,5,8\), got "
                                         r"'2;5'"):
        checked_hparams('multi_exit', indices='2;5')
    with pytest.raises(ValueError, match="multi_exit indices must be distinct, got '2,2'"):
        checked_hparams('multi_exit', indices='2,2')
    with pytest.raises(ValueError, match=r'multi_exit alpha must be in \[0, 1\], got -0.1'):
        checked_hparams('multi_exit', alpha=-0.1)
    with pytest.raises(ValueError, match='multi_exit feature_weight must be >= 0, got -1e-06'):
        checked_hparams('multi_exit', feature_weight=-1e-6)
    with pytest.raises(ValueError, match='needs byot or dmfl'):
        checked_hparams('multi_exit', byot=False, dmfl=False)
