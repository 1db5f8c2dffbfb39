"""MrKD and MrKD-TC: eq. 13, 14, 16 and 17 by hand, the copy ring of Alg. 1, copy modes and bad input."""
import math

import pytest
import timm
import torch
import torch.nn as nn

import timm_selfkd
from conftest import checked_hparams
from timm_selfkd.components.losses import teacher_correction
from timm_selfkd.methods.base import RunInfo
from timm_selfkd.methods.mrkd import Interval


class BiasModel(nn.Module):
    """Logits = bias, whatever the input: the copies' and the student's distributions are set by hand."""

    def __init__(self, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(len(bias), 1))
        self.bias = nn.Parameter(torch.tensor(bias, dtype=torch.float32))
        self.num_classes = len(bias)

    def forward(self, x):
        return x[:, :1] @ self.weight.t() + self.bias


def _task(method, student_bias, copy_biases, **hparams):
    """A task whose n copies (newest first) have the given biases; no refresh before step 1000."""
    task = timm_selfkd.create_task(method, BiasModel(student_bias), copies=len(copy_biases), interval='1000',
                                   **hparams)
    biases = torch.tensor(copy_biases, dtype=torch.float32)
    task.ring.load_state_dict({'weight': torch.zeros(len(copy_biases), len(student_bias), 1), 'bias': biases})
    return task


def test_eq13_eq14_by_hand():
    # T = 2. Copy 1: softmax(t / T) = (3/4, 1/4) from t = (2 ln 3, 0); copy 2: (1/2, 1/2). Student: (1/2, 1/2).
    # KL((3/4, 1/4) || (1/2, 1/2)) = 3/4 ln(3/2) + 1/4 ln(1/2); KL(u || u) = 0; eq. 14 averages the two.
    # CE of the student (1/2, 1/2) at T = 1 with y = 0: ln 2. Eq. 13: (1 - a) ln 2 + a T^2 (eq. 14).
    task = _task('mrkd', [0., 0.], [[2 * math.log(3), 0.], [0., 0.]], alpha=0.25, temperature=2.)
    out = task(torch.ones(1, 1), torch.tensor([0]))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out['loss_kd'].item() == pytest.approx(4 * kl / 2, abs=1e-6)
    assert out['loss_ce'].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out['loss'].item() == pytest.approx(0.75 * math.log(2) + 0.25 * 4 * kl / 2, abs=1e-6)


def test_eq13_single_copy_and_batch_mean():
    # n = 1, two identical images: the batch mean of KL equals the single image's KL
    task = _task('mrkd', [0., 0.], [[2 * math.log(3), 0.]], alpha=0.5, temperature=2.)
    out = task(torch.ones(2, 1), torch.tensor([0, 1]))
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert out['loss_kd'].item() == pytest.approx(4 * kl, abs=1e-6)


def test_eq16_teacher_correction_by_hand():
    # q = (0.5, 0.3, 0.2) at T = 1. True class 0, gamma 0.6: (0.6, 0.4 * 0.3 / 0.5, 0.4 * 0.2 / 0.5).
    # True class 2: (0.4 * 0.5 / 0.8, 0.4 * 0.3 / 0.8, 0.6).
    logits = torch.tensor([0.5, 0.3, 0.2]).log().repeat(2, 1)
    corrected = teacher_correction(logits, torch.tensor([0, 2]), gamma=0.6, temperature=1.)
    assert torch.allclose(corrected, torch.tensor([[0.6, 0.24, 0.16], [0.25, 0.15, 0.6]]), atol=1e-6)
    # the same at T = 2 from logits 2 * log q; a (n, B, K) stack of copies is corrected copy by copy
    stacked = teacher_correction(2 * logits[None].repeat(3, 1, 1), torch.tensor([0, 2]), 0.6, 2.)
    assert torch.allclose(stacked, corrected.expand(3, 2, 3), atol=1e-6)
    # a teacher sure of the true class: the rest is still split by the other classes' proportions, exactly
    sure = teacher_correction(torch.tensor([[200., 0., math.log(3.)]]), torch.tensor([0]), 0.9, 1.)
    assert torch.allclose(sure, torch.tensor([[0.9, 0.025, 0.075]]), atol=1e-6)
    # constant logits give eq. 11's uniform-teacher correction
    assert torch.allclose(teacher_correction(torch.zeros(1, 5), torch.tensor([3]), 0.2, 3.),
                          torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2]]))


