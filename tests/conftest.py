"""Shared fixtures: tiny image-folder data sets written to a temporary directory (no network); plain-math
references shared by the loss tests; training steps and checkpoint restores shared by the method tests; the recorder
of the compatibility-matrix cells (`--matrix-json`)."""
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

# the benchmarks' helpers (e.g. the matrix renderer) are scripts, not part of the installed package
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
from compat_matrix import merge_results  # noqa: E402

# One intra-op thread in the tests and in the processes they start (train.py, torchrun ranks): their kernels are
# tiny, and on a busy 2-core machine two threads mostly spin waiting for each other (the every-method resume test
# of test_preemption.py took 396 s of CPU with two threads and 17 s with one, at load average 5).
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

NUM_CLASSES = 4
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 4


def checked_hparams(method, **values):
    """A method's hyper-parameters built and checked as the command line, recipes and `create_task` build them."""
    from timm_selfkd.registry import build_hparams, get_method
    return build_hparams(get_method(method), values)


def write_image_folder(root, per_class, num_classes=NUM_CLASSES, size=32, seed=0):
    """Class k's images are noisy versions of one colour, so a model can learn them quickly."""
    rng = np.random.default_rng(seed)
    for label, count in enumerate(per_class if isinstance(per_class, list) else [per_class] * num_classes):
        folder = os.path.join(root, f'class_{label}')
        os.makedirs(folder, exist_ok=True)
        colour = np.array([(label * 67) % 256, (label * 131) % 256, (label * 29 + 90) % 256])
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """`train/` with 4 classes x 8 images and `validation/` with 4 x 4, 32x32 RGB PNGs."""
    root = tmp_path_factory.mktemp('images')
    write_image_folder(str(root / 'train'), TRAIN_PER_CLASS, seed=0)
    write_image_folder(str(root / 'validation'), VAL_PER_CLASS, seed=1)
    return str(root)


@pytest.fixture(scope='session')
def small_image_folder(tmp_path_factory):
    """`train/` with 4 classes x 8 images (4 plain steps of 8 per epoch; DLB's epoch 0: 7) and `validation/` with
    4 x 2, 32x32 RGB PNGs: the short runs of the robustness and run-folder tests."""
    root = tmp_path_factory.mktemp('small_images')
    write_image_folder(str(root / 'train'), 8, seed=0)
    write_image_folder(str(root / 'validation'), 2, seed=1)
    return str(root)


# The six model families of the sub-network methods at small sizes: (timm name, create_model kwargs, image size).
# Residual branches start non-zero (timm zero-initialises ResNet's last BN and scales ConvNeXt's by 1e-6), so that
# dropping a block changes the output from the first step.
SMALL_FAMILIES = {
    'resnet': ('resnet18', {'zero_init_last': False}, 32),
    'resnext': ('resnext50_32x4d', {'layers': (1, 1, 1, 1), 'zero_init_last': False}, 32),
    'efficientnet': ('efficientnet_b0', {}, 32),
    'convnext': ('convnext_atto', {'ls_init_value': 1.0}, 32),
    'swin': ('swin_tiny_patch4_window7_224', {'img_size': 64, 'embed_dim': 24, 'depths': (2, 2, 2, 2),
                                              'num_heads': (1, 2, 2, 4), 'window_size': 4, 'drop_path_rate': 0.},
             64),
    'vit': ('vit_tiny_patch16_224', {'img_size': 32, 'patch_size': 8, 'depth': 4}, 32),
}


def small_model(family, seed=0, **kwargs):
    """A seeded small model of one of `SMALL_FAMILIES` with NUM_CLASSES classes, and its image size."""
    import timm
    import torch
    name, family_kwargs, size = SMALL_FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=NUM_CLASSES, **{**family_kwargs, **kwargs}), size


def train_steps(task, x, y, steps=2, lr=0.05):
    """`steps` SGD steps of the task's trainable module on one batch; returns the last step's output."""
    optimizer = torch.optim.SGD(task.trainable_module.parameters(), lr=lr)
    for _ in range(steps):
        out = task(x, y)
        optimizer.zero_grad()
        out['loss'].backward()
        optimizer.step()
    return out


def restored_task(method, state, ema_state, seed=1):
    """A new `method` task on a test_resnet of another seed, with an EMA, loaded from a task's checkpoint state and
    its EMA checkpoint state (`get_checkpoint_state()`, `get_checkpoint_state(ema=True)`)."""
    import timm
    import timm_selfkd
    torch.manual_seed(seed)
    task = timm_selfkd.create_task(method, timm.create_model('test_resnet', num_classes=NUM_CLASSES))
    task.setup_ema(decay=0.5)
    task.load_checkpoint_state(state['state_dict'], copy.deepcopy(state['task_state']))
    task.load_checkpoint_state(ema_state['state_dict_ema'], copy.deepcopy(ema_state['task_state_ema']), ema=True)
    return task


