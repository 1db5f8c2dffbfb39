"""The registry: one task class under several names (presets), each with its own hyper-parameter dataclass."""
from dataclasses import dataclass, field

import pytest

import timm_selfkd
from timm_selfkd import registry
from timm_selfkd.cli import format_methods, method_hparams, parse_args
from timm_selfkd.methods.base import SelfKDTask


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test are dropped afterwards."""
    registry._load_methods()
    monkeypatch.setattr(registry, '_METHODS', dict(registry._METHODS))
    yield
    for hparams_cls in (SoftHparams, HardHparams):  # registration names a dataclass (`hparams.method`)
        if 'method' in vars(hparams_cls):
            delattr(hparams_cls, 'method')


@dataclass
class SoftHparams:
    weight: float = field(default=1.0, metadata={'help': 'w'})


@dataclass
class HardHparams(SoftHparams):
    weight: float = field(default=3.0, metadata={'help': 'w'})


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