def test_eq17_by_hand():
    # T = 2, copies (newest first) with q(T) = (0.5, 0.3, 0.2) and (1/3, 1/3, 1/3); student uniform; y = 0,
    # gamma 0.6. Corrected: (0.6, 0.24, 0.16) and (0.6, 0.2, 0.2). KL(p || u) = sum p ln(3 p).
    # Eq. 17: (1 - a) ln 3 + a T (1/2) (KL_1 + KL_2)  -- T, not T^2.
    copy_logits = [(2 * torch.tensor([0.5, 0.3, 0.2]).log()).tolist(), [0., 0., 0.]]
    task = _task('mrkd_tc', [0., 0., 0.], copy_logits, alpha=0.25, temperature=2., gamma=0.6)
    out = task(torch.ones(1, 1), torch.tensor([0]))
    kl_1 = 0.6 * math.log(1.8) + 0.24 * math.log(0.72) + 0.16 * math.log(0.48)
    kl_2 = 0.6 * math.log(1.8) + 2 * 0.2 * math.log(0.6)
    assert out['loss_kd'].item() == pytest.approx(2 * (kl_1 + kl_2) / 2, abs=1e-6)
    assert out['loss'].item() == pytest.approx(0.75 * math.log(3) + 0.25 * 2 * (kl_1 + kl_2) / 2, abs=1e-6)


def test_ring_follows_algorithm_1():
    """kappa = 2, n = 3: at steps t = 2, 4, 6 the copies shift and theta_1 := the weights of that step;
    before the first refresh every copy holds the initial weights. The weights at step t are marked t."""
    model = BiasModel([0., 0.])
    task = timm_selfkd.create_task('mrkd', model, copies=3, interval='2')
    task.train()
    history = []
    for t in range(1, 8):
        with torch.no_grad():
            model.bias.fill_(t)
        task(torch.ones(1, 1), torch.tensor([0]))
        history.append(task.ring.state_dict()['bias'][:, 0].tolist())
    assert history == [[1, 1, 1], [2, 1, 1], [2, 1, 1], [4, 2, 1], [4, 2, 1], [6, 4, 2], [6, 4, 2]]
    assert task.num_steps == 7


def test_eval_mode_forward_neither_counts_nor_refreshes():
    model = BiasModel([0., 0.])
    task = timm_selfkd.create_task('mrkd', model, copies=1, interval='1')
    task.eval()
    task(torch.ones(1, 1), torch.tensor([0]))
    assert task.num_steps == 0


