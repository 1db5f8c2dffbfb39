"""The contract's training-only parts (`ModelWrapper.training_parts`): a method written here declares one part in
one line and writes no task-state hook; the part is trained, EMA-averaged, saved, resumed exactly, checked against
what it was built for, and its EMA copy is refused before `setup_ema()`."""
import copy
import logging
from dataclasses import dataclass

import pytest
import timm
import torch
import torch.nn as nn

from conftest import NUM_CLASSES, train_steps
from timm_selfkd.components.training_parts import TrainingPart, like_model
from timm_selfkd.methods.base import ModelWrapper, SelfKDTask

EMA_DECAY = 0.5


@dataclass
class ProbeHparams:
    level: int = 2
    method = 'probe'  # what registration would write (the test does not register it: the registry is global)


class ProbeModule(ModelWrapper):
    """A model with a linear probe on one `forward_intermediates()` level, trained on the labels."""

    def __init__(self, model: nn.Module, level: int):
        super().__init__(model)
        self.level = level
        self.probe = like_model(nn.Linear(model.feature_info[level]['num_chs'], model.num_classes), model)

    def training_parts(self):
        return {'probe': TrainingPart(self.probe, {'probe_level': self.level}, set_by=('level',))}

    def forward(self, input):
        final, (feature,) = self.model.forward_intermediates(input, indices=[self.level])
        return self.model.forward_head(final), self.probe(feature.mean(dim=(2, 3)))


class ProbeTask(SelfKDTask):
    def wrap_model(self, model):
        return ProbeModule(model, self.hparams.level)

    def forward(self, input, target):
        logits, probe_logits = self.trainable_module(input)
        loss_ce, loss_probe = self.cross_entropy(logits, target), self.cross_entropy(probe_logits, target)
        return {'loss': loss_ce + loss_probe, 'output': logits, 'loss_ce': loss_ce, 'loss_probe': loss_probe}


def _task(seed=0, level=2):
    torch.manual_seed(seed)
    return ProbeTask(timm.create_model('test_resnet', num_classes=NUM_CLASSES), ProbeHparams(level=level))


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 32, 32, generator=generator), torch.tensor([0, 1, 2, 3])


def test_a_declared_part_is_saved_averaged_resumed_and_checked(caplog):
    assert not {'get_task_state', 'check_task_state', 'load_task_state'} & set(vars(ProbeTask))
    task = _task()
    task.setup_ema(decay=EMA_DECAY)
    initial = task.trainable_module.probe.weight.detach().clone()
    train_steps(task.train(), *_batch(0))
    task.update_ema()
    trained = task.trainable_module.probe.weight.detach()
    assert not torch.equal(trained, initial)

    state, ema_state = task.get_checkpoint_state(), task.get_checkpoint_state(ema=True)
    assert set(state['state_dict']) == set(task.get_eval_model().state_dict())  # the deployed model: no probe
    assert set(state['task_state']) == {'probe_level', 'probe'} and state['task_state']['probe_level'] == 2
    assert torch.equal(state['task_state']['probe']['weight'], trained)
    torch.testing.assert_close(ema_state['task_state_ema']['probe']['weight'],
                               EMA_DECAY * initial + (1 - EMA_DECAY) * trained)

    fresh = _task(seed=1)
    with pytest.raises(RuntimeError, match=r"probe: cannot load the EMA model's training-only parts before setup_ema"):
        fresh.load_task_state(ema_state['task_state_ema'], ema=True)
    fresh.load_checkpoint_state(state['state_dict'], copy.deepcopy(state['task_state']))
    fresh.setup_ema(decay=EMA_DECAY)
    fresh.load_checkpoint_state(ema_state['state_dict_ema'], copy.deepcopy(ema_state['task_state_ema']), ema=True)
    for ema in (False, True):
        want, got = task.get_trainable_module(ema=ema).state_dict(), fresh.get_trainable_module(ema=ema).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for resumed in (task, fresh):  # the next step is the same bit for bit
        train_steps(resumed, *_batch(1), steps=1)
        resumed.update_ema()
    for ema in (False, True):
        assert torch.equal(fresh.get_task_state(ema=ema)['probe']['weight'], task.get_task_state(ema=ema)['probe']['weight'])

    other = _task(level=3)
    with pytest.raises(ValueError, match=r"probe: the checkpoint's training-only part 'probe' was built for "
                                         r"\{'probe_level': 2\}, this run's for \{'probe_level': 3\} "
                                         r"\(set --probe-level to match\)"):
        other.load_checkpoint_state(state['state_dict'], state['task_state'])

    before = copy.deepcopy(other.trainable_module.probe.state_dict())
    with caplog.at_level(logging.WARNING):
        other.load_checkpoint_state(other.get_eval_model().state_dict(), None)  # a plain model's checkpoint
    assert 'probe: the checkpoint has no probe (training-only); it starts from scratch' in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in other.trainable_module.probe.state_dict().items())


def test_a_part_with_facts_names_the_hyper_parameters_that_set_them():
    with pytest.raises(ValueError, match='set_by names the hyper-parameters'):
        TrainingPart(nn.Linear(2, 2), {'level': 1})
