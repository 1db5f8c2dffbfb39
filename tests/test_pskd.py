"""PS-KD targets by hand at epochs 0, 1 and the last; the per-sample memory (dense, top-k, write protocol)."""
import pytest
import torch
import torch.nn as nn

import timm_selfkd
from timm_selfkd.components.soft_target_memory import SoftTargetMemory, memory_bytes
from timm_selfkd.methods.base import RunInfo

EPOCHS = 4  # alpha_T = 0.8: a_0 = 0.2, a_1 = 0.4, a_3 = 0.8
P = [0.5, 0.3, 0.2]  # the model's softmax for every image (its logits are log P)


class FixedModel(nn.Module):
    """Logits log P for every input (a parameter, so that the task has something to train); tells its classes."""

    def __init__(self, probs):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(probs).log())
        self.num_classes = len(probs)

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def _task(num_samples=4, **hparams):
    task = timm_selfkd.create_task('pskd', FixedModel(P), num_epochs=EPOCHS, steps_per_epoch=1,
                                   num_samples=num_samples, batch_size=2, **hparams)
    assert task.run.num_classes == 3
    task.train()
    return task


def _step(task, epoch, indices, target):
    task.set_epoch(epoch)
    return task(torch.zeros(len(indices), 1), torch.tensor(target), indices=torch.tensor(indices))


def _soft_ce(target, probs=P):
    return -sum(t * torch.tensor(p).log().item() for t, p in zip(target, probs))


def test_targets_by_hand_at_epochs_0_1_and_last():
    task = _task()
    # epoch 0: images never trained on have P = their label, so the target is the label: (0, 1, 0)
    out = _step(task, 0, [2, 3], [1, 1])
    assert out['loss'].item() == pytest.approx(_soft_ce([0, 1, 0]), abs=1e-6)
    # epoch 1, a_1 = 0.8 * 2 / 4 = 0.4: 0.6 (0, 1, 0) + 0.4 (0.5, 0.3, 0.2) = (0.2, 0.72, 0.08)
    out = _step(task, 1, [2, 3], [1, 1])
    assert out['loss'].item() == pytest.approx(_soft_ce([0.2, 0.72, 0.08]), abs=1e-4)
    # last epoch, a_3 = 0.8: 0.2 (0, 1, 0) + 0.8 (0.5, 0.3, 0.2) = (0.4, 0.44, 0.16); label 0 for image 2:
    # 0.2 (1, 0, 0) + 0.8 P = (0.6, 0.24, 0.16)
    out = _step(task, EPOCHS - 1, [2, 3], [0, 1])
    expected = (_soft_ce([0.6, 0.24, 0.16]) + _soft_ce([0.4, 0.44, 0.16])) / 2
    assert out['loss'].item() == pytest.approx(expected, abs=1e-4)
    assert task.progressive.alpha(EPOCHS) == pytest.approx(0.8)  # a cool-down epoch past E keeps alpha_T
    # an image first seen in the last epoch still trains on its label
    out = _step(task, EPOCHS - 1, [0], [2])
    assert out['loss'].item() == pytest.approx(_soft_ce([0, 0, 1]), abs=1e-6)


def test_soft_targets_by_hand_with_label_smoothing():
    task = timm_selfkd.create_task('pskd', FixedModel(P), criterion_kwargs=dict(smoothing=0.3), num_epochs=EPOCHS,
                                   steps_per_epoch=1, num_samples=2, batch_size=2)
    past = torch.tensor([P, [0., 0., 0.]])
    targets = task.progressive.soft_targets(torch.tensor([1, 0]), past, torch.tensor([True, False]), epoch=1)
    # smoothed labels: (0.1, 0.8, 0.1) and (0.8, 0.1, 0.1); the second image has no past prediction
    expected = torch.tensor([[0.6 * 0.1 + 0.4 * 0.5, 0.6 * 0.8 + 0.4 * 0.3, 0.6 * 0.1 + 0.4 * 0.2],
                             [0.8, 0.1, 0.1]])
    assert torch.allclose(targets, expected, atol=1e-6)


def test_memory_keeps_the_last_prediction_of_each_sample():
    memory = SoftTargetMemory(num_samples=5, num_classes=3)
    memory.update(torch.tensor([4, 1, 4]), torch.tensor([[.1, .2, .7], [.3, .3, .4], [.6, .2, .2]]))
    memory.flush()
    probs, written = memory.lookup(torch.tensor([1, 4, 0]))
    assert written.tolist() == [True, True, False]
    # index 4 twice in a step: the last occurrence wins
    assert torch.allclose(probs[:2], torch.tensor([[.3, .3, .4], [.6, .2, .2]]), atol=1e-3)
    assert probs.dtype == torch.float32 and memory.values.dtype == torch.float16
    memory.update(torch.tensor([1]), torch.tensor([[.9, .05, .05]]))
    memory.flush()
    assert torch.allclose(memory.lookup(torch.tensor([1]))[0], torch.tensor([[.9, .05, .05]]), atol=1e-3)


