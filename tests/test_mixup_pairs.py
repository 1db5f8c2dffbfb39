"""Mixup/CutMix for the methods whose batches pair rows (CS-KD's anchors and partners, DDGSD's views, the
ddgsd+dlb stack) or whose targets are per image (PS-KD, multi_exit's PS-KD switch) (issue 15, item 1).

On a fixed mix (lambda, CutMix box; the partner of row i is row n-1-i of its block, timm's batch mode), the
batch the model sees is built by hand with plain indexing, and the loss by hand from the logits the model gave;
then one `python train.py --mixup 0.2 --cutmix 1.0` epoch per method.
"""
import copy
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.data import Mixup

import timm_selfkd
from conftest import hand_kd, log_softmax_row
from test_train import read_summary, train_args
from timm_selfkd.components import replayed_mixup
from timm_selfkd.components.replayed_mixup import NO_BOX, MixParams, RowMix, SharedMix
from timm_selfkd.train import main

K = 4  # classes
SMOOTHING = 0.1
CUTMIX = MixParams(0.875, (1, 3, 2, 6), 0)  # rows 1:3, columns 2:6 of 8x8: 8 of 64 pixels from the partner
MIXUP = MixParams(0.3, NO_BOX, 0)
ROWS = RowMix((0.875, 0.3, 0.6, 1.0), ((1, 3, 2, 6), NO_BOX, NO_BOX, NO_BOX))  # pair/elem: per row of 4
FIXED = {'cutmix': CUTMIX, 'mixup': MIXUP, 'rows': ROWS}


def row(mix, i):
    """Row i's mix: the block's one for a batch-mode mix, row i's own for a per-row mix."""
    return MixParams(mix.lams[i], mix.boxes[i], 1) if isinstance(mix, RowMix) else mix


class Linear(nn.Module):
    """Logits = W flatten(x), seeded; keeps a copy of every input it sees."""

    def __init__(self, seed=0, size=8):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(K, 3 * size * size, generator=generator) * 0.1)
        self.num_classes = K
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x.flatten(1) @ self.weight.t()


def images(n, seed):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def mixed_by_hand(x, partner, mix):
    """Image x mixed with image `partner` under `mix` (box pasted from the partner, or lam x + (1 - lam) p)."""
    if mix.box == NO_BOX:
        return mix.lam * x + (1 - mix.lam) * partner
    top, bottom, left, right = mix.box
    out = x.clone()
    out[:, top:bottom, left:right] = partner[:, top:bottom, left:right]
    return out


def smooth(y):
    return [(1 - SMOOTHING) * float(k == y) + SMOOTHING / K for k in range(K)]


def mixed_label(y, partner, lam):
    return [lam * a + (1 - lam) * b for a, b in zip(smooth(y), smooth(partner))]


def soft_ce(rows, targets):
    """Batch mean of -sum_k q_k log softmax(z)_k, in plain math."""
    return sum(-sum(q * lp for q, lp in zip(t, log_softmax_row(z))) for z, t in zip(rows, targets)) / len(rows)


def softmax(z):
    return [math.exp(v) for v in log_softmax_row(z)]


def fix(mixer, *mixes):
    """Make `mixer.draw` return `mixes` in turn (rows filled in from the shape or the requested rows)."""
    queue = list(mixes)

    def draw(shape, rows=None):
        mix = queue.pop(0)
        if isinstance(mix, RowMix):
            return mix
        return MixParams(mix.lam, mix.box, shape[0] if rows is None else rows)
    mixer.draw = draw


def mixup(**kwargs):
    return Mixup(**{'mixup_alpha': 0., 'cutmix_alpha': 1.0, 'num_classes': K, 'label_smoothing': SMOOTHING,
                    **kwargs})


# ---------------------------------------------------------------------------------------------------------------------
# The shared mix
# ---------------------------------------------------------------------------------------------------------------------

