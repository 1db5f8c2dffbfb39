"""R-Drop (`rdrop`): the official code's loss lines on fixed tensors and on a fixed tiny model, the symmetric KL by
hand, the passes (per image and per batch), BatchNorm statistics, mixup, bf16, three families and the refusals."""
import copy
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import DropPath

import timm_selfkd
from conftest import NUM_CLASSES
from timm_selfkd.components.stochastic_depth import find_depth_units
from timm_selfkd.methods.rdrop import rdrop_loss, symmetric_kl


# --- the official code (dropreg/R-Drop), re-written here as reference -------------------------------------------

def official_vit_loss(logits, newlogits, labels, alpha, num_classes):
    """vit_src/models/modeling.py, VisionTransformer.forward with labels (the image-classification experiments)."""
    loss_fct = torch.nn.CrossEntropyLoss()
    loss = loss_fct(logits.view(-1, num_classes), labels.view(-1))
    loss2 = loss_fct(newlogits.view(-1, num_classes), labels.view(-1))
    loss += loss2
    p = torch.log_softmax(logits.view(-1, num_classes), dim=-1)
    p_tec = torch.softmax(logits.view(-1, num_classes), dim=-1)
    q = torch.log_softmax(newlogits.view(-1, num_classes), dim=-1)
    q_tec = torch.softmax(newlogits.view(-1, num_classes), dim=-1)
    kl_loss = torch.nn.functional.kl_div(p, q_tec, reduction='none').sum()
    reverse_kl_loss = torch.nn.functional.kl_div(q, p_tec, reduction='none').sum()
    loss += alpha * (kl_loss + reverse_kl_loss)
    return loss


def official_readme_loss(logits, logits2, label, alpha):
    """The repository README's snippet (compute_kl_loss with sum, 0.5 (ce + ce) + alpha kl_loss)."""
    p_loss = F.kl_div(F.log_softmax(logits, dim=-1), F.softmax(logits2, dim=-1), reduction='none')
    q_loss = F.kl_div(F.log_softmax(logits2, dim=-1), F.softmax(logits, dim=-1), reduction='none')
    kl_loss = (p_loss.sum() + q_loss.sum()) / 2
    ce_loss = 0.5 * (F.cross_entropy(logits, label) + F.cross_entropy(logits2, label))
    return ce_loss + alpha * kl_loss


def _fixed_logits(batch=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = (3 * torch.randn(batch, classes, generator=g)).requires_grad_()
    z2 = (3 * torch.randn(batch, classes, generator=g)).requires_grad_()
    return z1, z2, torch.randint(0, classes, (batch,), generator=g)


def _ours(z1, z2, y, alpha, reduction):
    return rdrop_loss(z1, z2, F.cross_entropy(z1, y), F.cross_entropy(z2, y), alpha, reduction)


def test_official_vit_loss_and_gradients_with_sum():
    """kl_reduction='sum' and alpha = 2 x the official --alpha: the official lines' loss and both logits' gradients
    (neither pass detached), to float32 precision. Its default --alpha 0.3 is our default 0.6."""
    z1, z2, y = _fixed_logits()
    official = official_vit_loss(z1, z2, y, 0.3, 5)
    ours = _ours(z1, z2, y, 0.6, 'sum')['loss']
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)
    g_official = torch.autograd.grad(official, (z1, z2))
    g_ours = torch.autograd.grad(ours, (z1, z2))
    for a, b in zip(g_ours, g_official):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_mean_reduction_is_the_official_loss_with_alpha_over_the_batch():
    """Our default (L_KL averaged per image, as the CE terms): the official lines with alpha / (2 B), i.e. the
    official code's sum makes its weight B times larger (deliberate difference, see the module docstring)."""
    z1, z2, y = _fixed_logits(batch=6)
    official = official_vit_loss(z1, z2, y, 0.6 / (2 * 6), 5)
    torch.testing.assert_close(_ours(z1, z2, y, 0.6, 'mean')['loss'], official, rtol=1e-6, atol=1e-6)