def test_copies_are_outside_the_trainable_module_optimizer_and_ema():
    model = timm.create_model('resnet18', num_classes=4)
    task = timm_selfkd.create_task('mrkd', model, copies=2, interval='1')
    task.setup_ema(decay=0.9)
    task.train()
    task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    model_tensors = len(model.state_dict())
    assert len(task.state_dict()) == model_tensors + len(task.trainable_module_ema.state_dict())
    trainable = sum(p.numel() for p in task.get_trainable_module().parameters())
    assert trainable == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in task.parameters()) == 2 * trainable  # the model and its EMA, no copies
    copies = task.get_task_state()['copies']
    assert set(copies) == {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert copies['fc.weight'].shape == (2, 4, 512)


def test_copy_modes_eval_and_train():
    """eval: the copy gives the model's eval-mode output; train: batch statistics, its running statistics
    untouched."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].running_var.fill_(2.)
    x = torch.randn(6, 3)
    for mode in ('eval', 'train'):
        task = timm_selfkd.create_task('mrkd', model, copies=1, interval='100', copy_mode=mode)
        task.ring.fill(model)
        teacher = task.ring.forward_all(x)[0]
        with torch.no_grad():
            reference = model.train(mode == 'train')(x)
            model[1].running_mean.fill_(0.5)  # undo the reference's own update in train mode
            model[1].running_var.fill_(2.)
        assert torch.allclose(teacher, reference, atol=1e-6), mode
        assert torch.equal(task.ring.state_dict()['1.running_mean'], torch.full((1, 4), 0.5))
    assert not torch.allclose(model.eval()(x), model.train()(x))  # the modes really differ here


def test_batched_copies_equal_one_by_one():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    outputs = []
    for batched in (False, True):
        task = timm_selfkd.create_task('mrkd', model, copies=2, interval='100', batched=batched)
        task.ring.fill(model)
        with torch.no_grad():
            model.fc.bias.add_(1.)
        task.ring.push(model)  # two different copies
        outputs.append(task.ring.forward_all(x))
        with torch.no_grad():
            model.fc.bias.sub_(1.)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)
    assert not torch.allclose(outputs[0][0], outputs[0][1])


@pytest.mark.parametrize('text, steps', [('2000', 2000), (2000, 2000), ('25e', 25 * 391), ('2.5e', 978),
                                         (' 1e ', 391), ('.5e', 196)])
def test_interval_in_steps_or_epochs(text, steps):
    assert Interval.parse(text).steps(391) == steps


@pytest.mark.parametrize('method', ['mrkd', 'mrkd_tc'])
@pytest.mark.parametrize('text', ['0', '0e', '2.5', 'e', '25 epochs', '-3', ''])
def test_bad_interval(text, method):
    with pytest.raises(ValueError, match=f'^{method} interval must be (> 0|a whole number of steps)'):
        checked_hparams(method, interval=text)


def test_interval_in_epochs_needs_the_run():
    with pytest.raises(ValueError) as exc:
        timm_selfkd.create_task('mrkd', BiasModel([0., 0.]), interval='2e')
    assert str(exc.value) == "create_task('mrkd') needs steps_per_epoch=... (its interval 2e is in epochs)"
    assert timm_selfkd.create_task('mrkd', BiasModel([0., 0.]), interval='2e', steps_per_epoch=7).interval_steps == 14
    spec = timm_selfkd.get_method('mrkd')
    task = spec.task_cls(BiasModel([0., 0.]), spec.hparams_cls(interval='2e'))  # built by hand, no run bound
    with pytest.raises(ValueError) as exc:
        task(torch.ones(1, 1), torch.tensor([0]))
    assert str(exc.value) == ('mrkd interval 2e is in epochs: create the task with steps_per_epoch=..., or give the '
                              'interval in steps')
    task.bind_run(RunInfo(num_epochs=10, steps_per_epoch=7, num_samples=70, num_classes=2, batch_size=10))
    assert task.interval_steps == 14


@pytest.mark.parametrize('interval, copies, warning', [
    ('10e', 1, 'interval 10e (70 steps) is not shorter than the run (70 steps): the copies stay the initial'),
    ('30', 3, '3 copies x 30 steps exceed the run (70 steps)'),
    ('23', 3, None)])
def test_interval_longer_than_the_run_is_a_warning(caplog, interval, copies, warning):
    """As the paper's kappa = 200 epochs point (never refreshed), a run may keep its initial copies."""
    timm_selfkd.create_task('mrkd', BiasModel([0., 0.]), interval=interval, copies=copies, num_epochs=10,
                            steps_per_epoch=7, num_samples=70, batch_size=10)
    messages = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert len(messages) == (1 if warning else 0) and all(warning in m for m in messages), messages


def test_task_state_round_trip_and_refusals():
    task = _task('mrkd', [0., 0.], [[1., 2.], [3., 4.]])
    task.num_steps = 17
    state = task.get_task_state()
    other = _task('mrkd', [0., 0.], [[0., 0.], [0., 0.]])
    other.load_task_state(state)
    assert torch.equal(other.ring.state_dict()['bias'], torch.tensor([[1., 2.], [3., 4.]]))
    assert other.num_steps == 17
    with pytest.raises(ValueError, match='has 2 mrkd copies, this run asks for 3 \\(--mrkd-copies\\)'):
        _task('mrkd', [0., 0.], [[0., 0.]] * 3).check_task_state(state)
    with pytest.raises(ValueError, match='have 2 classes, this model has 3'):
        _task('mrkd', [0., 0., 0.], [[0., 0., 0.]] * 2).check_task_state(state)
