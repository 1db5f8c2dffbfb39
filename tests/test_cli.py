"""Command line and recipes: timm's YAML semantics, generated method flags, --list-selfkd."""
import glob
import os
import re

import pytest
import torch
from timm.optim import create_optimizer_v2

from timm_selfkd import list_methods
from timm_selfkd.options import REFUSED_OPTIONS
from timm_selfkd.cli import _build_parser, format_methods, method_hparams, parse_args
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
    ('selfkd: mrkd\nmrkd_copy_mode: frozen\n', "recipe key 'mrkd_copy_mode' must be one of eval, train, got 'frozen'"),
    ('selfkd: dlb\ndlb_alpha: -1.0\n', 'dlb alpha must be >= 0, got -1.0'),
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


def test_every_boolean_a_recipe_switches_on_the_command_line_switches_off(tmp_path):
    """timm's name sets each boolean (`--amp`, `--no-aug`); the opposite form (`--no-amp`, `--aug`) clears what a
    recipe set."""
    refused = {option.dest for option in REFUSED_OPTIONS}
    flags = {a.dest: a.option_strings for a in _build_parser()._actions
             if a.nargs == 0 and a.dest not in ('help', 'list_selfkd', *refused)
             and not a.dest.startswith(tuple(f'{name}_' for name in list_methods()))}  # a method's: test_flags
    for dest, names in (('amp', ['--amp', '--no-amp']), ('pin_mem', ['--pin-mem', '--no-pin-mem']),
                        ('model_ema', ['--model-ema', '--no-model-ema']), ('no_aug', ['--no-aug', '--aug']),
                        ('channels_last', ['--channels-last', '--no-channels-last']),
                        ('no_prefetcher', ['--no-prefetcher', '--prefetcher'])):
        assert flags[dest] == names, (dest, flags[dest])
    assert len(flags) == 21
    defaults = parse_args([])
    assert not any(getattr(defaults, dest) for dest in flags)
    (tmp_path / 'r.yaml').write_text(''.join(f'{dest}: true\n' for dest in flags))
    assert all(getattr(parse_args(['-c', str(tmp_path / 'r.yaml')]), dest) for dest in flags)
    off = parse_args(['-c', str(tmp_path / 'r.yaml'), *(names[-1] for names in flags.values())])
    assert not any(getattr(off, dest) for dest in flags)
    assert all(getattr(parse_args([names[0] for names in flags.values()]), dest) for dest in flags)


def test_help_shows_each_method_flags_value_default_and_range(capsys, monkeypatch):
    monkeypatch.setenv('COLUMNS', '400')  # no wrapped help texts
    with pytest.raises(SystemExit):
        parse_args(['--help'])
    lines = {}  # flag -> its entry, the help text that argparse puts on the next line for a long flag joined
    for line in capsys.readouterr().out.splitlines():
        if line.startswith('  -'):
            flag = line.split()[0].rstrip(',')
            lines[flag] = line.rstrip()
        elif line.startswith('   ') and lines:
            lines[flag] += ' ' + line.strip()
    assert re.search(r'--dlb-alpha FLOAT +dlb: .*\(default: 1\.0; >= 0\)$', lines['--dlb-alpha'])
    assert re.search(r'--bake-same-class INT +bake: .*\(default: 1; >= 1\)$', lines['--bake-same-class'])
    assert re.search(r'--pskd-alpha-t FLOAT +.*\(default: 0\.8; in \[0, 1\]\)$', lines['--pskd-alpha-t'])
    assert re.search(r'--lsrkd-tc-gamma FLOAT +.*\(default: 2\.5/K; in \(0, 1\)\)$', lines['--lsrkd-tc-gamma'])
    assert re.search(r"--dks-indices STR +.*\(default: ''\)$", lines['--dks-indices'])
    assert re.search(r'--mrkd-copy-mode \{eval,train\} +.*\(default: eval; one of eval, train\)$',
                     lines['--mrkd-copy-mode'])
    assert re.search(r'--bake-global-batch, --no-bake-global-batch +.*\(default: True\)$', lines['--bake-global-batch'])


def test_list_selfkd_summaries_are_whole_sentences_and_smoothing_is_noted():
    """Each summary is its docstring's first sentence, its lines joined (or the one given at registration); the
    first line says that --smoothing is timm's 0.1 where the official codes use none."""
    out = format_methods().splitlines()
    assert out[0].startswith("note: --smoothing defaults to timm's 0.1") and 'Zipf\'s LS use none' in out[0]
    dks = get_method('dks').summary
    assert dks.startswith('Deep auxiliary branches') and dks.endswith('(pairwise KL synergy).') and '\n' not in dks
    assert f'dks: {dks}' in out
    assert get_method('multi_exit').summary.endswith("every classifier learns from PS-KD's soft targets.")
