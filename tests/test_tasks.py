"""Tests of the method tasks built by `timm_selfkd.create_task` (registry, DLB, BAKE, plain).

Reference losses are recomputed in the tests from the returned logits with plain torch ops.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DistributedSampler, SequentialSampler

import timm_selfkd
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.components.losses import bake_targets
from timm_selfkd.components.samplers import ClassGroupBatchSampler, EpochBatchSampler, LastBatchSampler

NUM_CLASSES = 5


class TinyNet(nn.Module):
    """Deterministic toy classifier with timm's forward_features/forward_head(pre_logits=...) interface."""

    def __init__(self, in_dim=6, dim=8, num_classes=NUM_CLASSES):
        super().__init__()
        self.body = nn.Linear(in_dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        return torch.tanh(self.body(x))

    def forward_head(self, x, pre_logits: bool = False):
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def tiny_model(seed=0):
    """A seeded TinyNet whose head is scaled up so logits (and KD terms) are of order one."""
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():
        model.head.weight.mul_(8)
    return model


def ref_ce(logits, target):
    """Mean of -log softmax(z)[y]."""
    log_p = logits.float() - logits.float().logsumexp(dim=1, keepdim=True)
    return -log_p[torch.arange(len(target)), target].mean()


def ref_kd(student_logits, teacher_probs, temperature):
    """T^2 * mean_i sum_k q log(q / softmax(z / T))."""
    log_p = student_logits.float() / temperature
    log_p = log_p - log_p.logsumexp(dim=1, keepdim=True)
    q = teacher_probs.float()
    terms = torch.where(q > 0, q * (q.clamp_min(1e-30).log() - log_p), torch.zeros_like(q))
    return temperature ** 2 * terms.sum(dim=1).mean()


def dlb_batches(seed=1):
    """Two DLB-shaped batches of 8: batch 2 starts with batch 1's second half, re-augmented (noise)."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(8, 6, generator=g)
    x2 = torch.cat([x1[4:] + torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)])
    y1 = torch.randint(0, NUM_CLASSES, (8,), generator=g)
    y2 = torch.cat([y1[4:], torch.randint(0, NUM_CLASSES, (4,), generator=g)])
    x3 = torch.cat([x2[4:], torch.randn(4, 6, generator=g)])
    y3 = torch.cat([y2[4:], torch.randint(0, NUM_CLASSES, (4,), generator=g)])
    return (x1, y1), (x2, y2), (x3, y3)


# ---------------------------------------------------------------------------------------------------------------------
# DLB
# ---------------------------------------------------------------------------------------------------------------------

def test_dlb_loss_matches_hand_computed_reference():
    """Call 1: loss_kd = 0. Call 2: ce(z, y) + alpha T^2 KL(sm(z_prev[B/2:]/T) || sm(z[:B/2]/T)), alpha=0.5, T=2."""
    alpha, temperature = 0.5, 2.0
    task = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8, alpha=alpha, temperature=temperature)
    (x1, y1), (x2, y2), _ = dlb_batches()

    out1 = task(x1, y1)
    assert out1['loss_kd'].item() == 0.0
    torch.testing.assert_close(out1['loss_ce'], ref_ce(out1['output'], y1))
    torch.testing.assert_close(out1['loss'], out1['loss_ce'])

    out2 = task(x2, y2)
    z_prev, z = out1['output'].detach(), out2['output']
    kd = ref_kd(z[:4], torch.softmax(z_prev[4:] / temperature, dim=1), temperature)
    ce = ref_ce(z, y2)
    assert kd.item() > 0.05  # the re-augmentation noise makes the teacher differ from the student
    torch.testing.assert_close(out2['loss_kd'], kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out2['loss_ce'], ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out2['loss'], ce + alpha * kd, rtol=1e-4, atol=1e-6)


def test_dlb_single_forward_and_gradients():
    """One pass of the whole batch: output equals model(x); the KD term sends gradient only into the first half."""
    model = tiny_model()
    task = timm_selfkd.create_task('dlb', model, batch_size=8)
    (x1, y1), (x2, y2), _ = dlb_batches()
    task(x1, y1)
    x2 = x2.clone().requires_grad_(True)
    out = task(x2, y2)
    torch.testing.assert_close(out['output'], model(x2))
    out['loss_kd'].backward()
    assert x2.grad[:4].abs().sum() > 0
    assert x2.grad[4:].abs().sum() == 0


def test_dlb_short_carried_half():
    """At an epoch end the new part can be shorter than B/2; the next batch distils exactly those rows."""
    temperature = 3.0
    task = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8, temperature=temperature)
    torch.manual_seed(5)
    x1 = torch.randn(8, 6)
    x2 = torch.cat([x1[4:], torch.randn(2, 6)])  # 4 repeated + 2 new (short last half)
    x3 = torch.cat([x2[4:] + torch.randn(2, 6), torch.randn(4, 6)])  # 2 repeated + 4 new
    y = lambda n: torch.zeros(n, dtype=torch.long)
    task(x1, y(8))
    out2 = task(x2, y(6))
    assert task.last_logits.shape == (2, NUM_CLASSES)
    out3 = task(x3, y(6))
    expected = ref_kd(out3['output'][:2], torch.softmax(out2['output'].detach()[4:] / temperature, dim=1),
                      temperature)
    assert expected.item() > 1e-3
    torch.testing.assert_close(out3['loss_kd'], expected, rtol=1e-4, atol=1e-6)


def test_dlb_task_state_round_trip():
    """get_task_state/load_task_state: a fresh task with the saved state gives the same next-step loss_kd."""
    model = tiny_model()
    task = timm_selfkd.create_task('dlb', model, batch_size=8, alpha=0.5, temperature=2.0)
    (x1, y1), (x2, y2), _ = dlb_batches()
    task(x1, y1)
    state = task.get_task_state()
    assert set(state) == {'last_logits', 'new_per_step'}
    # one row block per process (one here), saved with the layout it belongs to
    assert state['last_logits'].dtype == torch.float32 and state['last_logits'].shape == (1, 4, NUM_CLASSES)
    state = copy.deepcopy(state)

    restored = timm_selfkd.create_task('dlb', copy.deepcopy(model), batch_size=8, alpha=0.5, temperature=2.0)
    restored.load_task_state(state)
    expected = task(x2, y2)
    got = restored(x2, y2)
    assert expected['loss_kd'].item() > 0
    torch.testing.assert_close(got['loss_kd'], expected['loss_kd'])
    torch.testing.assert_close(got['loss'], expected['loss'])


def test_dlb_task_state_empty_cases():
    """No state before the first step and for EMA; loading empty state means no KD term on the next step."""
    task = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8)
    assert task.get_task_state() == {}
    (x1, y1), (x2, y2), _ = dlb_batches()
    task(x1, y1)
    assert task.get_task_state(ema=True) == {}
    task.load_task_state(None)
    assert task(x2, y2)['loss_kd'].item() == 0.0


@pytest.mark.parametrize('change', ['world_size', 'new_per_step'])
def test_dlb_state_of_another_layout_is_dropped(change, caplog):
    """Logits saved by another number of processes or another batch size cannot belong to the next batch."""
    model = tiny_model()
    task = timm_selfkd.create_task('dlb', model, batch_size=8)
    (x1, y1), (x2, y2), _ = dlb_batches()
    task(x1, y1)
    state = task.get_task_state()
    if change == 'world_size':
        state['last_logits'] = state['last_logits'].repeat(2, 1, 1)
    else:
        state['new_per_step'] = 8
    restored = timm_selfkd.create_task('dlb', copy.deepcopy(model), batch_size=8)
    restored.load_task_state(state)
    assert restored.last_logits is None and 'do not fit' in caplog.text
    assert restored(x2, y2)['loss_kd'].item() == 0.0


def test_dlb_ignores_kept_logits_that_cannot_head_the_batch():
    """Kept rows for another class count, or as many rows as the batch, are not a teacher."""
    task = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8)
    (x1, y1), (x2, y2), _ = dlb_batches()
    task.last_logits = torch.zeros(4, NUM_CLASSES + 1)
    assert task(x2, y2)['loss_kd'].item() == 0.0
    task.last_logits = torch.zeros(x2.shape[0], NUM_CLASSES)
    assert task(x2, y2)['loss_kd'].item() == 0.0


def test_dlb_resume_without_state_keeps_the_new_part():
    """Resume without task state, N % (B/2) != 0: the kept logits must be those of the first batch's new part."""
    n, batch_size = 22, 8  # last half of an epoch holds 2 indices
    sampler = LastBatchSampler(DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=False), batch_size)
    sampler.set_epoch(1)  # --resume at epoch 1: the batch replays the 2 carried indices, then 4 new
    first, second = list(sampler)[:2]
    assert len(first) == 6
    torch.manual_seed(0)
    data = torch.randn(n, 6)
    task = timm_selfkd.create_task('dlb', tiny_model(), num_epochs=2, steps_per_epoch=len(sampler), num_samples=n,
                                   batch_size=batch_size)  # a new half is batch_size // 2 rows
    assert task.new_per_step == batch_size // 2
    task(data[first], torch.zeros(len(first), dtype=torch.long))
    new_part = first[2:]
    assert second[:len(new_part)] == new_part
    assert task.last_logits.shape[0] == len(new_part)


