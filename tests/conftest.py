"""Shared fixtures: tiny image-folder data sets written to a temporary directory (no network); the recorder of
the compatibility-matrix cells (`--matrix-json`)."""
import os

import numpy as np
import pytest
from PIL import Image

from timm_selfkd.tools.matrix import merge_results

NUM_CLASSES = 4
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 4


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


def pytest_addoption(parser):
    parser.addoption('--matrix-json', metavar='FILE', default=None,
                     help='record the compatibility-matrix cells the tests check into FILE (merged into it), for '
                          '`python -m timm_selfkd.tools.matrix`')


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
