"""Fixes found by checking the methods against their papers (issue 16, item 6): Teacher Correction's default
gamma follows the class count (LsrKD paper's 2.5 / K)."""
import pytest
import timm
import torch

import timm_selfkd
from timm_selfkd.components.losses import corrected_teacher, default_tc_gamma, teacher_correction


@pytest.mark.parametrize('num_classes, gamma', [(100, 0.025), (10, 0.25), (4, 0.625), (3, 2.5 / 3), (2, 0.75)])
def test_default_gamma_is_the_paper_s_rule(num_classes, gamma):
    assert default_tc_gamma(num_classes) == pytest.approx(gamma)
    assert 1 / num_classes < default_tc_gamma(num_classes) < 1  # a corrected teacher for every K


@pytest.mark.parametrize('num_classes', [2, 4, 10, 100])
def test_lsrkd_tc_trains_at_its_default_for_any_class_count(num_classes):
    model = timm.create_model('resnet18', num_classes=num_classes)
    task = timm_selfkd.create_task('lsrkd_tc', model)
    assert task.teacher_probs == pytest.approx(corrected_teacher(num_classes, default_tc_gamma(num_classes)))
    out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch.isfinite(out['loss'])


def test_a_given_gamma_still_wins_and_is_checked_against_k():
    model = timm.create_model('resnet18', num_classes=10)
    assert timm_selfkd.create_task('lsrkd_tc', model, gamma=0.5).teacher_probs[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r'lsrkd_tc gamma must be > 1/K = 0\.1 for 10 classes'):
        timm_selfkd.create_task('lsrkd_tc', model, gamma=0.05)


def test_mrkd_tc_corrects_its_copies_to_the_default_gamma():
    model = timm.create_model('resnet18', num_classes=4)
    task = timm_selfkd.create_task('mrkd_tc', model, interval='2')
    logits, target = torch.randn(3, 2, 4), torch.tensor([1, 3])
    expected = teacher_correction(logits, target, 0.625, task.hparams.temperature)
    assert torch.equal(task.teacher_probs(logits, target), expected)
    assert expected[..., [0, 1], [1, 3]].flatten().tolist() == pytest.approx([0.625] * 6)
