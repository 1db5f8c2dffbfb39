"""Self-Guidance (`self_guidance`): eq. 5 on fixed tensors, the two passes, their gradients and its refusals."""
import copy
import logging
import math

import pytest
import timm
import torch

import timm_selfkd
from conftest import SMALL_FAMILIES, small_model
from timm_selfkd.methods.self_guidance import self_guidance_loss


def _softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def test_eq5_golden_values():
    """ce(z_S, y) + ce(z_T, y) + lambda T^2 KL(sm(z_T / T) || sm(z_S / T)), computed with the math module."""
    teacher = [[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]]
    student = [[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]
    target = [0, 1]
    weight, temperature = 0.25, 3.0
    ce = lambda rows: sum(-math.log(_softmax(r)[y]) for r, y in zip(rows, target)) / len(rows)
    kl = sum(sum(q * math.log(q / p) for q, p in zip(_softmax(t, temperature), _softmax(s, temperature)))
             for t, s in zip(teacher, student)) / len(teacher)
    expected_kd = temperature ** 2 * kl
    z_t, z_s, y = torch.tensor(teacher), torch.tensor(student), torch.tensor(target)
    ce_t, ce_s = torch.nn.functional.cross_entropy(z_t, y), torch.nn.functional.cross_entropy(z_s, y)
    out = self_guidance_loss(z_t, z_s, ce_t, ce_s, weight, temperature)
    assert out['loss_kd'].item() == pytest.approx(expected_kd, rel=1e-6)
    assert out['loss_ce'].item() == pytest.approx(ce(teacher), rel=1e-6)
    assert out['loss_ce_student'].item() == pytest.approx(ce(student), rel=1e-6)
    assert out['loss'].item() == pytest.approx(ce(teacher) + ce(student) + weight * expected_kd, rel=1e-6)
    assert expected_kd == pytest.approx(0.3517, abs=1e-4)  # checked by hand (0.352 with 4-digit rounding)


def test_kl_reaches_the_teacher_only_when_asked():
    z_t = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    z_s = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    zero = torch.zeros(())
    self_guidance_loss(z_t, z_s, zero, zero, 0.25, 3.0)['loss'].backward()
    assert z_t.grad is None and z_s.grad.abs().sum() > 0
    self_guidance_loss(z_t, z_s, zero, zero, 0.25, 3.0, kl_to_teacher=True)['loss'].backward()
    assert z_t.grad.abs().sum() > 0


def _task(family='resnet', seed=0, **hparams):
    model, size = small_model(family, seed=seed)
    task = timm_selfkd.create_task('self_guidance', model, criterion_kwargs=dict(smoothing=0.), **hparams)
    task.train()
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return task, model, x, torch.tensor([0, 1, 2, 3])


def _capture_passes(task):
    passes = []
    task.trainable_module.register_forward_hook(lambda module, args, out: passes.append(out))
    return passes


def test_default_rate_is_added_with_a_log_line(caplog):
    caplog.set_level(logging.INFO)
    task, model, _, _ = _task()
    units = task.trainable_module.units
    assert len(units) == 7 and units[-1].rate == pytest.approx(0.5)
    (line,) = [r.getMessage() for r in caplog.records if 'self_guidance' in r.getMessage()]
    assert 'built without stochastic depth' in line and '0 to 0.5' in line


def test_own_rates_are_kept():
    model, _ = small_model('vit', drop_path_rate=0.2)
    task = timm_selfkd.create_task('self_guidance', model, default_rate=0.4)
    assert task.trainable_module.units[-1].rate == pytest.approx(0.2)


def test_passes_and_loss_terms():
    """Teacher: deterministic, the model without stochastic depth; student: a sampled sub-network; the loss
    terms are eq. 5 of those logits."""
    task, model, x, y = _task()
    plain = copy.deepcopy(small_model('resnet')[0]).train()  # the same weights, built without DropPath
    passes = _capture_passes(task)
    outputs = [task(x, y) for _ in range(4)]
    for (teacher, student), out in zip(passes, outputs):
        torch.testing.assert_close(teacher, passes[0][0], rtol=0, atol=0)
        torch.testing.assert_close(out['output'], teacher)
        ref = self_guidance_loss(teacher, student, torch.nn.functional.cross_entropy(teacher, y),
                                 torch.nn.functional.cross_entropy(student, y), 0.25, 3.0)
        for key in ('loss', 'loss_ce', 'loss_ce_student', 'loss_kd'):
            torch.testing.assert_close(out[key], ref[key])
    torch.testing.assert_close(passes[0][0], plain(x))
    assert any(out['loss_kd'].item() > 1e-4 for out in outputs)  # some sub-network differs from the teacher


@pytest.mark.parametrize('family', sorted(SMALL_FAMILIES))
def test_trains_on_six_families(family):
    """One SGD step per family: finite terms, and every block's weights move (the teacher pass uses them all)."""
    task, model, x, y = _task(family)
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    out = task(x, y)
    assert all(torch.isfinite(out[k]) for k in ('loss', 'loss_ce', 'loss_ce_student', 'loss_kd'))
    out['loss'].backward()
    optimizer.step()
    for unit in task.trainable_module.units:
        weights = [n for n, p in model.named_parameters() if n.startswith(unit.name + '.')]
        assert any(not torch.equal(before[n], model.state_dict()[n]) for n in weights), unit.name


def _grad(loss, parameter):
    (grad,) = torch.autograd.grad(loss, parameter, retain_graph=True, allow_unused=True)
    return torch.zeros_like(parameter) if grad is None else grad


@pytest.mark.parametrize('kl_to_teacher', [False, True])
def test_gradients_reach_the_weights_through_both_passes(kl_to_teacher):
    """The teacher's CE reaches every block, the student's only the blocks it kept; the KL reaches a block
    the student dropped only when it may flow into the teacher pass."""
    task, _, x, y = _task(kl_to_teacher=kl_to_teacher)
    wrapper = task.trainable_module
    for _ in range(20):
        out = task(x, y)
        if not all(wrapper.last_keep) and any(wrapper.last_keep):
            break
    dropped = next(u for u, k in zip(wrapper.units, wrapper.last_keep) if not k)
    kept = next(u for u, k in zip(wrapper.units, wrapper.last_keep) if k)
    w_dropped, w_kept = dropped.block.conv1.weight, kept.block.conv1.weight
    assert _grad(out['loss_ce'], w_dropped).abs().sum() > 0
    assert _grad(out['loss_ce_student'], w_dropped).abs().sum() == 0
    assert _grad(out['loss_ce_student'], w_kept).abs().sum() > 0
    kd_to_dropped = _grad(out['loss_kd'], w_dropped).abs().sum()
    assert (kd_to_dropped > 0) == kl_to_teacher
    out['loss'].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (w_dropped, w_kept))