def test_dlb_under_bf16_autocast_is_finite():
    """bf16 autocast on CPU: float32 finite losses, also after the teacher exists."""
    task = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8)
    (x1, y1), (x2, y2), _ = dlb_batches()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        task(x1, y1)
        out = task(x2 * 40, y2)
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    assert task.last_logits.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------------
# BAKE
# ---------------------------------------------------------------------------------------------------------------------

def test_bake_loss_matches_reference():
    """loss = ce + lambda T^2 KL(Q || sm(z/T)), Q = bake_targets(pooled features, logits) (eq. 2, 9)."""
    weight, temperature, omega = 0.7, 2.0, 0.6
    model = tiny_model()
    task = timm_selfkd.create_task('bake', model, weight=weight, temperature=temperature, omega=omega)
    torch.manual_seed(3)
    x, y = torch.randn(8, 6), torch.randint(0, NUM_CLASSES, (8,))
    out = task(x, y)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    torch.testing.assert_close(out['output'], logits)
    q = bake_targets(features, logits, omega, temperature)
    kd = ref_kd(out['output'], q, temperature)
    ce = ref_ce(out['output'], y)
    assert kd.item() > 0.05
    torch.testing.assert_close(out['loss_kd'], kd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out['loss_ce'], ce, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out['loss'], ce + weight * kd, rtol=1e-4, atol=1e-6)