def test_shared_mix_gives_every_block_the_same_draw():
    """Two blocks, one draw: the same box in both, each block's row i with its own row n-1-i; soft targets are
    mixed as given, hard labels become timm's smoothed mixup targets."""
    np.random.seed(3)
    mixer = SharedMix(mixup())
    a, b = images(4, 0), images(4, 1)
    out_a, out_b = a.clone(), b.clone()
    soft = torch.rand(4, K)
    ta, tb = mixer([out_a, out_b], [torch.tensor([0, 1, 2, 3]), soft])
    mix = mixer.last
    assert mix.box != NO_BOX and mix.rows == 4
    for i in range(4):
        torch.testing.assert_close(out_a[i], mixed_by_hand(a[i], a[3 - i], mix))
        torch.testing.assert_close(out_b[i], mixed_by_hand(b[i], b[3 - i], mix))
        torch.testing.assert_close(ta[i], torch.tensor(mixed_label(i, 3 - i, mix.lam)))
        torch.testing.assert_close(tb[i], mix.lam * soft[i] + (1 - mix.lam) * soft[3 - i])


@pytest.mark.parametrize('mode', ['batch', 'pair', 'elem'])
@pytest.mark.parametrize('kwargs', [dict(mixup_alpha=0.4, switch_prob=0.5, prob=0.8), dict(cutmix_minmax=(0.2, 0.6))])
def test_one_block_is_mixed_exactly_as_timm_mixes_it(mode, kwargs):
    """One block under the same NumPy seed: the pixels and targets of timm's own `Mixup(mode=...)`, bit for bit
    (same draws, same order), in every mode."""
    for seed in range(4):
        x, y = images(6, seed), torch.tensor([0, 1, 2, 3, 0, 1])
        np.random.seed(seed)
        expected_x, expected_y = mixup(mode=mode, **kwargs)(x.clone(), y)
        np.random.seed(seed)
        out = x.clone()
        target, = SharedMix(mixup(mode=mode, **kwargs))([out], [y])
        torch.testing.assert_close(out, expected_x, rtol=0, atol=1e-6)
        torch.testing.assert_close(target, expected_y, rtol=0, atol=1e-6)


def test_row_mix_gives_row_i_of_every_block_row_i_s_mix():
    """Per-row mix (pair/elem): row i of each block is mixed with that block's row n-1-i under lams[i]/boxes[i];
    targets lam_i y_i + (1 - lam_i) y_(n-1-i)."""
    mixer = SharedMix(mixup(mode='elem'))
    mix = RowMix((0.875, 0.3, 1.0, 0.6), ((1, 3, 2, 6), NO_BOX, NO_BOX, NO_BOX))
    mixer.draw = lambda shape: mix
    a, b = images(4, 6), images(4, 7)
    out_a, out_b = a.clone(), b.clone()
    ta, = mixer([out_a, out_b], [torch.tensor([0, 1, 2, 3])])
    for i in range(4):
        row = MixParams(mix.lams[i], mix.boxes[i], 1)
        torch.testing.assert_close(out_a[i], mixed_by_hand(a[i], a[3 - i], row))
        torch.testing.assert_close(out_b[i], mixed_by_hand(b[i], b[3 - i], row))
        torch.testing.assert_close(ta[i], torch.tensor(mixed_label(i, 3 - i, mix.lams[i])))


def test_mixing_off_leaves_the_batch_and_smooths_the_labels():
    """Past --mixup-off-epoch (`mixup_enabled` False) lambda is 1: no pixel moves, targets are smoothed labels."""
    mixer = SharedMix(mixup())
    mixer.mixup.mixup_enabled = False
    x = images(4, 0)
    out = x.clone()
    target, = mixer([out], [torch.tensor([0, 1, 2, 3])])
    assert torch.equal(out, x) and mixer.last.lam == 1.
    torch.testing.assert_close(target, torch.tensor([smooth(y) for y in range(4)]))


