"""FRSKD (`frskd`: Ji et al., CVPR 2021): the self-teacher and the loss against the official code's lines
(MingiJi/FRSKD, re-written below as reference), hand-computed attention maps and levels, the three model families,
bf16, the task state (also of the EMA model), bad input, and the recipe's optimizer and lr at every epoch against
the official main.py's.

Differences from winycg/Self-KD-Lib's FRSKD (methods/frskd.py, models/bifpnc.py), where we follow the official
code (each checked on our side below):
- Self-KD-Lib's `DistillKL` does not detach the self-teacher's logits, so its KD term also trains the self-teacher
  towards the model; the official `DistillKL` detaches them, and so do we.
- Self-KD-Lib runs its ResNet-18 self-teachers with `preact=True`: the attention term compares the stage outputs
  with the refined maps before their last ReLU; the official classification code (`args.distill == 'att'`) takes
  them after it, and so do we.
- Self-KD-Lib builds its ImageNet ResNet-18 and CIFAR ResNet-50 self-teachers with width 1 and depth 1
  (`--frskd-width 1 --frskd-depth 1` here); our defaults are the official BiFPNc's 2 and 2.
Our own deliberate differences from the official code: resampling goes to the receiving level's exact size, so
stage maps that do not halve exactly (7 -> 4 -> 7) work where the official x2 upsampling breaks, and levels of one
resolution (ViT) are fused without resampling; `--bce-loss` replaces both classifiers' hard-label terms.
"""
import copy
import math
import os
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_selfkd
from conftest import epoch_lrs, restored_task, train_steps
from timm_selfkd.components.bifpn import BiFPN, resize_down, resize_up
from timm_selfkd.methods.frskd import FRSKDHparams, attention_map, frskd_loss, teacher_levels


# ---- The official code's lines, re-written (MingiJi/FRSKD, classification/models/{utils,bifpnc}.py,
# ---- classification/distill_loss/{AT,KD}.py, classification/utils.py `train`, `mixed_criterion`)

class RefMaxPoolSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x):
        h, w = x.shape[-2:]
        extra_h = (math.ceil(w / 2) - 1) * 2 - w + 3
        extra_v = (math.ceil(h / 2) - 1) * 2 - h + 3
        left, top = extra_h // 2, extra_v // 2
        return self.pool(F.pad(x, [left, extra_h - left, top, extra_v - top]))


class RefDepthConvBlock(nn.Module):
    def __init__(self, cin, cout, kernel_size=1, stride=1, padding=0, depth=1):
        super().__init__()
        if kernel_size == 1:
            conv = [nn.Sequential(nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout), nn.ReLU())]
        else:
            conv = [nn.Sequential(nn.Conv2d(cin, cin, kernel_size, stride, padding, bias=False, groups=cin),
                                  nn.Conv2d(cin, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout))]
            for _ in range(depth - 1):
                conv.append(nn.Sequential(nn.ReLU(), nn.Conv2d(cout, cout, kernel_size, stride, padding, bias=False,
                                                               groups=cout),
                                          nn.Conv2d(cout, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)))
        self.conv = nn.Sequential(*conv)

    def forward(self, x):
        return self.conv(x)


