"""Command line and recipes: timm's YAML semantics, generated method flags, --list-selfkd."""
import glob
import os
import re

import pytest
import torch
from timm.optim import create_optimizer_v2

from timm_selfkd import list_methods
from timm_selfkd.cli import format_methods, method_hparams, parse_args
from timm_selfkd.methods.bake import BAKEHparams
from timm_selfkd.registry import get_method, hparam_fields
from timm_selfkd.train import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_recipe_sets_defaults_and_flags_override(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('selfkd: bake\nbake_omega: 0.9\nbatch_size: 32\nepochs: 7\n')
    args = parse_args(['-c', str(recipe), '--epochs', '3', '--bake-same-class', '3'])
    assert (args.selfkd, args.batch_size, args.epochs) == ('bake', 32, 3)
    assert method_hparams(args) == BAKEHparams(omega=0.9, same_class=3)


def test_method_defaults_are_the_papers():
    args = parse_args(['--selfkd', 'dlb'])
    hparams = method_hparams(args)
    assert (hparams.alpha, hparams.temperature) == (1.0, 3.0)
    bake = method_hparams(parse_args(['--selfkd', 'bake', '--no-bake-global-batch']))
    assert (bake.weight, bake.temperature, bake.omega, bake.same_class, bake.global_batch) == (1.0, 4.0, 0.5, 1, False)


@pytest.mark.parametrize('recipe', sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))))
def test_shipped_recipes_parse(recipe):
    args = parse_args(['-c', recipe])
    method_hparams(args)
    if 'cifar' in args.dataset and not args.pretrained:  # the papers' CIFAR augmentation from scratch: pad-4 crop, flip
        # (a fine-tuning recipe, e.g. R-Drop's ImageNet-21k ViT at 384 px, keeps its pre-training's pipeline)
        assert (args.train_crop_mode, args.train_crop_padding, args.hflip) == ('pad', 4, 0.5), recipe


def test_recipes_whose_official_sgd_is_not_nesterov_use_timms_momentum():
    """timm's `--opt sgd` is Nesterov SGD and `momentum` plain (heavy-ball) SGD: every recipe whose comment says
    the official optimizer has no Nesterov must ask for `momentum`."""
    optimizers = {name: create_optimizer_v2(torch.nn.Linear(2, 2), name, lr=0.1, momentum=0.9)
                  for name in ('sgd', 'momentum')}
    assert optimizers['sgd'].defaults['nesterov'] and not optimizers['momentum'].defaults['nesterov']
    plain = []
    for recipe in sorted(glob.glob(os.path.join(REPO, 'configs', '*.yaml'))):
        with open(recipe) as f:
            comment = ' '.join(line for line in f.read().splitlines() if line.startswith('#'))
        if re.search(r'\bno(t)? Nesterov', comment):
            plain.append(os.path.basename(recipe))
            assert parse_args(['-c', recipe]).opt == 'momentum', recipe
    assert 'frskd_cifar100.yaml' in plain and 'zipfls_cifar100.yaml' in plain, plain


def test_every_method_ships_a_recipe():
    methods = {parse_args(['-c', recipe]).selfkd for recipe in glob.glob(os.path.join(REPO, 'configs', '*.yaml'))}
    assert set(list_methods()) <= methods


def test_list_selfkd_shows_every_flag_default_and_paper(capsys):
    main(['--list-selfkd'])
    out = capsys.readouterr().out
    for text in ('dlb:', 'bake:', 'none:', '--dlb-alpha', 'dlb_temperature', 'default 3.0', '--bake-omega',
                 'default 0.5', 'bake_same_class', 'Shen et al.', 'Ge et al.'):
        assert text in out, text
    assert out.strip() == format_methods()


def test_help_lists_generated_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(['--help'])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert '--bake-same-class' in out and '--dlb-temperature' in out and '--selfkd' in out


def test_recipe_baseline_ignores_the_recipes_method_hparams(tmp_path):
    """`-c dlb_recipe.yaml --selfkd none` is the recipe's baseline; on the command line (even with the
    recipe's own value) or inside a recipe of another method, another method's value stays an error."""
    recipe = os.path.join(REPO, 'configs', 'dlb_cifar100.yaml')
    args = parse_args(['-c', recipe, '--selfkd', 'none'])
    assert args.dlb_alpha is None and method_hparams(args).__class__.__name__ == 'PlainHparams'
    with pytest.raises(SystemExit):
        parse_args(['-c', recipe, '--selfkd', 'none', '--dlb-alpha', '1.0'])
    (tmp_path / 'typo.yaml').write_text('selfkd: bake\ndlb_alpha: 0.5\n')
    with pytest.raises(SystemExit):
        parse_args(['-c', str(tmp_path / 'typo.yaml')])


def test_run_args_yaml_is_a_recipe(tmp_path):
    from timm_selfkd.cli import recipe_values
    import yaml
    args = parse_args(['--selfkd', 'bake', '--bake-omega', '0.7', '-b', '32', '--decay-milestones', '5', '9'])
    args.world_size, args.rank, args.local_rank, args.distributed = 1, 0, 0, False  # set by the trainer
    (tmp_path / 'args.yaml').write_text(yaml.safe_dump(recipe_values(args)))
    again = parse_args(['-c', str(tmp_path / 'args.yaml')])
    assert method_hparams(again) == method_hparams(args) and again.batch_size == 32
    assert again.decay_milestones == [5, 9] and again.scale == args.scale


@pytest.mark.parametrize('text, expected', [
    ('selfkd: bake\nbake_same_class: 2.0\n', "recipe key 'bake_same_class' must be int, got 2.0"),
    ('epochs: 1.5\n', "recipe key 'epochs' must be int, got 1.5"),
    ('amp: 1\n', "recipe key 'amp' must be bool, got 1"),
    ('decay_milestones: [10, 20.5]\n', "recipe key 'decay_milestones' must be int"),
    ('selfkd: bake\nbake_global_batch: "no"\n', "recipe key 'bake_global_batch' must be bool"),
    ('selfkd: dlb\ndlb_alpha: "high"\n', "--dlb-alpha: invalid float value: 'high'"),  # argparse's check
    ('train_crop_mode: padd\n', "recipe key 'train_crop_mode' must be one of rrc, rkrc, rkrr, pad, got 'padd'"),
    ('epochs: 0\n', '--epochs must be >= 1, got 0'),
])
def test_recipe_values_of_the_wrong_type(tmp_path, capsys, text, expected):
    (tmp_path / 'r.yaml').write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_args(['-c', str(tmp_path / 'r.yaml')])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_readme_documents_every_method_and_flag():
    """The README's method table names every registered method, and its flag table every method flag (a row
    `--mrkd-tc-*` covers the flags a preset shares with its base method)."""
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    documented = set(re.findall(r'`(--[a-z0-9-]+)', readme))
    wildcards = re.findall(r'`(--[a-z0-9-]+-)\*`', readme)
    missing = [name for name in list_methods() if f'`{name}`' not in readme]
    for name in list_methods():
        for spec_field in hparam_fields(get_method(name)):
            flag = f'--{name}-{spec_field.name}'.replace('_', '-')
            if flag not in documented and not any(flag.startswith(w) for w in wildcards):
                missing.append(flag)
    assert not missing, f'README.md does not document: {missing}'
