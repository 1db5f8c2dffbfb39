"""The README's "Your own training loop" script trains every registered method and a stack, and `create_task`
names what a method needs and was not given."""
import os
import re
import subprocess
import sys

import pytest
import timm
import torch

import timm_selfkd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_script() -> str:
    with open(os.path.join(REPO, 'README.md')) as f:
        block = re.search(r'<!-- custom-loop -->\n```python\n(.*?)```\n<!-- /custom-loop -->', f.read(), re.S)
    assert block, 'README.md has no custom-loop block'
    return block.group(1)


def test_the_script_uses_neither_our_loop_nor_the_adapter():
    script = readme_script()
    assert 'timm_selfkd.train' not in script and 'upstream' not in script and 'attach' not in script
    assert 'DataLoader(' in script and 'optimizer.step()' in script


LOOP_METHODS = timm_selfkd.list_methods() + ['ddgsd+dlb']

# the README's test command runs the tests on two workers: this module's one training run stays on one of them
pytestmark = pytest.mark.xdist_group('custom_loop')

# Runs the README's script as `python loop.py METHOD` once per method, in one interpreter (one start of torch and
# timm instead of one per method); a method that fails prints its traceback's last line and the others go on.
DRIVER = """
import runpy, sys, traceback
for method in sys.argv[1:]:
    sys.argv = ['loop.py', method]
    try:
        runpy.run_path('loop.py', run_name='__main__')
    except BaseException:
        print(f'{method} FAILED: ' + traceback.format_exc().strip().splitlines()[-1])
"""


@pytest.fixture(scope='module')
def loop_output(tmp_path_factory):
    """stdout lines of the README's script, by method."""
    folder = tmp_path_factory.mktemp('custom_loop')
    (folder / 'loop.py').write_text(readme_script())
    result = subprocess.run([sys.executable, '-c', DRIVER, *LOOP_METHODS], cwd=folder, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {}
    for line in result.stdout.strip().splitlines():
        lines.setdefault(line.split(' ')[0], []).append(line)
    return lines


@pytest.mark.parametrize('method', LOOP_METHODS)
def test_readme_loop_trains_every_method(method, loop_output):
    lines = loop_output.get(method, [])
    assert [line.split(':')[0] for line in lines] == [f'{method} epoch 0', f'{method} epoch 1'], lines
    losses = [float(re.search(r'\bloss (\S+)', line).group(1)) for line in lines]
    assert all(torch.isfinite(torch.tensor(losses)))


def _model():
    return timm.create_model('resnet18', num_classes=4)


@pytest.mark.parametrize('method, missing', [('pskd', 'num_epochs'), ('mrkd', 'steps_per_epoch'),
                                             ('dlb', 'batch_size'), ('multi_exit', 'num_samples')])
def test_a_missing_fact_is_a_value_error_naming_the_argument(method, missing):
    facts = dict(num_epochs=2, steps_per_epoch=4, num_samples=32, batch_size=8)
    facts.pop(missing)
    hparams = {'pskd': True} if method == 'multi_exit' else {}
    with pytest.raises(ValueError, match=rf"^create_task\('{method}'\) needs {missing}=\.\.\. \("):
        timm_selfkd.create_task(method, _model(), **facts, **hparams)


def test_sample_indices_not_given_is_a_value_error_saying_how():
    task = timm_selfkd.create_task('pskd', _model(), num_epochs=2, num_samples=8)
    with pytest.raises(ValueError, match=r'task\(images, labels, indices=\.\.\.\)'):
        task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_given_indices_and_epoch_reach_the_method(monkeypatch):
    task = timm_selfkd.create_task('pskd', _model(), num_epochs=4, num_samples=8)
    epochs = []
    soft_targets = task.progressive.soft_targets
    monkeypatch.setattr(task.progressive, 'soft_targets', lambda *a: epochs.append(a[-1]) or soft_targets(*a))
    task.set_epoch(3)
    task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), indices=torch.tensor([5, 6]))
    task.progressive.sync()
    assert epochs == [3]
    assert task.progressive.memory.lookup(torch.tensor([5, 6, 0]))[1].tolist() == [True, True, False]


def test_mixup_reaches_a_method_that_mixes_itself_and_soft_targets_the_others():
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    mixup = Mixup(mixup_alpha=1.0, num_classes=4)
    cskd = timm_selfkd.create_task('cskd', _model(), batch_size=8, mixup=mixup)
    assert cskd.needs.mixup == 'task' and cskd.run.mixup is mixup
    bake = timm_selfkd.create_task('bake', _model(), mixup=mixup)
    assert bake.needs.mixup == 'loader' and bake.run.mixup is None
    assert isinstance(bake.criterion, SoftTargetCrossEntropy)  # the loop's mixed targets are soft


def test_the_batch_sampler_is_the_method_s():
    dlb = timm_selfkd.create_task('dlb', _model(), batch_size=8)
    batches = list(timm_selfkd.batch_sampler(dlb, [0, 1, 2, 3] * 8, 8))
    assert all(len(b) == 8 for b in batches) and batches[1][:4] == batches[0][4:]  # the repeated half
    plain = timm_selfkd.create_task('none', _model())
    batches = list(timm_selfkd.batch_sampler(plain, [0, 1, 2, 3] * 8, 8))
    assert len(batches) == 4 and sorted(i for b in batches for i in b) == list(range(32))