def test_readme_snippet_is_half_of_the_sum_form():
    """The README's snippet averages the two CE terms: it is half our loss with kl_reduction='sum' and 2 x alpha."""
    z1, z2, y = _fixed_logits(seed=1)
    torch.testing.assert_close(_ours(z1, z2, y, 2 * 0.7, 'sum')['loss'], 2 * official_readme_loss(z1, z2, y, 0.7),
                               rtol=1e-6, atol=1e-6)


def test_symmetric_kl_by_hand():
    """L_KL = 1/2 (KL(P1||P2) + KL(P2||P1)), summed over classes, averaged over rows, with the math module."""
    rows1 = [[2.0, 0.0, -1.0], [0.5, 1.0, 0.0]]
    rows2 = [[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]]
    softmax = lambda row: [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))
    per_row = [0.5 * (kl(softmax(a), softmax(b)) + kl(softmax(b), softmax(a))) for a, b in zip(rows1, rows2)]
    z1, z2 = torch.tensor(rows1), torch.tensor(rows2)
    assert symmetric_kl(z1, z2).item() == pytest.approx(sum(per_row) / 2, rel=1e-6)
    assert symmetric_kl(z1, z2, 'sum').item() == pytest.approx(sum(per_row), rel=1e-6)
    assert symmetric_kl(z1, z2).item() == pytest.approx(symmetric_kl(z2, z1).item(), rel=1e-6)
    assert symmetric_kl(z1, z1).item() == pytest.approx(0.0, abs=1e-7)
    # by hand: P1 = (0.8438, 0.1142, 0.0420), P2 = (0.5761, 0.2119, 0.2119); KL(P1||P2) = 0.1834,
    # KL(P2||P1) = 0.2542, so L_KL = 0.2188 for the first row
    assert per_row[0] == pytest.approx(0.2188, abs=1e-4)


# --- the task -----------------------------------------------------------------------------------------------------

def _vit(seed=0, **kwargs):
    """timm's test ViT with the official ViT's dropout 0.1 (MLP and embeddings; timm puts it after the attention
    projection too)."""
    torch.manual_seed(seed)
    return timm.create_model('test_vit', num_classes=NUM_CLASSES, img_size=32, pos_drop_rate=0.1,
                             proj_drop_rate=0.1, **kwargs)


