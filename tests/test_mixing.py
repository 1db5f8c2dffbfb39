"""CutMix/Mixup + DLB: `ReplayMixup` mixes the repeated half of a batch exactly as one step earlier."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import Mixup

import timm_selfkd
import timm_selfkd.train as train_module
from test_train import BATCH, read_summary, train_args
from timm_selfkd.components.replayed_mixup import NO_BOX, MixParams, ReplayMixup
from timm_selfkd.train import main

NUM_CLASSES = 5


def images(n, seed):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def labels(n, seed):
    return torch.randint(0, NUM_CLASSES, (n,), generator=torch.Generator().manual_seed(seed))


def one_hot(y):
    return torch.nn.functional.one_hot(y, NUM_CLASSES).float()


def test_apply_mixup_pairs_inside_the_block_by_hand():
    """lam 0.3, no box: x_i <- 0.3 x_i + 0.7 x_(n-1-i) and y_i <- 0.3 y_i + 0.7 y_(n-1-i), within the block."""
    mixer = ReplayMixup(Mixup(mixup_alpha=1.0, num_classes=NUM_CLASSES, label_smoothing=0.0))
    x, y = images(4, 0), labels(4, 0)
    out = x.clone()
    target = mixer.apply(out, y, MixParams(0.3, NO_BOX, 4))
    for i in range(4):
        torch.testing.assert_close(out[i], 0.3 * x[i] + 0.7 * x[3 - i])
        torch.testing.assert_close(target[i], 0.3 * one_hot(y[i]) + 0.7 * one_hot(y[3 - i]))


def test_apply_cutmix_box_by_hand():
    """Box rows 1:3, cols 2:6 of x_i come from x_(n-1-i), the rest stays; targets use the given lambda."""
    mixer = ReplayMixup(Mixup(cutmix_alpha=1.0, num_classes=NUM_CLASSES, label_smoothing=0.0))
    x, y = images(3, 1), labels(3, 1)
    out = x.clone()
    target = mixer.apply(out, y, MixParams(0.875, (1, 3, 2, 6), 3))
    for i in range(3):
        expected = x[i].clone()
        expected[:, 1:3, 2:6] = x[2 - i][:, 1:3, 2:6]
        torch.testing.assert_close(out[i], expected)
        torch.testing.assert_close(target[i], 0.875 * one_hot(y[i]) + 0.125 * one_hot(y[2 - i]))


@pytest.mark.parametrize('mixup_kwargs', [dict(cutmix_alpha=1.0, prob=0.5), dict(mixup_alpha=0.4),
                                          dict(mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5)])
def test_repeated_half_gets_the_same_mix_as_one_step_earlier(mixup_kwargs):
    """DLB-shaped batches (batch t = [new half of t-1, new half]): the first half's mixed images and targets at
    step t equal the second half's at step t-1, bit for bit; the new halves' mixes vary over steps."""
    mixer = ReplayMixup(Mixup(num_classes=NUM_CLASSES, label_smoothing=0.1, **mixup_kwargs))
    half = 4
    new = [images(half, s) for s in range(12)]
    new_labels = [labels(half, s) for s in range(12)]
    previous = None
    lams = set()
    for step in range(1, 12):
        x = torch.cat([new[step - 1], new[step]])
        y = torch.cat([new_labels[step - 1], new_labels[step]])
        mixed, target = mixer(x, y, split=half, replay=previous is not None)
        if previous is not None:
            assert torch.equal(mixed[:half], previous[0][half:]) and torch.equal(target[:half], previous[1][half:])
        previous = mixed.clone(), target.clone()
        lams.add(mixer.kept.lam)
    assert len(lams) > 3


def test_no_replay_at_the_start_of_a_stream_or_for_another_split():
    """replay=False (first batch) or a kept block of another size: both blocks get new parameters."""
    mixer = ReplayMixup(Mixup(cutmix_alpha=1.0, num_classes=NUM_CLASSES))
    mixer.kept = MixParams(0.5, (0, 4, 0, 4), 3)
    drawn = []
    mixer.draw = lambda shape, rows: drawn.append(rows) or MixParams(1.0, NO_BOX, rows)
    mixer(images(8, 0), labels(8, 0), split=4, replay=True)
    assert drawn == [4, 4] and mixer.kept == MixParams(1.0, NO_BOX, 4)


def test_state_round_trip_and_batch_mode_only():
    mixer = ReplayMixup(Mixup(cutmix_alpha=1.0, num_classes=NUM_CLASSES))
    mixer.kept = MixParams(0.71875, (2, 6, 1, 5), 4)
    other = ReplayMixup(Mixup(cutmix_alpha=1.0, num_classes=NUM_CLASSES))
    other.load_state(mixer.state())
    assert other.kept == mixer.kept
    with pytest.raises(ValueError, match='--mixup-mode batch'):
        ReplayMixup(Mixup(cutmix_alpha=1.0, mode='elem', num_classes=NUM_CLASSES))


class Recorder(nn.Module):
    """A tiny classifier that records the images it is given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, NUM_CLASSES)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.fc(x.flatten(1)) * 4