def test_bake_targets_are_detached_in_task():
    """The KD gradient w.r.t. logits is T (p - Q) / N with Q constant: compare against autograd on the logits."""
    temperature = 4.0
    model = tiny_model()
    task = timm_selfkd.create_task('bake', model, temperature=temperature)
    torch.manual_seed(4)
    x = torch.randn(6, 6)
    out = task(x, torch.zeros(6, dtype=torch.long))
    logits = out['output']
    grad, = torch.autograd.grad(out['loss_kd'], logits)
    with torch.no_grad():
        features = model.forward_features(x)
        q = bake_targets(features, logits, 0.5, temperature)
    expected = temperature * (torch.softmax(logits.detach() / temperature, dim=1) - q) / 6
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


def test_bake_with_timm_resnet18():
    """A real timm model (resnet18, 5 classes, 32x32, eval): output = model(x); get_eval_model() is the bare model."""
    timm = pytest.importorskip('timm')
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=NUM_CLASSES).eval()
    task = timm_selfkd.create_task('bake', model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])
    with torch.no_grad():
        out = task(x, y)
        torch.testing.assert_close(out['output'], model(x))
    assert torch.isfinite(out['loss'])
    assert task.get_eval_model() is model


def test_bake_eval_model_is_bare_model():
    """BAKE wraps the model to return features too, but evaluation/checkpoints use the bare timm model."""
    model = tiny_model()
    task = timm_selfkd.create_task('bake', model)
    assert task.trainable_module is not model
    assert task.get_eval_model() is model


def test_bake_needs_forward_head():
    """A model without forward_features/forward_head(pre_logits=True) is refused with a ValueError."""
    with pytest.raises(ValueError, match='forward_head'):
        timm_selfkd.create_task('bake', nn.Linear(6, NUM_CLASSES))


def test_bake_under_bf16_autocast_is_finite():
    """bf16 autocast on CPU: float32 finite loss."""
    task = timm_selfkd.create_task('bake', tiny_model())
    torch.manual_seed(6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(torch.randn(8, 6) * 50, torch.zeros(8, dtype=torch.long))
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])