@pytest.mark.parametrize('student_bn_stats', [False, True])
def test_batchnorm_statistics_come_from_the_full_network(student_bn_stats):
    task, model, x, y = _task(student_bn_stats=student_bn_stats)
    plain = copy.deepcopy(small_model('resnet')[0]).train()
    task(x, y)
    plain(x)  # one full-network pass
    buffers, plain_buffers = dict(model.named_buffers()), dict(plain.named_buffers())
    same = [torch.equal(buffers[name], plain_buffers[name]) for name in plain_buffers]
    assert all(same) != student_bn_stats
    assert int(model.bn1.num_batches_tracked) == (2 if student_bn_stats else 1)


def test_per_sample_option_and_bf16_autocast():
    task, _, x, y = _task(family='vit', per_sample=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(x, y)
    assert task.trainable_module.last_keep is None
    assert all(torch.isfinite(out[k]) for k in ('loss', 'loss_ce', 'loss_ce_student', 'loss_kd'))
    out['loss'].backward()


def test_ema_and_eval_model_are_the_bare_model():
    task, model, x, y = _task()
    task.setup_ema(decay=0.5)
    task(x, y)['loss'].backward()
    task.update_ema(step=1)
    assert task.get_eval_model() is model
    assert type(task.get_eval_model(ema=True)) is type(model)
    assert set(task.get_eval_model(ema=True).state_dict()) == set(model.state_dict())


def test_compile_leaves_the_training_passes_eager():
    task, model, x, y = _task()
    task.compile(backend='eager')
    assert task.trainable_module.model is model  # not an OptimizedModule: the sub-network changes every step
    assert task.get_eval_model() is not model and task.get_eval_model()._orig_mod is model
    assert torch.isfinite(task(x, y)['loss'])


def test_refusals():
    with pytest.raises(ValueError, match='needs stochastic depth'):
        timm_selfkd.create_task('self_guidance', timm.create_model('dla46_c', num_classes=3))
    with pytest.raises(ValueError, match=r"the model's a stochastic-depth .* rate must be in \[0, 1\), got 1.0"):
        timm_selfkd.create_task('self_guidance', timm.create_model('resnet18', num_classes=3, drop_path_rate=1.0))
    with pytest.raises(ValueError, match=r'self_guidance default_rate must be in \[0, 1\), got 1.0'):
        timm_selfkd.create_task('self_guidance', timm.create_model('resnet18', num_classes=3), default_rate=1.0)
    with pytest.raises(ValueError, match='weight must be >= 0'):
        timm_selfkd.create_task('self_guidance', timm.create_model('resnet18', num_classes=3), weight=-0.1)
    model = timm.create_model('resnet18', num_classes=3)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match='cannot run with gradient checkpointing'):
        timm_selfkd.create_task('self_guidance', model)