def _batch(size=32, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % NUM_CLASSES


def test_tiny_model_matches_the_official_forward_twice():
    """A fixed tiny ViT with dropout: our task's step equals the official code's (model(x) twice, then its loss
    lines) under the same random state, with the official --alpha 0.3 and sum; and its output is the first pass."""
    model = _vit()
    reference = copy.deepcopy(model).train()
    task = timm_selfkd.create_task('rdrop', model, criterion_kwargs=dict(smoothing=0.), kl_reduction='sum')
    task.train()
    x, y = _batch()
    torch.manual_seed(7)
    out = task(x, y)
    torch.manual_seed(7)
    logits = reference(x)
    newlogits = reference(x)
    assert not torch.allclose(logits, newlogits)  # two sub-networks
    torch.testing.assert_close(out['output'], logits, rtol=0, atol=0)
    torch.testing.assert_close(out['loss'], official_vit_loss(logits, newlogits, y, 0.3, NUM_CLASSES),
                               rtol=1e-6, atol=1e-6)
    assert find_depth_units(model) == []  # the model's dropout samples: no stochastic depth is added


def _resnet(**kwargs):
    torch.manual_seed(0)
    return timm.create_model('test_resnet', num_classes=NUM_CLASSES, zero_init_last=False, **kwargs)


def test_default_rate_is_added_only_without_dropout(caplog):
    caplog.set_level(logging.INFO)
    task = timm_selfkd.create_task('rdrop', _resnet())
    units = task.trainable_module.units
    assert len(units) > 2 and units[-1].rate == pytest.approx(0.1)
    assert any('built without stochastic depth' in r.getMessage() and '0 to 0.1' in r.getMessage()
               for r in caplog.records)
    own = timm_selfkd.create_task('rdrop', _resnet(drop_path_rate=0.3), default_rate=0.05)
    assert own.trainable_module.units[-1].rate == pytest.approx(0.3)
    head_dropout = timm_selfkd.create_task('rdrop', _resnet(drop_rate=0.2))
    assert head_dropout.trainable_module.units == []


def test_per_sample_passes_differ_per_image_and_both_learn():
    """Default: two ordinary training-mode passes (timm's per-image DropPath); both CE terms and the KL reach the
    weights."""
    task = timm_selfkd.create_task('rdrop', _resnet(drop_path_rate=0.5), criterion_kwargs=dict(smoothing=0.))
    task.train()
    x, y = _batch(n=8)
    torch.manual_seed(0)
    out = task(x, y)
    assert task.trainable_module.last_keeps == [None, None]
    first, second = task.trainable_module(x)
    differs = (first - second).abs().sum(1) > 1e-6
    assert 0 < int(differs.sum())  # some images got other sub-networks
    torch.testing.assert_close(out['loss_ce'], F.cross_entropy(out['output'], y))
    weight = task.trainable_module.model.fc.weight
    for key in ('loss_ce', 'loss_ce2', 'loss_kl'):
        (grad,) = torch.autograd.grad(out[key], weight, retain_graph=True)
        assert grad.abs().sum() > 0, key


def test_per_batch_passes_draw_their_own_sub_networks():
    """per_sample=False: each pass draws one sub-network for the batch (Self-Guidance's sampling), independently."""
    task = timm_selfkd.create_task('rdrop', _resnet(drop_path_rate=0.5), per_sample=False)
    task.train()
    x, y = _batch()
    torch.manual_seed(3)
    pairs = []
    for _ in range(8):
        out = task(x, y)
        keep1, keep2 = task.trainable_module.last_keeps
        assert len(keep1) == len(keep2) == len(task.trainable_module.units)
        pairs.append((tuple(keep1), tuple(keep2)))
        assert torch.isfinite(out['loss'])
    assert any(a != b for a, b in pairs)


def test_per_batch_ddp_finds_unused_parameters(monkeypatch):
    """Both passes may drop the same block: DDP is told to look for unused parameters (per batch only)."""
    seen = {}

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, device_ids=None, **kwargs):
            super().__init__()
            self.module = module
            seen.update(kwargs)

    monkeypatch.setattr(torch.nn.parallel, 'DistributedDataParallel', FakeDDP)
    timm_selfkd.create_task('rdrop', _resnet(), per_sample=False).prepare_distributed()
    assert seen == {'find_unused_parameters': True}
    seen.clear()
    timm_selfkd.create_task('rdrop', _resnet()).prepare_distributed()
    assert seen == {}


@pytest.mark.parametrize('second_pass_bn_stats', [False, True])
def test_batchnorm_statistics_from_the_first_pass(second_pass_bn_stats):
    """Default: the running statistics get one update per step, the first pass's (as a plain training step)."""
    model = _resnet(drop_path_rate=0.3)
    plain = copy.deepcopy(model).train()
    task = timm_selfkd.create_task('rdrop', model, second_pass_bn_stats=second_pass_bn_stats)
    task.train()
    x, y = _batch()
    torch.manual_seed(5)
    task(x, y)
    torch.manual_seed(5)
    plain(x)
    same = [torch.equal(a, b) for a, b in zip(model.buffers(), plain.buffers())]
    assert all(same) != second_pass_bn_stats
    assert int(model.bn1.num_batches_tracked) == (2 if second_pass_bn_stats else 1)


def test_mixup_soft_targets_reach_both_ce_terms():
    mixup = Mixup(mixup_alpha=1.0, label_smoothing=0., num_classes=NUM_CLASSES)
    task = timm_selfkd.create_task('rdrop', _vit(), criterion_kwargs=dict(soft_targets=True))
    task.train()
    x, y = mixup(*_batch(n=4))
    torch.manual_seed(0)
    out = task(x, y)
    torch.manual_seed(0)
    first, second = task.trainable_module(x)
    soft_ce = lambda z: (-(y * z.log_softmax(-1)).sum(-1)).mean()
    torch.testing.assert_close(out['loss_ce'], soft_ce(first))
    torch.testing.assert_close(out['loss_ce2'], soft_ce(second))
    torch.testing.assert_close(out['loss_kl'], symmetric_kl(first, second))
    assert task.needs.mixup == 'loader' and not task.needs.bce_refusal