def runs_without_and_with_checkpointing(method, step):
    """`step(task)` for a `method` task on a seeded test_resnet without, then with timm's gradient checkpointing, set
    before the task wraps the model (as train.py does)."""
    import timm
    import timm_selfkd
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model('test_resnet', num_classes=NUM_CLASSES)
        model.set_grad_checkpointing(checkpointing)
        results.append(step(timm_selfkd.create_task(method, model).train()))
    return results


def epoch_lrs(argv, processes=1, updates_per_epoch=2):
    """The lr every epoch of a run starts with, scheduled as train.py's `Setup` and loop do: timm's scheduler built
    from the parsed command line (`create_scheduler_v2(**scheduler_kwargs(args))`) over an optimizer at the run's lr
    (timm's --lr-base rule at `processes` processes when there is no --lr), stepped to `num_updates` after each of the
    epoch's `updates_per_epoch` updates (per-update schedules, --sched-on-updates) and to `epoch + 1` after each
    epoch (per-epoch schedules; each step is a no-op for the other kind)."""
    from timm.scheduler import create_scheduler_v2, scheduler_kwargs
    from timm_selfkd.cli import parse_args
    from timm_selfkd.train import _resolve_lr
    args = parse_args(argv)
    args.world_size = processes
    _resolve_lr(args)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.lr)
    scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args),
                                                updates_per_epoch=updates_per_epoch)
    lrs = []
    for epoch in range(num_epochs):
        lrs.append(optimizer.param_groups[0]['lr'])
        for update in range(1, updates_per_epoch + 1):
            scheduler.step_update(epoch * updates_per_epoch + update)
        scheduler.step(epoch + 1)
    return lrs


def log_softmax_row(row, temperature=1.0):
    """log softmax(row / T) of a list of floats, in plain math."""
    scaled = [v / temperature for v in row]
    top = max(scaled)
    log_total = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_total for v in scaled]


def hand_ce(rows, labels):
    """mean_i -log softmax(z_i)[y_i], in plain math."""
    return -sum(log_softmax_row(z)[y] for z, y in zip(rows, labels)) / len(labels)


def hand_kd(teacher_rows, student_rows, temperature):
    """T^2 * mean_i KL(softmax(t_i / T) || softmax(z_i / T)) from teacher and student logit rows, in plain math."""
    total = 0.0
    for t, z in zip(teacher_rows, student_rows):
        log_q, log_p = log_softmax_row(t, temperature), log_softmax_row(z, temperature)
        total += sum(math.exp(lq) * (lq - lp) for lq, lp in zip(log_q, log_p))
    return temperature ** 2 * total / len(teacher_rows)


def pytest_addoption(parser):
    parser.addoption('--matrix-json', metavar='FILE', default=None,
                     help='record the compatibility-matrix cells the tests check into FILE (merged into it), for '
                          '`python benchmarks/compat_matrix.py`')


class MatrixCells:
    """The matrix cells one test checks. `expect` names them before the run (passed unless the test fails),
    `refused` records a one-line refusal and its reason, `note` adds a remark to a passed cell, `failed` marks a
    cell failed whatever the test's outcome."""

    def __init__(self):
        self.cells = {}

    def expect(self, method, *cells):
        for cell in cells:
            self.cells.setdefault((method, cell), {'outcome': 'passed'})

    def refused(self, method, cell, reason):
        self.cells[(method, cell)] = {'outcome': 'refused', 'reason': reason}

    def note(self, method, cell, text):
        self.cells[(method, cell)] = {'outcome': 'passed', 'note': text}

    def failed(self, method, cell, reason):
        self.cells[(method, cell)] = {'outcome': 'failed', 'reason': reason}


_MATRIX_CELLS = pytest.StashKey()
_MATRIX_RESULTS = pytest.StashKey()


@pytest.fixture
def matrix(request):
    """Records the test's matrix cells with its outcome (a failed test fails its cells; a skipped one records none)."""
    cells = MatrixCells()
    request.node.stash[_MATRIX_CELLS] = cells
    return cells


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    cells = item.stash.get(_MATRIX_CELLS, None)
    if cells is None or report.skipped or not (report.when == 'call' or report.failed):
        return
    results = item.config.stash.setdefault(_MATRIX_RESULTS, {})
    for key, record in cells.cells.items():
        if report.failed:
            record = {'outcome': 'failed', 'reason': f'{item.nodeid} failed'}
        if results.get(key, {}).get('outcome') != 'failed':  # a cell checked twice fails if either check fails
            results[key] = record


def pytest_sessionfinish(session):
    path = session.config.getoption('--matrix-json')
    results = session.config.stash.get(_MATRIX_RESULTS, {})
    if path and results:
        merge_results(path, results)
