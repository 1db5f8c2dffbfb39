"""Every step-schedule recipe trains each epoch at the lr of the official code (or paper text) it follows.

timm's MultiStepLRScheduler compares milestone m with t + 1, so it decays from 0-based epoch m - 1 on, one epoch
before torch's MultiStepLR(m) stepped after each epoch: a recipe whose official lr first drops at 0-based epoch d has
milestone d + 1. Below, each official rule is re-written as it runs in its source (0-based epochs), with the 0-based
epochs at which its lr drops and where it was read; Zipf's LS and FRSKD have their own tests (test_zipfls.py,
test_frskd.py)."""
import bisect
import os

import pytest
import torch

from conftest import epoch_lrs

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def torch_scheduler_stepped_after_each_epoch(make_scheduler, base, epochs):
    """A torch.optim.lr_scheduler, `scheduler.step()` once each epoch has trained."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base)
    scheduler = make_scheduler(optimizer)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        optimizer.step()
        scheduler.step()
    return lrs


def dlb_multistep(milestones, epochs, base=0.05):
    """DLB's base.py / dlb.py: MultiStepLR(milestones, gamma 0.1) stepped after each epoch."""
    return torch_scheduler_stepped_after_each_epoch(
        lambda optimizer: torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, 0.1), base, epochs)


def examples_imagenet_steplr(epochs, base=0.1):
    """pytorch/examples imagenet/main.py: StepLR(step_size 30, gamma 0.1) stepped after each epoch."""
    return torch_scheduler_stepped_after_each_epoch(
        lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 30, 0.1), base, epochs)


def pskd_adjust_learning_rate(schedule, epochs, base=0.1, rate=0.1):
    """PS-KD main.py: adjust_learning_rate(epoch) before epoch `epoch` trains, x rate for each milestone <= epoch."""
    return [base * rate ** sum(epoch >= milestone for milestone in schedule) for epoch in range(epochs)]


def mmcv_step_hook(steps, gamma, epochs, base=0.1):
    """mmcv 1.x StepLrUpdaterHook (by epoch): before_train_epoch sets base x gamma^i, i the first step with
    runner.epoch (0-based) < step (all of them once past the last)."""
    return [base * gamma ** next((i for i, step in enumerate(steps) if epoch < step), len(steps))
            for epoch in range(epochs)]


def dks_on_start_epoch(epoch_step, ratio, epochs, base=0.1):
    """DKS wrn_DKS/main.py on torchnet's Engine: on_start_epoch sees state['epoch'] = the epochs done so far and
    re-creates the optimizer at lr x ratio when state['epoch'] + 1 (1-based) is in epoch_step."""
    lr, lrs = base, []
    for done in range(epochs):
        if done + 1 in epoch_step:
            lr *= ratio
        lrs.append(lr)
    return lrs


def mixskd_adjust_lr(milestones, warmup, epochs, base=0.1):
    """Self-KD-Lib utils.adjust_lr, called at the start of each epoch from the warm-up's end on:
    base x 0.1^bisect_right(milestones, epoch - warmup); warm-up epochs (per step, not compared) are None."""
    return [None if epoch < warmup else base * 0.1 ** bisect.bisect_right(milestones, epoch - warmup)
            for epoch in range(epochs)]


def paper_fractions(fractions, epochs, base=0.1, gamma=0.1):
    """A paper's "x gamma at f of training": x gamma once f x epochs epochs have trained."""
    return [base * gamma ** sum(epoch >= f * epochs for f in fractions) for epoch in range(epochs)]


DLB_BASE = ('Meta-knowledge-Lab/DLB base.py:38 (milestones [150, 180, 210]), :191 MultiStepLR, :149 step after each '
            'epoch')
DLB = ('Meta-knowledge-Lab/DLB dlb.py:193 MultiStepLR, :158 step after each epoch; [75, 90, 105]: the paper\'s '
       '150/180/210 at half the epochs (sec. 4.1)')
PSKD = 'lgcnsai/PS-KD-Pytorch main.py:57 ([150, 225]), :105-109 adjust_learning_rate, :313-315 at each epoch start'
MMCV = ('yzd-v/cls_KD (mmcls 0.23) lr_config step on mmcv v1.6.2 lr_updater.py:129-138, :201-214 (runner.epoch '
        '0-based, epoch_based_runner.py:59)')