@pytest.mark.parametrize('mixup_kwargs', [dict(cutmix_alpha=1.0), dict(mixup_alpha=0.4)])
def test_dlb_kept_logits_describe_the_same_mixed_images(mixup_kwargs):
    """DLB with a bound Mixup: with no update between the steps, the repeated rows are the very images the kept
    logits came from, so the last-batch KL is exactly 0 while the loss uses mixed soft targets."""
    model = Recorder()
    task = timm_selfkd.create_task('dlb', model, batch_size=8, mixup=Mixup(num_classes=NUM_CLASSES, **mixup_kwargs),
                                   criterion_kwargs=dict(soft_targets=True))
    x1, y1 = images(8, 3), labels(8, 3)
    x2, y2 = torch.cat([x1[4:], images(4, 4)]), torch.cat([y1[4:], labels(4, 4)])
    task(x1.clone(), y1)
    out = task(x2.clone(), y2)
    assert torch.equal(model.seen[1][:4], model.seen[0][4:])
    assert not torch.equal(model.seen[1][:4], x2[:4])  # they were mixed
    assert out['loss_kd'].item() == 0.0 and math.isfinite(out['loss_ce'].item())
    state = task.get_task_state()
    assert state['last_mix'].shape == (1, 6)
    restored = timm_selfkd.create_task('dlb', Recorder(), batch_size=8,
                                       mixup=Mixup(num_classes=NUM_CLASSES, **mixup_kwargs))
    restored.load_task_state(state)
    assert restored.mixer.kept == task.mixer.kept


def capture_training_inputs(monkeypatch):
    """Make train.py's model record every training batch it sees."""
    seen = []

    def create_model(*args, **kwargs):
        model = timm.create_model(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone())
                                        if module.training else None)
        return model

    monkeypatch.setattr(train_module, 'create_model', create_model)
    return seen


@pytest.mark.parametrize('prefetcher', [[], ['--no-prefetcher']])
def test_train_cutmix_dlb_replays_the_mix(image_folder, tmp_path, monkeypatch, prefetcher):
    """`--selfkd dlb --cutmix 1.0 --mixup-prob 0.5` through train.py (with --no-aug, so a re-read image has the
    same pixels): every batch's repeated half is exactly the previous batch's mixed new half."""
    seen = capture_training_inputs(monkeypatch)
    drawn, draw = [], ReplayMixup.draw
    monkeypatch.setattr(ReplayMixup, 'draw', lambda self, *args: drawn.append(draw(self, *args)) or drawn[-1])
    main(train_args(image_folder, tmp_path, '--img-size', '32', '--selfkd', 'dlb', '--cutmix', '1.0',
                    '--mixup-prob', '0.5', '--no-aug', '--model', 'test_resnet', *prefetcher))
    (row,) = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss'])) and float(row['train_loss_kd']) > 0
    half = BATCH // 2
    assert len(seen) == 7
    for before, after in zip(seen, seen[1:]):
        assert torch.equal(after[:half], before[half:])
    boxes = [mix.box != NO_BOX for mix in drawn]
    assert any(boxes) and not all(boxes)  # each new half is cut-mixed with probability 0.5


def test_cutmix_dlb_resumes_exactly_from_a_recovery_checkpoint(tmp_path):
    """The kept mix is task state: a run resumed mid-epoch ends bit-identical to the uninterrupted one."""
    from conftest import write_image_folder
    from test_preemption import assert_weights_equal, rows, run_args
    data = tmp_path / 'data'
    write_image_folder(str(data / 'train'), 16, seed=0)
    write_image_folder(str(data / 'validation'), 4, seed=1)
    mix = ('--cutmix', '1.0', '--mixup', '0.4', '--mixup-prob', '0.7')
    main(run_args(str(data), tmp_path, 'full', 'dlb', 0, '--recovery-interval', '5', *mix))
    recovery = sorted(f for f in (tmp_path / 'full').iterdir() if f.name.startswith('recovery-'))[0]
    state = torch.load(recovery, map_location='cpu', weights_only=False)['task_state']
    assert state['last_mix'].shape == (1, 6)
    main(run_args(str(data), tmp_path, 'mid', 'dlb', 0, '--resume', str(recovery), *mix))
    first_epoch = int(recovery.name.split('-')[1])
    assert rows(tmp_path / 'mid') == rows(tmp_path / 'full')[first_epoch:]
    assert_weights_equal(tmp_path / 'mid', tmp_path / 'full')
