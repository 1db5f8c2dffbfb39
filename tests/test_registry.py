"""The registry: one task class under several names (presets), each with its own hyper-parameter dataclass; the
ranges, choices and checks declared beside each hyper-parameter, checked by one function."""
from dataclasses import dataclass, field

import pytest

import timm_selfkd
from timm_selfkd import registry
from timm_selfkd.cli import format_methods, method_hparams, parse_args
from timm_selfkd.methods.base import SelfKDTask
from timm_selfkd.methods.dlb import DLBHparams
from timm_selfkd.registry import Bounds, check_hparams, hparam


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test are dropped afterwards."""
    registry._load_methods()
    monkeypatch.setattr(registry, '_METHODS', dict(registry._METHODS))
    yield
    for hparams_cls in (SoftHparams, HardHparams, RangedHparams):  # registration names a dataclass (`hparams.method`)
        if 'method' in vars(hparams_cls):
            delattr(hparams_cls, 'method')


@dataclass
class SoftHparams:
    weight: float = field(default=1.0, metadata={'help': 'w'})


@dataclass
class HardHparams(SoftHparams):
    weight: float = field(default=3.0, metadata={'help': 'w'})


def _even(value):
    if value % 2:
        raise ValueError(f'must be even, got {value}')


@dataclass
class RangedHparams:
    rate: float = hparam(0.5, 'a rate', within='[0, 1)')
    temperature: float = hparam(1.0, 'a temperature', within='(0, inf)')
    mode: str = hparam('a', 'a mode', choices=('a', 'b'))
    pairs: int = hparam(2, 'an even count', within='[0, inf)', check=_even)
    gamma: float = hparam(None, 'resolved by the run', within='(0, 1)', default_text='1/K')


def test_one_class_several_presets(clean_registry):
    @registry.register_method('t_soft', hparams=SoftHparams, paper='P1')
    @registry.register_method('t_hard', hparams=HardHparams, paper='P2', summary='the hard one')
    class Twice(SelfKDTask):
        """Doc line."""

    soft, hard = registry.get_method('t_soft'), registry.get_method('t_hard')
    assert soft.task_cls is hard.task_cls is Twice
    assert (soft.hparams_cls().weight, hard.hparams_cls().weight) == (1.0, 3.0)
    assert (soft.summary, hard.summary, soft.paper) == ('Doc line.', 'the hard one', 'P1')
    assert HardHparams().method == 't_hard' and SoftHparams().method == 't_soft'
    assert {'t_soft', 't_hard'} <= set(timm_selfkd.list_methods())


def test_a_dataclass_belongs_to_one_name(clean_registry):
    registry.register_method('t_one', hparams=SoftHparams)(type('A', (SelfKDTask,), {}))
    with pytest.raises(ValueError, match="already belong to method 't_one'"):
        registry.register_method('t_two', hparams=SoftHparams)(type('B', (SelfKDTask,), {}))
    with pytest.raises(ValueError, match='already registered'):
        registry.register_method('t_one', hparams=HardHparams)(type('C', (SelfKDTask,), {}))


def test_unregistered_hparams_have_no_name():
    with pytest.raises(AttributeError, match="'SoftHparams' object has no attribute 'method'"):
        SoftHparams().method


def test_label_presets_share_one_task_class():
    specs = [timm_selfkd.get_method(n) for n in ('lsrkd', 'lsrkd_tc', 'tfkd_reg')]
    assert len({s.task_cls for s in specs}) == 1 and len({s.hparams_cls for s in specs}) == 3


def test_preset_flags_and_list_selfkd(capsys):
    """Underscores of a preset's name become dashes in its flags; --list-selfkd tells where plain LSR is."""
    args = parse_args(['--selfkd', 'lsrkd_tc', '--lsrkd-tc-gamma', '0.3', '--lsrkd-tc-alpha', '0.2'])
    hparams = method_hparams(args)
    assert (hparams.gamma, hparams.alpha, hparams.temperature) == (0.3, 0.2, 3.0)
    assert method_hparams(parse_args(['--selfkd', 'tfkd_reg'])).multiplier == 100.0
    text = format_methods()
    for expected in ('lsrkd: ', 'lsrkd_tc: ', 'tfkd_reg: ', '--tfkd-reg-multiplier', "timm's --smoothing",
                     'Wang et al.', 'Yuan et al.'):
        assert expected in text, expected
    with pytest.raises(SystemExit):
        parse_args(['--selfkd', 'lsrkd', '--lsrkd-tc-gamma', '0.3'])
    assert 'hyper-parameter of lsrkd_tc' in capsys.readouterr().err