class RefBiFPNLayer(nn.Module):
    def __init__(self, first_time, chs, depth, width):
        super().__init__()
        lat_depth, up_depth, down_depth = depth
        self.first_time = first_time
        self.lat_conv, self.lat_conv2 = nn.ModuleList(), nn.ModuleList()
        self.up_conv, self.up_weight = nn.ModuleList(), nn.ParameterList()
        self.down_conv, self.down_weight = nn.ModuleList(), nn.ParameterList()
        self.down_sample, self.up_sample = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(chs):
            if first_time:
                self.lat_conv.append(RefDepthConvBlock(c, c * width, 1, 1, 0, lat_depth))
            if i != 0:
                self.lat_conv2.append(RefDepthConvBlock(c, c * width, 1, 1, 0, lat_depth))
                self.down_conv.append(RefDepthConvBlock(c * width, c * width, 3, 1, 1, down_depth))
                self.down_weight.append(nn.Parameter(torch.ones(3 if i < len(chs) - 1 else 2)))
                self.down_sample.append(nn.Sequential(RefMaxPoolSame(),
                                                      RefDepthConvBlock(chs[i - 1] * width, c * width, 1, 1, 0, 1)))
            if i != len(chs) - 1:
                self.up_sample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode='nearest'),
                                                    RefDepthConvBlock(chs[i + 1] * width, c * width, 1, 1, 0, 1)))
                self.up_conv.append(RefDepthConvBlock(c * width, c * width, 3, 1, 1, up_depth))
                self.up_weight.append(nn.Parameter(torch.ones(2)))
        self.relu = nn.ReLU()
        self.epsilon = 1e-6

    def forward(self, inputs, preact=False):
        input_trans = [self.lat_conv2[i - 1](F.relu(inputs[i])) for i in range(1, len(inputs))]
        if self.first_time:
            inputs = [self.lat_conv[i](F.relu(inputs[i])) for i in range(len(inputs))]
        up_sample = [inputs[-1]]
        out_layer = []
        for i in range(1, len(inputs)):
            w = self.relu(self.up_weight[-i])
            w = w / (torch.sum(w, dim=0) + self.epsilon)
            up_sample.insert(0, self.up_conv[-i](w[0] * F.relu(inputs[-i - 1])
                                                 + w[1] * self.up_sample[-i](F.relu(up_sample[0]))))
        out_layer.append(up_sample[0])
        for i in range(1, len(inputs)):
            w = self.relu(self.down_weight[i - 1])
            w = w / (torch.sum(w, dim=0) + self.epsilon)
            if i < len(inputs) - 1:
                out_layer.append(self.down_conv[i - 1](w[0] * F.relu(input_trans[i - 1]) + w[1] * F.relu(up_sample[i])
                                                       + w[2] * self.down_sample[i - 1](F.relu(out_layer[-1]))))
            else:
                out_layer.append(self.down_conv[i - 1](w[0] * F.relu(input_trans[i - 1])
                                                       + w[1] * self.down_sample[i - 1](F.relu(out_layer[-1]))))
        if not preact:
            return [F.relu(f) for f in out_layer]
        return out_layer


class RefBiFPNc(nn.Module):
    """Official `BiFPNc(network_channel, num_classes, args)` with repeat 1, depth [d] * 3, num_features all."""

    def __init__(self, chs, num_classes, width=2, depth=2):
        super().__init__()
        self.layers = nn.ModuleList([RefBiFPNLayer(True, chs, [depth] * 3, width)])
        self.fc = nn.Linear(chs[-1] * width, num_classes)

    def forward(self, feats, preact=False):
        for layer in self.layers:
            feats = layer(feats, preact)
        out = F.adaptive_avg_pool2d(F.relu(feats[-1]), (1, 1))
        return feats, self.fc(out.view(out.size(0), -1))


def ref_distill_kl(y_s, y_t, T):
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t.detach(), reduction='sum') * (T ** 2) / y_s.shape[0]


def ref_at(f):
    return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))


def ref_attention(o_s, o_t, g_s, g_t, alpha, beta, T):
    """Official `Attention.forward` (criterion_kd with --distill att)."""
    loss = alpha * ref_distill_kl(o_s, o_t, T)
    loss += beta * sum([(ref_at(f_s) - ref_at(f_t.detach())).pow(2).mean() for f_s, f_t in zip(g_s, g_t)])
    return loss


def ref_mixed_criterion(pred, y_a, y_b, lam):
    return lam * F.cross_entropy(pred, y_a) + (1 - lam) * F.cross_entropy(pred, y_b)


def ref_train_loss(feats, outputs, bi_feats, bi_outputs, targets, alpha, beta, T, mix=None):
    """The loss lines of the official `train` (no SLA; plain, or mixup/CutMix with (y_a, y_b, lam))."""
    criterion = F.cross_entropy if mix is None else (lambda pred, y: ref_mixed_criterion(pred, *mix))
    loss_model = criterion(outputs, targets)
    loss_bifpn = criterion(bi_outputs, targets)
    loss_model = loss_model + ref_attention(outputs, bi_outputs, feats, bi_feats, alpha, beta, T)
    return loss_model + loss_bifpn


# ---- Name map from the official BiFPNc's parameters to ours

_NAME_MAP = [
    (r'^layers\.0\.lat_conv\.(\d+)\.conv\.0\.', r'layer.lateral.\1.'),
    (r'^layers\.0\.lat_conv2\.(\d+)\.conv\.0\.', r'layer.lateral_bottom_up.\1.'),
    (r'^layers\.0\.up_conv\.(\d+)\.conv\.', r'layer.up_conv.\1.'),
    (r'^layers\.0\.down_conv\.(\d+)\.conv\.', r'layer.down_conv.\1.'),
    (r'^layers\.0\.up_sample\.(\d+)\.1\.conv\.0\.', r'layer.up_proj.\1.'),
    (r'^layers\.0\.down_sample\.(\d+)\.1\.conv\.0\.', r'layer.down_proj.\1.'),
    (r'^layers\.0\.(up|down)_weight\.', r'layer.\1_weight.'),
    (r'^fc\.', 'fc.'),
]


