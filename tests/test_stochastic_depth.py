"""`timm_selfkd.components.stochastic_depth`: finding and adding timm's DropPath blocks and switching them per pass."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import DropPath

from conftest import SMALL_FAMILIES, small_model
from timm_selfkd.components.stochastic_depth import (add_stochastic_depth, check_rates, find_depth_units, frozen_norm_stats,
                                          full_network, grad_checkpointing_modules, sampled_subnetwork)


def _drop_paths(model):
    return [m for m in model.modules() if isinstance(m, DropPath)]


@pytest.mark.parametrize('name, kwargs', [('resnet18', {}), ('vit_tiny_patch16_224', {'img_size': 32, 'depth': 6}),
                                          ('efficientnet_b0', {}), ('convnext_atto', {})])
def test_added_schedule_is_timms_own(name, kwargs):
    """Inserting DropPath into a model built without gives the blocks and rates timm builds with the rate."""
    plain = timm.create_model(name, num_classes=3, **kwargs)
    assert find_depth_units(plain) == []
    keys = set(plain.state_dict())
    added = add_stochastic_depth(plain, 0.3)
    built = find_depth_units(timm.create_model(name, num_classes=3, drop_path_rate=0.3, **kwargs))
    assert [u.name for u in added] == [u.name for u in built] and len(added) > 3
    assert [len(u.drop_paths) for u in added] == [len(u.drop_paths) for u in built]
    # timm's EfficientNet schedule ends one block short of the rate (l / L instead of l / (L - 1))
    tolerance = 0.3 / len(built) + 1e-6 if name.startswith('efficientnet') else 1e-6
    for a, b in zip(added, built):
        assert a.rate == pytest.approx(b.rate, abs=tolerance)
    assert added[-1].rate == pytest.approx(0.3)
    assert set(plain.state_dict()) == keys  # DropPath has no state: checkpoints stay plain timm checkpoints


def test_models_without_places_for_stochastic_depth():
    assert add_stochastic_depth(timm.create_model('dla46_c', num_classes=3), 0.5) == []
    assert add_stochastic_depth(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), 0.5) == []


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5])
def test_rates_outside_zero_one_are_refused(rate):
    with pytest.raises(ValueError, match=r'must be in \[0, 1\)'):
        check_rates(rate)
    with pytest.raises(ValueError, match=r'must be in \[0, 1\)'):
        add_stochastic_depth(timm.create_model('resnet18', num_classes=3), rate)


def test_full_network_is_deterministic_and_drop_path_free():
    """Training mode, rate 0.5: the teacher pass equals the model without DropPath and draws no random numbers."""
    model, size = small_model('resnet', drop_path_rate=0.5)
    reference = copy.deepcopy(model)
    for block in reference.modules():
        if getattr(block, 'drop_path', None) is not None:
            block.drop_path = None
    model.train(), reference.train()
    units = find_depth_units(model)
    x = torch.randn(4, 3, size, size)
    state = torch.get_rng_state()
    with full_network(units):
        first = model(x)
        second = model(x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, reference(x))
    assert not torch.allclose(model(x), first)  # outside the context timm's DropPath drops again
    assert all('forward' not in vars(dp) for dp in _drop_paths(model))  # restored


def _record_drop_path_io(model):
    """(input, output) of every DropPath call, per module."""
    calls = {}
    for dp in _drop_paths(model):
        dp.register_forward_hook(lambda module, args, out: calls.setdefault(module, []).append((args[0], out)))
    return calls


def test_per_batch_drops_whole_blocks():
    """Every image of the batch loses the same blocks; kept branches are scaled by 1 / (1 - rate)."""
    model, size = small_model('vit', drop_path_rate=0.5)
    model.train()
    units = find_depth_units(model)
    calls = _record_drop_path_io(model)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, size, size)
    seen = set()
    for _ in range(6):
        calls.clear()
        with sampled_subnetwork(units, skip=False, generator=generator) as keep:
            model(x)
        for unit, kept in zip(units, keep):
            for dp in unit.drop_paths:
                ((inp, out),) = calls[dp]
                expected = inp / (1 - unit.rate) if kept else torch.zeros_like(inp)
                torch.testing.assert_close(out, expected)
            seen.add(kept)
    assert seen == {True, False}


def test_per_batch_keep_frequency_follows_the_rates():
    model, _ = small_model('vit', drop_path_rate=0.5)
    units = find_depth_units(model)
    generator = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(4000):
        with sampled_subnetwork(units, generator=generator) as keep:
            draws.append(keep)
    frequency = torch.tensor(draws, dtype=torch.float64).mean(0)
    expected = 1 - torch.tensor([u.rate for u in units], dtype=torch.float64)
    torch.testing.assert_close(frequency, expected, atol=0.03, rtol=0)


def test_per_sample_drops_rows():
    """timm's own DropPath: within one batch some images lose a branch and others keep it (scaled)."""
    model, size = small_model('vit', drop_path_rate=0.5)
    model.train()
    units = find_depth_units(model)
    calls = _record_drop_path_io(model)
    torch.manual_seed(0)
    with sampled_subnetwork(units, per_sample=True) as keep:
        model(torch.randn(16, 3, size, size))
    assert keep is None
    unit = units[-1]
    inp, out = calls[unit.drop_paths[0]][0]
    dropped = out.flatten(1).abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 16
    torch.testing.assert_close(out[~dropped], inp[~dropped] / (1 - unit.rate))


@pytest.mark.parametrize('family', sorted(SMALL_FAMILIES))
def test_skipping_dropped_blocks_is_exact(family):
    """Not computing a dropped block gives the output of computing it with a zeroed branch; skipped blocks
    do not run."""
    model, size = small_model(family, drop_path_rate=0.6)
    model.train()
    units = find_depth_units(model)
    assert any(u.skip is not None for u in units)
    ran = []  # the blocks whose branch layers ran (ResNet's shortcut and activation run when skipped)
    for unit in units:
        for name, layer in unit.block.named_modules():
            if name and not name.startswith(('downsample', 'act')) and not list(layer.children()):
                layer.register_forward_hook(lambda module, args, out, block=unit.block: ran.append(block))
    x = torch.randn(4, 3, size, size)
    skipped_any = False
    for seed in range(4):
        ran.clear()
        draw = lambda: torch.Generator().manual_seed(seed)
        with frozen_norm_stats(model), sampled_subnetwork(units, generator=draw()) as keep:
            skipped = model(x)
        skipped_blocks = {u.block for u, k in zip(units, keep) if not k and u.skip is not None}
        assert not skipped_blocks & set(ran)
        skipped_any |= bool(skipped_blocks)
        with frozen_norm_stats(model), sampled_subnetwork(units, skip=False, generator=draw()):
            computed = model(x)
        torch.testing.assert_close(skipped, computed, rtol=1e-4, atol=1e-5)
        if not all(keep):
            with full_network(units):
                assert not torch.allclose(model(x), computed, rtol=1e-3, atol=1e-4)
    assert skipped_any


def test_frozen_norm_stats_keep_running_statistics():
    model, size = small_model('resnet')
    model.train()
    bn = model.bn1
    before = bn.running_mean.clone(), int(bn.num_batches_tracked)
    with frozen_norm_stats(model):
        model(torch.randn(4, 3, size, size))
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert bn.track_running_stats
    model(torch.randn(4, 3, size, size))
    assert not torch.equal(bn.running_mean, before[0])


def test_grad_checkpointing_is_found():
    model, _ = small_model('vit')
    assert grad_checkpointing_modules(model) == []
    model.set_grad_checkpointing(True)
    assert grad_checkpointing_modules(model) == ['VisionTransformer']
