"""timm's train.py flags in our train.py: every upstream flag is supported or refused in one line, and the
loop-level ones (gradient accumulation, channels-last, repeated augmentation, BCE, validation interval) work."""
import csv
import importlib.util
import os
import re

import pytest
import timm
import torch
from torch.utils.data import IterableDataset

import timm_selfkd
from timm_selfkd.options import REFUSED_OPTIONS
from timm_selfkd.wiring import MethodWiring
from timm_selfkd.cli import _build_parser, parse_args
from timm_selfkd.errors import UsageError
from timm_selfkd.runtime.data import index_sampler
from timm_selfkd.train import main

UPSTREAM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared', 'upstream-timm')
DRIVABLE = ['train_v1.0.28.py', 'train_main_aa4b5850.py']


def upstream_flags(script):
    """Every option string of an upstream train.py's parser (the module is loaded, its main() not run)."""
    path = os.path.join(UPSTREAM, script)
    if not os.path.isfile(path):
        pytest.skip(f'{path} not found: the upstream timm scripts live in ../shared/upstream-timm')
    spec = importlib.util.spec_from_file_location('upstream_' + re.sub(r'\W', '_', script), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {flag for action in module.parser._actions for flag in action.option_strings}


@pytest.mark.parametrize('script', DRIVABLE)
def test_every_upstream_flag_is_supported_or_refused(script):
    ours = {flag for action in _build_parser()._actions for flag in action.option_strings}
    missing = sorted(upstream_flags(script) - ours - {'--local_rank', '--local-rank'})
    assert not missing, f'upstream flags neither supported nor refused: {missing}'


@pytest.mark.parametrize('option', REFUSED_OPTIONS, ids=lambda option: option.flag)
def test_refused_flags_are_one_line_errors(option, capsys):
    flag, nargs = option.flag, option.nargs
    value = [] if nargs == 0 else ['1']
    with pytest.raises(SystemExit) as exc:
        parse_args([flag, *value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} is not supported by timm_selfkd's train.py: " in err[0]


def test_refused_key_in_a_recipe(tmp_path, capsys):
    (tmp_path / 'r.yaml').write_text('aug_splits: 2\n')
    with pytest.raises(SystemExit):
        parse_args(['-c', str(tmp_path / 'r.yaml')])
    assert "sets 'aug_splits', which timm_selfkd's train.py does not support" in capsys.readouterr().err


def common(data, output, *extra):
    return ['--data-dir', data, '--output', str(output), '--experiment', 'run', '--epochs', '1',
            '--warmup-epochs', '0', '--device', 'cpu', '-j', '0', '--lr', '0.05', '--img-size', '32', *extra]


def summary(output):
    with open(os.path.join(output, 'run', 'summary.csv')) as f:
        return list(csv.DictReader(f))


def weights(output):
    return torch.load(os.path.join(output, 'run', 'last.pth.tar'), map_location='cpu', weights_only=False)['state_dict']


def test_gradient_accumulation_equals_the_large_batch(image_folder, tmp_path):
    """Two accumulated batches of 4 make the same update as one batch of 8 (a LayerNorm model, no augmentation
    or dropout, so only the summation order differs)."""
    vit = ['--model', 'test_vit', '--model-kwargs', 'img_size=32', '--no-aug', '--smoothing', '0', '--opt', 'sgd',
           '--weight-decay', '0', '--sched', 'none']
    main(common(image_folder, tmp_path / 'large', *vit, '-b', '8'))
    main(common(image_folder, tmp_path / 'accum', *vit, '-b', '4', '--grad-accum-steps', '2'))
    large, accum = weights(tmp_path / 'large'), weights(tmp_path / 'accum')
    assert all(torch.allclose(large[k], accum[k], atol=1e-6) for k in large)
    assert not torch.equal(large['head.weight'], timm.create_model('test_vit', num_classes=4,
                                                                   img_size=32).state_dict()['head.weight'])
    assert summary(tmp_path / 'accum')[0]['train_steps'] == '8'  # batches; 4 optimizer updates


def test_channels_last_bce_and_repeated_augmentation(image_folder, tmp_path):
    main(common(image_folder, tmp_path, '--channels-last', '--bce-loss', '--aug-repeats', '3', '-b', '8'))
    (row,) = summary(tmp_path)
    assert row['status'] == 'ok' and float(row['train_images']) == 32 and float(row['train_loss']) > 0


def test_repeated_augmentation_draws_each_image_three_times():
    sampler = index_sampler(list(range(30)), seed=0, rank=0, world_size=1, aug_repeats=3)
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == 30 and all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 30, 3))


def test_validation_interval(image_folder, tmp_path):
    main(common(image_folder, tmp_path, '--epochs', '3', '--val-interval', '2', '-b', '8'))
    rows = summary(tmp_path)
    assert [bool(r['eval_top1']) for r in rows] == [False, True, True]  # epoch 2 is the last: always validated


class Streamed(IterableDataset):
    def __iter__(self):
        yield from ()


@pytest.mark.parametrize('method', timm_selfkd.list_methods())
def test_streamed_data_sets_only_for_methods_that_need_no_sampler_or_indices(method):
    task = timm_selfkd.create_task(method, timm.create_model('test_resnet', num_classes=10),  # TC's gamma > 1/K
                                   num_epochs=1, steps_per_epoch=4, num_samples=32, batch_size=8)
    wiring = MethodWiring(method, task.method_hparams)
    loader = [object()]  # timm's loader of the streamed set: one batch
    if task.needs.streamed_data:
        wiring.check(batch_size=8, dataset=Streamed())
        attached = wiring.attach(task, loader=loader, dataset=Streamed(), batch_size=8, num_epochs=1, seed=0)
        assert attached.loader is loader and attached.stream is None and attached.steps_per_epoch == 1
        assert task.run.num_samples is None and task.run.batch_info is None
    else:
        with pytest.raises(UsageError, match=f'^{method} chooses its batches or reads sample indices'):
            wiring.check(batch_size=8, dataset=Streamed())
    if method in ('none', 'dlb', 'bake'):
        assert task.needs.streamed_data == (method == 'none')


def test_opt_kwargs_reach_the_optimizer(image_folder, tmp_path):
    """As in timm's train.py, `--opt-kwargs` go to `create_optimizer_v2` (they were dropped before)."""
    from timm_selfkd.train import Setup
    setup = Setup(parse_args(common(image_folder, tmp_path, '-b', '8', '--opt', 'adamw',
                                    '--opt-kwargs', 'amsgrad=True')))
    assert isinstance(setup.optimizer, torch.optim.AdamW) and setup.optimizer.param_groups[0]['amsgrad'] is True
    plain = Setup(parse_args(common(image_folder, tmp_path, '-b', '8', '--opt', 'adamw')))
    assert plain.optimizer.param_groups[0]['amsgrad'] is False