def test_a_non_finite_prediction_is_stored_as_never_written():
    memory = SoftTargetMemory(num_samples=2, num_classes=2)
    memory.update(torch.tensor([0, 1]), torch.tensor([[float('nan'), 0.5], [0.25, 0.75]]))
    memory.flush()
    probs, written = memory.lookup(torch.tensor([0, 1]))
    assert written.tolist() == [False, True] and torch.isfinite(probs).all()


def test_rows_of_another_local_rank_are_read_from_the_last_gathered_step():
    """Local rank 0 of 2 writes only even indices; the odd rows of the step it just gathered are read from
    that step's copy (their writer may not have flushed yet), older odd rows from the shared table."""
    memory = SoftTargetMemory(num_samples=4, num_classes=2, local_rank=0, local_world_size=2)
    memory.update(torch.tensor([1, 2]), torch.tensor([[.25, .75], [.5, .5]]))
    memory.flush()
    assert memory.values[1].sum() == 0 and memory.values[2].sum() > 0  # rank 0's share only
    probs, written = memory.lookup(torch.tensor([1, 2, 3]))
    assert written.tolist() == [True, True, False]
    assert torch.allclose(probs[0], torch.tensor([.25, .75]))
    memory.values[3] = torch.tensor([.125, .875], dtype=torch.float16)  # written by local rank 1
    assert torch.allclose(memory.lookup(torch.tensor([3]))[0], torch.tensor([[.125, .875]]))


def test_topk_memory_by_hand():
    # K = 5, k = 2: keep 0.5 (class 1) and 0.3 (class 3); the other 0.2 is spread over 3 classes
    memory = SoftTargetMemory(num_samples=2, num_classes=5, topk=2)
    memory.update(torch.tensor([1]), torch.tensor([[.1, .5, .05, .3, .05]]))
    memory.flush()
    assert memory.classes.dtype == torch.int16
    probs, written = memory.lookup(torch.tensor([1, 0]))
    assert written.tolist() == [True, False]
    rest = 0.2 / 3
    assert torch.allclose(probs[0], torch.tensor([rest, .5, rest, .3, rest]), atol=1e-3)
    assert probs[0].sum().item() == pytest.approx(1, abs=1e-3)


def test_memory_sizes():
    assert memory_bytes(1_281_167, 1000) == 2_562_334_000  # ImageNet-1k, dense fp16: <= 2.6 GB per node
    assert memory_bytes(1_281_167, 1000, topk=10) == 1_281_167 * 10 * 4  # fp16 value + int16 class
    assert memory_bytes(10, 40_000, topk=1) == 10 * 6  # int32 classes beyond 32768 classes


def test_state_round_trip_and_what_differs():
    task = _task()
    _step(task, 0, [2, 3], [1, 1])
    task.sync_task_state()
    state = task.get_task_state()
    other = _task()
    other.load_task_state(state)
    assert torch.equal(other.memory.values, task.memory.values)
    assert other.memory.values[2].sum() > 0
    with pytest.raises(ValueError, match='is for 4 training images, this run has 6'):
        _task(num_samples=6).check_task_state(state)
    with pytest.raises(ValueError, match='is dense, this run asks for top-2'):
        _task(topk=2).check_task_state(state)


def test_bad_setups_are_refused():
    with pytest.raises(ValueError, match='--pskd-topk 4 is larger than the class count \\(3\\)'):
        timm_selfkd.create_task('pskd', FixedModel(P), topk=4, num_epochs=2, num_samples=4)
    for facts, missing, why in [({}, 'num_epochs', 'alpha_t grows over the epochs of the run'),
                                ({'num_epochs': 2}, 'num_samples',
                                 'its memory of past predictions has a row per training image')]:
        with pytest.raises(ValueError) as exc:
            timm_selfkd.create_task('pskd', FixedModel(P), **facts)
        assert str(exc.value) == f"create_task('pskd') needs {missing}=... ({why})"
    untold = FixedModel(P)
    del untold.num_classes
    with pytest.raises(ValueError) as exc:
        timm_selfkd.create_task('pskd', untold, num_epochs=2, num_samples=4)
    assert str(exc.value) == ('PS-KD needs the class count of the model for its memory of past predictions, and '
                              'this model does not tell it (no num_classes attribute)')
    task = timm_selfkd.create_task('pskd', FixedModel(P), num_epochs=2, num_samples=4)
    with pytest.raises(ValueError, match='streamed data set'):
        task.bind_run(RunInfo(num_epochs=2, steps_per_epoch=1, num_samples=None, num_classes=3, batch_size=2))
    with pytest.raises(ValueError, match='alpha_t'):
        timm_selfkd.create_task('pskd', FixedModel(P), alpha_t=1.5)