# ---------------------------------------------------------------------------------------------------------------------
# CS-KD
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(FIXED))
def test_cskd_partners_get_the_anchors_mix(kind):
    """Anchors (rows 0-3) mixed among themselves, partners (rows 4-7) with the same partner order and box/lambda:
    the teacher of mixed anchor i is the prediction for the equally mixed partners; CE on the anchors' mixed
    targets: ce(z_a, lam y_i + (1 - lam) y_(3-i)) + w T^2 KL(sm(z_p / T) || sm(z_a / T))."""
    mix = FIXED[kind]
    model = Linear()
    task = timm_selfkd.create_task('cskd', model, mixup=mixup(mixup_alpha=0.5), weight=2.0, temperature=3.0)
    assert task.needs.mixup == 'task'
    fix(task.mixer, mix)
    x = images(8, 1)
    labels = [0, 1, 3, 2, 0, 1, 3, 2]  # partner i has anchor i's class
    out = task(x.clone(), torch.tensor(labels))
    anchors, partners = model.seen
    for i in range(4):
        torch.testing.assert_close(anchors[i], mixed_by_hand(x[i], x[3 - i], row(mix, i)))
        torch.testing.assert_close(partners[i], mixed_by_hand(x[4 + i], x[4 + 3 - i], row(mix, i)))
    z_a = (anchors.flatten(1) @ model.weight.t()).tolist()
    z_p = (partners.flatten(1) @ model.weight.t()).tolist()
    ce = soft_ce(z_a, [mixed_label(labels[i], labels[3 - i], row(mix, i).lam) for i in range(4)])
    kd = hand_kd(z_p, z_a, 3.0)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert out['loss'].item() == pytest.approx(ce + 2.0 * kd, rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# DDGSD and ddgsd+dlb
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(FIXED))
def test_ddgsd_views_of_an_image_get_one_mix(kind):
    """Rows (2i, 2i+1) are the views of image i: view v of image i is mixed with view v of image 3-i under one
    lambda/box, both rows get lam y_i + (1 - lam) y_(3-i); loss = ce over the 8 rows + w T^2 (KL(b||a) + KL(a||b))."""
    mix = FIXED[kind]
    model = Linear()
    task = timm_selfkd.create_task('ddgsd', model, mixup=mixup(mixup_alpha=0.5), weight=0.5, temperature=2.0)
    fix(task.mix.shared, mix)
    x = images(8, 2)
    labels = [0, 0, 1, 1, 3, 3, 2, 2]
    out = task(x.clone(), torch.tensor(labels))
    seen, = model.seen
    for image in range(4):
        for view in range(2):
            r, partner = 2 * image + view, 2 * (3 - image) + view
            torch.testing.assert_close(seen[r], mixed_by_hand(x[r], x[partner], row(mix, image)))
    z = (seen.flatten(1) @ model.weight.t()).tolist()
    targets = [mixed_label(labels[2 * (r // 2)], labels[2 * (3 - r // 2)], row(mix, r // 2).lam) for r in range(8)]
    ce = soft_ce(z, targets)
    kd = hand_kd(z[1::2], z[0::2], 2.0) + hand_kd(z[0::2], z[1::2], 2.0)
    assert out['loss_ce'].item() == pytest.approx(ce, rel=1e-5)
    assert out['loss_kd'].item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert out['loss'].item() == pytest.approx(ce + 0.5 * kd, rel=1e-4)


def test_ddgsd_dlb_mixes_both_views_of_an_image_alike():
    """ddgsd+dlb (DLB's `ReplayMixup` on the view rows): a block of whole images pairs row r with row n-1-r, so
    both views of image i go with the two views of one partner image, under one lambda/box; here the first step's
    blocks are rows 0-3 (images 0, 1) and rows 4-7 (images 2, 3). Loss = ce over the rows (first step: no DLB
    teacher yet) + w T^2 (KL(b||a) + KL(a||b))."""
    spec = timm_selfkd.get_method('ddgsd+dlb')
    assert spec.task_cls.requirements(spec.hparams_cls()).mixup == 'task'
    model = Linear()
    task = timm_selfkd.create_task('ddgsd+dlb', model, batch_size=8, mixup=mixup(),
                                   ddgsd={'weight': 0.5, 'temperature': 2.0})
    fix(task.mixer, CUTMIX, MIXUP)  # the head block (rows 0-3), then the tail block (rows 4-7)
    x = images(8, 3)
    labels = [0, 0, 1, 1, 2, 2, 3, 3]
    out = task(x.clone(), torch.tensor(labels))
    seen, = model.seen
    targets = []
    for block, mix in ((0, CUTMIX), (4, MIXUP)):
        for r in range(4):
            partner = block + 3 - r  # the view of the other image of the block
            assert partner // 2 == block // 2 + 1 - (r // 2)
            torch.testing.assert_close(seen[block + r], mixed_by_hand(x[block + r], x[partner], mix))
            targets.append(mixed_label(labels[block + r], labels[partner], mix.lam))
    assert targets[0] == targets[1] and targets[4] == targets[5]  # the two views of an image: one target
    z = (seen.flatten(1) @ model.weight.t()).tolist()
    ce = soft_ce(z, targets)
    kd = hand_kd(z[1::2], z[0::2], 2.0) + hand_kd(z[0::2], z[1::2], 2.0)
    assert out['loss_kd'].item() == 0
    assert out['loss_ddgsd_kd'].item() == pytest.approx(kd, rel=1e-4, abs=1e-6)
    assert out['loss'].item() == pytest.approx(ce + 0.5 * kd, rel=1e-4)


def test_ddgsd_on_a_method_that_takes_mixed_batches_mixes_as_ddgsd():
    """ddgsd+lsrkd (LsrKD takes mixed batches from the loader): the stack mixes the views as DDGSD alone does,
    view v of image i with view v of image 3-i, and hands LsrKD the mixed targets."""
    spec = timm_selfkd.get_method('ddgsd+lsrkd')
    assert spec.task_cls.requirements(spec.hparams_cls()).mixup == 'task'
    model = Linear()
    task = timm_selfkd.create_task('ddgsd+lsrkd', model, mixup=mixup())
    fix(task.layout_mix.shared, CUTMIX)
    x = images(8, 5)
    task(x.clone(), torch.tensor([0, 0, 1, 1, 3, 3, 2, 2]))
    seen = model.seen[0]
    for row in range(8):
        partner = 2 * (3 - row // 2) + row % 2
        torch.testing.assert_close(seen[row], mixed_by_hand(x[row], x[partner], CUTMIX))


# ---------------------------------------------------------------------------------------------------------------------
# PS-KD (and multi_exit's PS-KD switch)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', sorted(FIXED))
def test_pskd_mixes_the_progressive_targets_of_both_images(kind):
    """Epoch 0 (nothing stored: T_j = smoothed y_j) then epoch 1 (a_1 = 0.8 * 2 / 4 = 0.4): image i is mixed with
    image 3-i and trains on lam T_i + (1 - lam) T_(3-i), T_j = 0.6 y_j + 0.4 P[j]; P[j] is the softmax of the
    mixed image that stood in j's row one epoch earlier."""
    mix = FIXED[kind]
    model = Linear()
    task = timm_selfkd.create_task('pskd', model, num_epochs=4, steps_per_epoch=1, num_samples=4, batch_size=4,
                                   mixup=mixup(mixup_alpha=0.5))
    assert task.needs.mixup == 'task' and task.progressive.smoothing == SMOOTHING
    task.train()
    fix(task.progressive.mixer, mix, mix)
    x, labels = images(4, 4), [0, 1, 2, 3]
    task.set_epoch(0)
    out = task(x.clone(), torch.tensor(labels), indices=torch.tensor([0, 1, 2, 3]))
    first = model.seen[0]
    for i in range(4):
        torch.testing.assert_close(first[i], mixed_by_hand(x[i], x[3 - i], row(mix, i)))
    z0 = (first.flatten(1) @ model.weight.t()).tolist()
    assert out['loss'].item() == pytest.approx(
        soft_ce(z0, [mixed_label(labels[i], labels[3 - i], row(mix, i).lam) for i in range(4)]), rel=1e-5)
    stored = {i: torch.tensor(softmax(z0[i])).half().double().tolist() for i in range(4)}  # P[i], fp16

    order = [2, 0, 3, 1]  # the dataset indices of the second batch's rows
    task.set_epoch(1)
    out = task(x[order].clone(), torch.tensor([labels[j] for j in order]), indices=torch.tensor(order))
    second = model.seen[1]
    for r in range(4):
        torch.testing.assert_close(second[r], mixed_by_hand(x[order[r]], x[order[3 - r]], row(mix, r)))
    progressive = {j: [0.6 * y + 0.4 * p for y, p in zip(smooth(labels[j]), stored[j])] for j in range(4)}
    targets = [[row(mix, r).lam * a + (1 - row(mix, r).lam) * b
                for a, b in zip(progressive[order[r]], progressive[order[3 - r]])] for r in range(4)]
    z1 = (second.flatten(1) @ model.weight.t()).tolist()
    assert out['loss'].item() == pytest.approx(soft_ce(z1, targets), rel=1e-4)
    task.memory.flush()
    probs, written = task.memory.lookup(torch.tensor(order))
    assert written.all()
    torch.testing.assert_close(probs, torch.tensor([softmax(z) for z in z1]), atol=1e-3, rtol=0)


def test_multi_exit_pskd_mixes_as_selfkd_pskd():
    """multi_exit with PS-KD alone, CutMix and mixup on: the same draws (NumPy seeded per step, as the loop does)
    give every step the same CE, weights and memory as `--selfkd pskd`."""
    torch.manual_seed(0)
    model = timm.create_model('test_resnet', num_classes=K)
    twin = copy.deepcopy(model)
    run = dict(num_epochs=2, steps_per_epoch=2, num_samples=8, batch_size=4)
    pskd = timm_selfkd.create_task('pskd', model, mixup=mixup(mixup_alpha=0.4, switch_prob=0.5), **run)
    alone = timm_selfkd.create_task('multi_exit', twin, byot=False, dmfl=False, pskd=True,
                                    mixup=mixup(mixup_alpha=0.4, switch_prob=0.5), **run)
    assert alone.needs.mixup == 'task'
    optimizers = [torch.optim.SGD(task.trainable_module.parameters(), lr=0.2) for task in (pskd, alone)]
    generator = torch.Generator().manual_seed(1)
    images_, labels = torch.randn(8, 3, 32, 32, generator=generator), torch.arange(8) % K
    for epoch in range(2):
        order = torch.randperm(8, generator=generator)
        for step in range(2):
            indices = order[step * 4:(step + 1) * 4]
            losses = []
            for task, optimizer in zip((pskd, alone), optimizers):
                task.train()
                task.set_epoch(epoch)
                np.random.seed(100 * epoch + step)
                out = task(images_[indices], labels[indices], indices=indices)
                losses.append(out['loss_ce'])
                optimizer.zero_grad()
                out['loss'].backward()
                optimizer.step()
            torch.testing.assert_close(losses[1], losses[0])
            assert pskd.progressive.mixer.last == alone.progressive.mixer.last
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(twin.state_dict()[name], tensor, msg=name)
    pskd.sync_task_state()
    alone.sync_task_state()
    torch.testing.assert_close(alone.progressive.memory.values, pskd.memory.values, atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# train.py, one epoch each
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('method', ['cskd', 'ddgsd', 'ddgsd+dlb', 'pskd', 'multi_exit'])
def test_train_py_with_mixup_and_cutmix(image_folder, tmp_path, monkeypatch, method):
    """The task mixes every step (mixup probability 1), and the epoch ends with a finite loss."""
    mixes = []
    original = replayed_mixup.mix_block
    monkeypatch.setattr(replayed_mixup, 'mix_block', lambda block, mix: mixes.append(mix) or original(block, mix))
    extra = ['--multi-exit-pskd'] if method == 'multi_exit' else []
    main(train_args(image_folder, tmp_path, '--selfkd', method, '--model', 'resnet18', '--img-size', '32',
                    '--mixup', '0.2', '--cutmix', '1.0', '--smoothing', '0.1', *extra))
    row, = read_summary(tmp_path)
    assert math.isfinite(float(row['train_loss']))
    assert mixes and all(mix.lam < 1 for mix in mixes)


@pytest.mark.parametrize('method, mode', [('cskd', 'elem'), ('ddgsd', 'pair'), ('pskd', 'elem')])
def test_train_py_per_image_modes(image_folder, tmp_path, monkeypatch, method, mode):
    """--mixup-mode pair/elem: the task draws per pair/image, as timm does."""
    mixes = []
    original = replayed_mixup.mix_block
    monkeypatch.setattr(replayed_mixup, 'mix_block', lambda block, mix: mixes.append(mix) or original(block, mix))
    main(train_args(image_folder, tmp_path, '--selfkd', method, '--model', 'resnet18', '--img-size', '32',
                    '--mixup', '0.2', '--cutmix', '1.0', '--mixup-mode', mode))
    assert math.isfinite(float(read_summary(tmp_path)[0]['train_loss']))
    assert mixes and all(isinstance(mix, RowMix) for mix in mixes)


def test_train_py_refuses_per_image_modes_for_ddgsd_dlb_in_one_line(image_folder, tmp_path, capsys):
    """DLB mixes the stack's batch itself, one lambda/box per block: in pair/elem mode the two views of an image
    would fall into different pairs, so the stack refuses them in one line (DLB alone refuses them too)."""
    output = tmp_path / 'out'
    with pytest.raises(SystemExit) as exc:
        main(train_args(image_folder, output, '--selfkd', 'ddgsd+dlb', '--img-size', '32', '--cutmix', '1.0',
                        '--mixup-mode', 'pair'))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ddgsd+dlb with --mixup-mode pair: dlb mixes the batch itself' in err[0], err
    assert not output.exists()


@pytest.mark.parametrize('method', ['cskd', 'ddgsd', 'pskd'])
def test_mixed_run_resumes_exactly_from_a_recovery_checkpoint(tmp_path, method):
    """The mix is drawn from the per-step seeds (no mix is kept): a run resumed mid-epoch from a recovery
    checkpoint ends bit-identical to the uninterrupted one."""
    from conftest import write_image_folder
    from test_preemption import assert_weights_equal, rows, run_args
    data = tmp_path / 'data'
    write_image_folder(str(data / 'train'), 16, seed=0)
    write_image_folder(str(data / 'validation'), 4, seed=1)
    mix = ('--cutmix', '1.0', '--mixup', '0.4', '--mixup-prob', '0.7', '--smoothing', '0.1')
    main(run_args(str(data), tmp_path, 'full', method, 0, '--recovery-interval', '3', *mix))
    recovery = sorted(f for f in (tmp_path / 'full').iterdir() if f.name.startswith('recovery-'))[0]
    main(run_args(str(data), tmp_path, 'mid', method, 0, '--resume', str(recovery), *mix))
    first_epoch = int(recovery.name.split('-')[1])
    assert rows(tmp_path / 'mid') == rows(tmp_path / 'full')[first_epoch:]
    assert_weights_equal(tmp_path / 'mid', tmp_path / 'full')