@pytest.mark.parametrize('text, inside, outside, shown', [
    ('[0, 1)', (0, 0.5, 0.999), (-1e-9, 1, 1.5), 'in [0, 1)'),
    ('(0, inf)', (1e-300, 1, 1e300), (0, -1, float('nan')), '> 0'),
    ('[-1, inf)', (-1, 0, 7), (-2, -1.5), '>= -1'),
    ('(0, 1]', (1, 0.25), (0, 1.0001), 'in (0, 1]'),
])
def test_bounds(text, inside, outside, shown):
    bounds = Bounds.parse(text)
    assert all(v in bounds for v in inside) and not any(v in bounds for v in outside)
    assert str(bounds) == shown and True not in bounds and '0.5' not in bounds and None not in bounds


def test_bad_interval_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match=r"an interval is written \[low, high\].*got '0, 1'"):
        hparam(0.5, 'x', within='0, 1')


def test_a_plugins_declared_ranges_are_checked(clean_registry):
    """A method's dataclass declares its values beside the help texts; the registry checks them wherever it builds
    the dataclass (flags, recipes, create_task), naming the method and the field; None is a default's only."""
    registry.register_method('t_ranged', hparams=RangedHparams)(type('R', (SelfKDTask,), {}))
    spec = registry.get_method('t_ranged')
    assert registry.build_hparams(spec, {'rate': 0.0, 'temperature': 1e-9, 'mode': 'b', 'pairs': 0}) == \
        RangedHparams(rate=0.0, temperature=1e-9, mode='b', pairs=0)
    for values, message in (({'rate': 1.0}, 't_ranged rate must be in [0, 1), got 1.0'),
                            ({'temperature': 0.0}, 't_ranged temperature must be > 0, got 0.0'),
                            ({'mode': 'c'}, "t_ranged mode must be one of a, b, got 'c'"),
                            ({'pairs': 3}, 't_ranged pairs must be even, got 3'),
                            ({'pairs': -2}, 't_ranged pairs must be >= 0, got -2'),
                            ({'gamma': 1.0}, 't_ranged gamma must be in (0, 1), got 1.0'),
                            ({'rate': None}, 't_ranged rate must be in [0, 1), got None')):
        with pytest.raises(ValueError) as exc:
            registry.build_hparams(spec, values)
        assert str(exc.value) == message
    parse_args(['--selfkd', 't_ranged', '--t-ranged-gamma', '0.5'])
    with pytest.raises(SystemExit):
        parse_args(['--selfkd', 't_ranged', '--t-ranged-pairs', '3'])


def test_every_methods_defaults_pass_its_checks():
    for name in timm_selfkd.list_methods():
        check_hparams(registry.build_hparams(timm_selfkd.get_method(name), {}))


def test_a_stacks_parts_are_checked_however_they_are_given():
    spec = timm_selfkd.get_method('ddgsd+dlb')
    for dlb in ({'alpha': -1.0}, DLBHparams(alpha=-1.0)):  # a dataclass built by hand is not checked by itself
        with pytest.raises(ValueError, match='^dlb alpha must be >= 0, got -1.0$'):
            registry.build_hparams(spec, {'dlb': dlb})


@pytest.mark.parametrize('doc, summary', [
    ('One line.', 'One line.'),
    ('A sentence over\n    two lines, e.g. ViT\n    blocks. Another one.\n\n    Details.', 'A sentence over two lines, '
                                                                                     'e.g. ViT blocks.'),
    ('No full stop\n\nDetails. More.', 'No full stop'),
    (None, ''),
])
def test_summary_is_the_first_sentence(doc, summary):
    assert registry._first_sentence(doc) == summary