@pytest.mark.parametrize('name', ['test_resnet', 'test_efficientnet', 'test_vit'])
def test_three_families_train_and_keep_plain_checkpoints(name):
    """Two SGD steps per family (stochastic depth added where the model has no dropout): finite terms, moving
    weights; the eval model and its state_dict are the plain timm model, no task state."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=NUM_CLASSES, **({'img_size': 32} if 'vit' in name else {}))
    keys = set(model.state_dict())
    task = timm_selfkd.create_task('rdrop', model)
    task.train()
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    for _ in range(2):
        out = task(x, y)
        assert all(torch.isfinite(out[k]) for k in ('loss', 'loss_ce', 'loss_ce2', 'loss_kl'))
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert task.get_eval_model() is model and set(model.state_dict()) == keys
    assert any(isinstance(m, DropPath) for m in model.modules())
    assert task.get_task_state() == {}


def test_bf16_autocast_keeps_float32_terms():
    task = timm_selfkd.create_task('rdrop', _vit())
    task.train()
    x, y = _batch()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(x, y)
    assert out['output'].dtype == torch.bfloat16
    for key in ('loss', 'loss_ce', 'loss_ce2', 'loss_kl'):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]), key
    out['loss'].backward()


def test_refusals_and_bad_hyper_parameters():
    with pytest.raises(ValueError, match='rdrop needs dropout or stochastic depth.*DLA has no DropPath'):
        timm_selfkd.create_task('rdrop', timm.create_model('dla46_c', num_classes=3))
    with pytest.raises(ValueError, match=r'ResNet has neither \(build it with --drop/--drop-path'):
        timm_selfkd.create_task('rdrop', timm.create_model('test_resnet', num_classes=3), default_rate=0.)
    timm_selfkd.create_task('rdrop', timm.create_model('test_resnet', num_classes=3, drop_rate=0.1), default_rate=0.)
    model = timm.create_model('test_vit', num_classes=3)
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match='rdrop cannot run with gradient checkpointing'):
        timm_selfkd.create_task('rdrop', model)
    with pytest.raises(ValueError, match=r"rdrop: the model's a stochastic-depth .* got 1.0"):
        timm_selfkd.create_task('rdrop', timm.create_model('test_resnet', num_classes=3, drop_path_rate=1.0))
    for kwargs, message in ((dict(alpha=-0.1), 'alpha must be >= 0'), (dict(kl_reduction='batchmean'),
                                                                       'kl_reduction must be one of mean, sum'),
                            (dict(default_rate=1.0), r'rdrop default_rate must be in \[0, 1\), got 1.0')):
        with pytest.raises(ValueError, match=message):
            timm_selfkd.create_task('rdrop', timm.create_model('test_resnet', num_classes=3), **kwargs)


def test_recipes_set_the_official_runs_weight_per_image():
    """The recipes' alpha 19.2 (mean) is the official code's --alpha 0.3 summed over its 32-image micro-batches."""
    import os
    from timm_selfkd.cli import method_hparams, parse_args
    z1, z2, y = _fixed_logits(batch=32, classes=10, seed=2)
    torch.testing.assert_close(_ours(z1, z2, y, 19.2, 'mean')['loss'], official_vit_loss(z1, z2, y, 0.3, 10),
                               rtol=1e-5, atol=1e-5)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ('rdrop_cifar100.yaml', 'rdrop_imagenet_vit_b16.yaml'):
        args = parse_args(['-c', os.path.join(repo, 'configs', name)])
        hparams = method_hparams(args)
        assert (hparams.alpha, hparams.kl_reduction, hparams.per_sample) == (19.2, 'mean', True)
        assert args.model_kwargs == {'img_size': 384, 'pos_drop_rate': 0.1, 'proj_drop_rate': 0.1}