# recipe: (processes, official lrs per 0-based epoch, 0-based epochs where the official lr drops, source)
OFFICIAL = {
    'cifar100_baseline.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'cifar100_cutmix.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'cifar100_cutout.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'cskd_cifar100.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'ddgsd_cifar100.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'tfkd_reg_cifar100.yaml': (1, dlb_multistep([150, 180, 210], 240), [150, 180, 210], DLB_BASE),
    'dlb_cifar100.yaml': (1, dlb_multistep([75, 90, 105], 120), [75, 90, 105], DLB),
    'dlb_cutmix_cifar100.yaml': (1, dlb_multistep([75, 90, 105], 120), [75, 90, 105], DLB),
    'dlb_cutout_cifar100.yaml': (1, dlb_multistep([75, 90, 105], 120), [75, 90, 105], DLB),
    'ddgsd_dlb_cifar100.yaml': (1, dlb_multistep([75, 90, 105], 120), [75, 90, 105], DLB),
    'pskd_cifar100.yaml': (1, pskd_adjust_learning_rate([150, 225], 300), [150, 225], PSKD),
    **{f'multi_exit_{parts}_cifar100.yaml': (1, pskd_adjust_learning_rate([150, 225], 300), [150, 225], PSKD)
       for parts in ('byot', 'byot_dmfl', 'byot_dmfl_pskd', 'byot_pskd', 'dmfl', 'dmfl_pskd', 'pskd')},
    'pskd_imagenet_resnet152.yaml': (8, pskd_adjust_learning_rate([30, 60, 90], 100), [30, 60, 90],
                                     PSKD + ', at the assumed ImageNet milestones [30, 60, 90]'),
    'self_guidance_cifar100.yaml': (1, paper_fractions([0.5, 0.75], 300), [150, 225],
                                    'Self-Guidance paper sec. 4.1 Setup: 0.1 -> 0.01 at 50%, -> 0.001 at 75% '
                                    '(no official code)'),
    'uskd_cifar100.yaml': (1, mmcv_step_hook([60, 120, 160], 0.2, 200), [60, 120, 160],
                           MMCV + '; configs/resnet/resnet18_8xb16_cifar100.py:14'),
    'uskd_imagenet_resnet50.yaml': (8, mmcv_step_hook([30, 60, 90], 0.1, 100), [30, 60, 90],
                                    MMCV + '; configs/_base_/schedules/imagenet_bs256.py:5'),
    'dks_cifar100.yaml': (1, dks_on_start_epoch([60, 120, 160], 0.2, 200), [59, 119, 159],
                          'sundw2014/DKS wrn_DKS/main.py:51-53, :183-186 on pytorch/tnt '
                          'torchnet/engine/engine.py:45-67'),
    **{f'dks_imagenet_{arch}.yaml': (8, examples_imagenet_steplr(90), [30, 60],
                                     'pytorch/examples imagenet/main.py:207 StepLR(30), :291 step after each epoch '
                                     '(assumed: DKS releases no ImageNet training)')
       for arch in ('resnet18', 'resnet50')},
    'mixskd_cifar100.yaml': (1, mixskd_adjust_lr([100, 150], 5, 205), [105, 155],
                             'winycg/Self-KD-Lib main_mixskd_cifar.py:35-37, :146-147, :323; utils.py:116-123'),
}


@pytest.mark.parametrize('recipe', sorted(OFFICIAL))
def test_recipe_trains_every_epoch_at_the_official_lr(recipe):
    """Per-update recipes (MixSKD) are compared at each epoch's first update, from the warm-up's end on."""
    processes, official, drops, _source = OFFICIAL[recipe]
    compared = [epoch for epoch, lr in enumerate(official) if lr is not None]
    assert [e for e in compared[1:] if official[e] < official[e - 1]] == drops
    ours = epoch_lrs(['-c', os.path.join(CONFIGS, recipe)], processes)
    assert len(ours) == len(official)
    assert [ours[e] for e in compared] == pytest.approx([official[e] for e in compared], rel=1e-9)


def test_every_step_schedule_recipe_is_checked():
    """A new multistep or step recipe needs its official schedule in the table above."""
    from timm_selfkd.cli import parse_args
    stepped = {name for name in os.listdir(CONFIGS) if name.endswith('.yaml')
               and parse_args(['-c', os.path.join(CONFIGS, name)]).sched in ('multistep', 'step')}
    assert stepped - {'zipfls_cifar100.yaml', 'zipfls_imagenet_resnet50.yaml', 'frskd_cifar100.yaml'} == set(OFFICIAL)