def test_method_batch_samplers():
    """DLB uses LastBatchSampler, BAKE ClassGroupBatchSampler with M=same_class; BAKE without labels fails;
    plain training keeps timm's batches (no sampler of its own; `timm_selfkd.batch_sampler` gives plain ones)."""
    dlb = timm_selfkd.create_task('dlb', tiny_model(), batch_size=8)
    bake = timm_selfkd.create_task('bake', tiny_model(), same_class=3)
    plain = timm_selfkd.create_task('none', tiny_model())
    assert dlb.needs.own_batches and bake.needs.own_batches and not plain.needs.own_batches
    common = dict(index_sampler=SequentialSampler(range(16)), labels=[0, 1] * 8, batch_size=8,
                  seed=0, rank=0, world_size=1)
    assert isinstance(dlb.batch_sampler(**common), LastBatchSampler)
    sampler = bake.batch_sampler(**common)
    assert isinstance(sampler, ClassGroupBatchSampler) and sampler.num_same_class == 3
    with pytest.raises(NotImplementedError, match=r"PlainTask keeps timm's batches \(Needs.own_batches is False\)"):
        plain.batch_sampler(**common)
    assert isinstance(timm_selfkd.batch_sampler(plain, [0, 1] * 8, batch_size=8), EpochBatchSampler)
    with pytest.raises(ValueError, match='BAKE needs the class label of every training image'):
        bake.batch_sampler(**{**common, 'labels': None})


def test_dlb_needs_its_batch_size():
    """create_task names the run fact DLB cannot work without (the size of the half the next step repeats)."""
    with pytest.raises(ValueError) as missing:
        timm_selfkd.create_task('dlb', tiny_model())
    assert str(missing.value) == ("create_task('dlb') needs batch_size=... (the rows of each step, half of which the "
                                  'next step repeats)')


# ---------------------------------------------------------------------------------------------------------------------
# Plain and registry
# ---------------------------------------------------------------------------------------------------------------------

def test_plain_task_is_cross_entropy():
    """`none`: loss = ce(z, y) and nothing else."""
    model = tiny_model()
    task = timm_selfkd.create_task('none', model)
    torch.manual_seed(7)
    x, y = torch.randn(5, 6), torch.randint(0, NUM_CLASSES, (5,))
    out = task(x, y)
    torch.testing.assert_close(out['loss'], ref_ce(model(x), y))
    assert task.get_eval_model() is model


def test_list_methods():
    """The built-in methods are registered, `none` first."""
    names = timm_selfkd.list_methods()
    assert {'none', 'dlb', 'bake'} <= set(names)
    assert names[0] == 'none'


def test_unknown_method_suggests_closest():
    """A typo in the method name is a ValueError with a 'did you mean' hint."""
    with pytest.raises(ValueError, match="did you mean 'dlb'"):
        timm_selfkd.create_task('dbl', tiny_model())


@pytest.mark.parametrize('name,hparams', [('dlb', {'temprature': 2.0}), ('bake', {'alpha': 1.0}),
                                          ('none', {'alpha': 1.0})])
def test_unknown_hparam_raises(name, hparams):
    """Hyper-parameters a method does not have are rejected, not silently ignored."""
    with pytest.raises(ValueError, match='hyper-parameter'):
        timm_selfkd.create_task(name, tiny_model(), **hparams)


@pytest.mark.parametrize('name,hparams', [
    ('bake', {'omega': 1.5}), ('bake', {'omega': -0.1}), ('bake', {'temperature': 0.0}),
    ('bake', {'same_class': 0}), ('bake', {'weight': -1.0}),
    ('dlb', {'temperature': 0.0}), ('dlb', {'alpha': -0.5}),
])
def test_out_of_range_hparams_raise(name, hparams):
    """Out-of-range hyper-parameters fail at construction with a ValueError naming the parameter."""
    with pytest.raises(ValueError, match=next(iter(hparams))):
        timm_selfkd.create_task(name, tiny_model(), **hparams)


@pytest.mark.parametrize('name', ['dlb', 'bake', 'none'])
def test_check_setup_mixup(name):
    """Mixup/CutMix is accepted for plain CE, for BAKE (the loader mixes the per-class batch, as the official
    BAKE + CutMix; tests/test_mixup_semantics.py) and for DLB, which replays the mix of its repeated half
    (tests/test_mixing.py)."""
    spec = timm_selfkd.get_method(name)
    hparams = spec.hparams_cls()
    spec.task_cls.check_setup(hparams, batch_size=8)
    MethodWiring(spec, hparams).check(batch_size=8)
    needs = spec.task_cls.requirements(hparams)
    assert needs.mixup == {'dlb': 'task', 'bake': 'loader', 'none': 'loader'}[name]