def _our_name(name):
    for pattern, repl in _NAME_MAP:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    raise AssertionError(f'unmapped official parameter {name}')


def load_official_into_ours(ref, ours):
    state = {_our_name(k): v for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)


def randomised_reference(chs, num_classes, width=2, depth=2, seed=0):
    """The official self-teacher with random fusion weights (some negative: the ReLU of the fusion matters) and
    random BatchNorm affine parameters, so that every piece of the comparison is exercised."""
    torch.manual_seed(seed)
    ref = RefBiFPNc(chs, num_classes, width, depth)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if '_weight.' in name:  # the fusion weights
                p.copy_(torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return ref


# ---- Official comparisons

@pytest.mark.parametrize('sizes', [(8, 4, 2, 1), (16, 8, 4, 2)])
def test_self_teacher_matches_official_bifpnc(sizes):
    """Our BiFPN with the official BiFPNc's weights gives its refined maps and logits (train mode, BN batch stats)."""
    chs = [8, 12, 16, 24]
    ref = randomised_reference(chs, 5)
    ours = BiFPN(chs, 5, width=2, depth=2)
    load_official_into_ours(ref, ours)
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, c, s, s, generator=gen).relu() for c, s in zip(chs, sizes)]
    ref_maps, ref_logits = ref(feats)
    maps, logits = ours(feats)
    for a, b in zip(maps, ref_maps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert [m.shape[1] for m in maps] == [2 * c for c in chs]


@pytest.mark.parametrize('mixed', [False, True])
def test_task_loss_and_gradients_match_the_official_training_lines(mixed):
    """On a fixed tiny ResNet, the task's loss equals the official `train` lines (model CE + self-teacher CE +
    alpha KD + beta attention; with mixup: `mixed_criterion` for both) on the same stage outputs and self-teacher
    weights, and so do the gradients of the backbone and the self-teacher."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('frskd', model, alpha=1.5, beta=50.0, temperature=3.0).train()
    module = task.trainable_module
    indices = module.indices
    chs = [model.feature_info[i]['num_chs'] for i in indices]
    ref = randomised_reference(chs, 4, seed=2)
    load_official_into_ours(ref, module.self_teacher)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 32, 32, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    if mixed:
        lam, perm = 0.7, torch.tensor([3, 0, 5, 1, 2, 4])
        x = lam * x + (1 - lam) * x[perm]
        target = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y[perm], 4).float()
        mix = (y, y[perm], lam)
    else:
        target, mix = y, None

    out = task(x, target)
    params = [p for p in model.parameters()] + [p for p in module.self_teacher.parameters()]
    grads = torch.autograd.grad(out['loss'], params, allow_unused=True)

    # the official model returns (stage outputs after ReLU, logits); timm's ResNet stages end in a ReLU already
    final, feats = model.forward_intermediates(x, indices=indices)
    outputs = model.forward_head(final)
    bi_feats, bi_outputs = ref(feats)
    ref_loss = ref_train_loss(feats, outputs, bi_feats, bi_outputs, y, 1.5, 50.0, 3.0, mix)
    ref_params = [p for p in model.parameters()] + [dict(ref.named_parameters())[k] for k in
                                                    _ordered_ref_names(ref, module.self_teacher)]
    ref_grads = torch.autograd.grad(ref_loss, ref_params, allow_unused=True)

    torch.testing.assert_close(out['loss'], ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    # the logged terms add up with the weights
    total = (out['loss_ce'] + out['loss_teacher_ce'] + 1.5 * out['loss_kd'] + 50.0 * out['loss_at'])
    torch.testing.assert_close(out['loss'], total)


def _ordered_ref_names(ref, ours):
    """The official parameter names in the order of our self-teacher's parameters."""
    by_ours = {_our_name(k): k for k, _ in ref.named_parameters()}
    return [by_ours[k] for k, _ in ours.named_parameters()]


def test_our_side_of_the_self_kd_lib_differences():
    """The KD and attention terms send no gradient to the self-teacher (official `.detach()`s; Self-KD-Lib's KD
    does), and the refined maps the attention term reads are after the ReLU (official; Self-KD-Lib: before)."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('frskd', model).train()
    teacher = task.trainable_module.self_teacher
    logits, feats, refined, teacher_logits = task.trainable_module(torch.randn(4, 3, 32, 32))
    assert all(m.min() >= 0 for m in refined)
    out = frskd_loss(logits, feats, refined, teacher_logits, torch.tensor([0, 1, 2, 3]), F.cross_entropy,
                     FRSKDHparams())
    for term in ('loss_kd', 'loss_at'):
        grads = torch.autograd.grad(out[term], list(teacher.parameters()), allow_unused=True, retain_graph=True)
        assert all(g is None for g in grads), term
        assert torch.autograd.grad(out[term], logits if term == 'loss_kd' else feats[0], retain_graph=True)[0].any()
    # the self-teacher's CE reaches the backbone through the stage outputs it reads (the official code does not
    # detach them)
    assert torch.autograd.grad(out['loss_teacher_ce'], next(model.parameters()))[0].any()  # the stem's conv


# ---- Hand-computed pieces

def test_attention_map_and_loss_by_hand():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # (1, 2, 2, 2)
    sq_mean = [(1 + 9) / 2, (4 + 0) / 2, (0 + 1) / 2, (9 + 1) / 2]
    norm = math.sqrt(sum(v * v for v in sq_mean))
    torch.testing.assert_close(attention_map(f), torch.tensor([[v / norm for v in sq_mean]]))
    t = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])  # one channel
    t_map = [0.0, 1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]
    expected = sum((a / norm - b) ** 2 for a, b in zip(sq_mean, t_map)) / 4
    logits, target = torch.zeros(1, 3), torch.tensor([0])
    out = frskd_loss(logits, [f], [t], logits, target, F.cross_entropy, FRSKDHparams(alpha=0., beta=2.0))
    assert out['loss_at'].item() == pytest.approx(expected, rel=1e-6)
    assert out['loss'].item() == pytest.approx(2 * math.log(3) + 2 * expected, rel=1e-6)


def test_default_levels_per_family():
    assert teacher_levels(timm.create_model('test_resnet')) == [1, 2, 3, 4]  # layer1-layer4, not the stem
    assert teacher_levels(timm.create_model('test_efficientnet')) == [1, 2, 3, 4]
    assert teacher_levels(timm.create_model('test_vit')) == [1, 2, 3, 5]  # 6 blocks: 1/4, 1/2, 3/4, all
    assert teacher_levels(timm.create_model('test_vit'), '0,5') == [0, 5]


def test_resampling_to_the_receiving_size():
    """x2 exactly as the official code where sizes halve; any other ratio (7 -> 4 -> 7) and one resolution work."""
    x = torch.arange(16.).view(1, 1, 4, 4)
    torch.testing.assert_close(resize_up(x, (8, 8)), nn.Upsample(scale_factor=2, mode='nearest')(x))
    torch.testing.assert_close(resize_down(x, (2, 2)), RefMaxPoolSame()(x))
    odd = torch.rand(1, 1, 7, 7)
    torch.testing.assert_close(resize_down(odd, (4, 4)), RefMaxPoolSame()(odd))
    assert resize_up(torch.rand(1, 1, 4, 4), (7, 7)).shape[-2:] == (7, 7)
    assert resize_down(torch.rand(1, 1, 7, 7), (3, 3)).shape[-2:] == (3, 3)
    assert resize_up(x, (4, 4)) is x and resize_down(x, (4, 4)) is x
    teacher = BiFPN([4, 6, 8], 3, width=1, depth=1)
    maps, logits = teacher([torch.rand(2, 4, 7, 7), torch.rand(2, 6, 4, 4), torch.rand(2, 8, 2, 2)])
    assert [m.shape[-1] for m in maps] == [7, 4, 2] and logits.shape == (2, 3)
    maps, _ = teacher([torch.rand(2, c, 3, 3) for c in (4, 6, 8)])  # a same-resolution BiFPN (ViT)
    assert [m.shape[-1] for m in maps] == [3, 3, 3]


# ---- The families, bf16, task state

@pytest.mark.parametrize('name', ['test_resnet', 'test_efficientnet', 'test_vit'])
def test_trains_on_three_families(name):
    """One pass gives the model's own logits; training moves the self-teacher; the deployed state_dict is the
    plain model's."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=4)
    reference = copy.deepcopy(model)
    task = timm_selfkd.create_task('frskd', model).train()
    reference.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits, _, refined, teacher_logits = task.trainable_module(x)
    torch.testing.assert_close(logits, reference(x))
    assert teacher_logits.shape == logits.shape and len(refined) == 4
    before = copy.deepcopy(task.trainable_module.self_teacher.state_dict())
    out = train_steps(task, x, y)
    assert all(torch.isfinite(v) for k, v in out.items() if k.startswith('loss'))
    after = task.trainable_module.self_teacher.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    assert set(task.get_checkpoint_state()['state_dict']) == set(reference.state_dict())


def test_bf16_autocast_terms_are_float32_and_finite():
    torch.manual_seed(0)
    task = timm_selfkd.create_task('frskd', timm.create_model('test_resnet', num_classes=4)).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = task(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    for name, value in out.items():
        if name.startswith('loss'):
            assert value.dtype == torch.float32 and torch.isfinite(value), name
    out['loss'].backward()


def test_task_state_round_trip_and_ema(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=4)
    task = timm_selfkd.create_task('frskd', model)
    task.setup_ema(decay=0.5)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    train_steps(task.train(), x, y, steps=1)
    task.update_ema(step=10)
    state = task.get_checkpoint_state()
    ema_state = task.get_checkpoint_state(ema=True)
    assert not any('self_teacher' in key for key in state['state_dict'])
    assert not torch.equal(state['task_state']['self_teacher']['fc.weight'],
                           ema_state['task_state_ema']['self_teacher']['fc.weight'])
    torch.save({'state_dict': state['state_dict']}, tmp_path / 'model.pth')
    plain = timm.create_model('test_resnet', num_classes=4, checkpoint_path=str(tmp_path / 'model.pth'))
    torch.testing.assert_close(plain.fc.weight, model.fc.weight)

    fresh = restored_task('frskd', state, ema_state)
    task.eval(), fresh.eval()
    for ema in (False, True):  # the live and the EMA model with their self-teachers give the same outputs
        got, want = fresh.get_trainable_module(ema=ema), task.get_trainable_module(ema=ema)
        got, want = getattr(got, 'module', got), getattr(want, 'module', want)  # ModelEmaV3 holds `.module`
        for u, v in zip(got(x), want(x)):
            for p, q in zip(u if isinstance(u, list) else [u], v if isinstance(v, list) else [v]):
                torch.testing.assert_close(p, q)

    other = timm_selfkd.create_task('frskd', timm.create_model('test_resnet', num_classes=4), width=1)
    with pytest.raises(ValueError, match=r"frskd: the checkpoint's training-only part 'self_teacher' was built for "
                                         r".*'width': 2.*this run's for .*'width': 1.* "
                                         r"\(set --frskd-indices/--frskd-width/--frskd-depth to match\)"):
        other.load_checkpoint_state(state['state_dict'], copy.deepcopy(state['task_state']))


@pytest.mark.parametrize('hparams, message', [
    (dict(alpha=-1.0), 'frskd alpha must be >= 0'),
    (dict(width=0), 'frskd width must be >= 1'),
    (dict(indices='3'), 'at least two levels'),
    (dict(indices='a,b'), 'comma-separated integers'),
    (dict(indices='1,9'), r'level 9 does not exist for test_resnet: valid levels are 0-4'),
])
def test_bad_input(hparams, message):
    with pytest.raises(ValueError, match=message):
        timm_selfkd.create_task('frskd', timm.create_model('test_resnet', num_classes=4), **hparams)


def test_model_without_stage_outputs_is_refused():
    with pytest.raises(ValueError, match='has no forward_intermediates'):
        timm_selfkd.create_task('frskd', nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))


@pytest.mark.filterwarnings('ignore:Detected call of:UserWarning')  # no training here, only the lr
def test_recipe_optimizer_and_lr_at_every_epoch_are_the_official_ones():
    """classification/main.py: optim.SGD(lr 0.1, momentum 0.9), no Nesterov (timm's `momentum`, not its `sgd`);
    utils.lr_scheduler's MultiStepLR([100, 150], gamma 0.1) stepped after each of the epochs 1..200, so the lr drops
    from 0-based epochs 100 and 150 on."""
    from timm_selfkd.cli import parse_args
    recipe = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'frskd_cifar100.yaml')
    args = parse_args(['-c', recipe])
    assert (args.opt, args.momentum, args.lr) == ('momentum', 0.9, 0.1)
    # the official lines, re-written
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9, weight_decay=1e-4)
    optimizer.zero_grad()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [100, 150], gamma=0.1)
    official = []
    for epoch in range(1, 200 + 1):
        official.append(optimizer.param_groups[0]['lr'])  # train(...)
        scheduler.step()
    assert epoch_lrs(['-c', recipe]) == pytest.approx(official, rel=1e-9)
    assert [e for e in range(1, 200) if official[e] < official[e - 1]] == [100, 150]
