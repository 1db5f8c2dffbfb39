"""benchmarks/accuracy.py without training: which plain runs match each method's images, and the report."""
import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('accuracy_benchmark', os.path.join(REPO, 'benchmarks', 'accuracy.py'))
accuracy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accuracy)

IMAGES_PER_EPOCH = {'none': 100, 'dlb': 190, 'bake': 200}


class FakeRunner(accuracy.Runner):
    """Images as the methods read them; top-1 = 50 + epochs + seed (+ 2 for a method, - 10 per noise unit)."""

    def run(self, method, noise, seed, epochs):
        key = (method, noise, seed, epochs)
        if key not in self.runs:
            top1 = 50 + epochs + seed + 2 * (method != 'none') - 10 * noise
            self.runs[key] = accuracy.Run(method, noise, seed, epochs, top1=top1, best=top1,
                                          images=IMAGES_PER_EPOCH[method] * epochs, steps=epochs * 10,
                                          train_time=epochs * 3.0)
        return self.runs[key]


def test_plain_runs_at_equal_images(tmp_path):
    args, extra = accuracy.parse_args(['--methods', 'dlb,bake', '--seeds', '0', '1', '--epochs', '3',
                                       '--train-label-noise', '0', '0.4', '--output-dir', str(tmp_path)])
    runner = FakeRunner(args, extra)
    rows = accuracy.benchmark(args, runner)
    # DLB: 570 images in 3 epochs = 5.7 plain epochs -> 6; BAKE: 600 -> 6; plain itself: 3 (its own images)
    plain_epochs = sorted({epochs for method, _, _, epochs in runner.runs if method == 'none'})
    assert plain_epochs == [3, 6]
    assert len(runner.runs) == 2 * 2 * (1 + 2 + 1)  # noise levels x seeds x (plain, 2 methods, plain at 6)
    by_method = {(noise, method): (runs, matched) for noise, method, runs, matched in rows}
    runs, matched = by_method[(0.4, 'dlb')]
    assert [r.seed for r in runs] == [0, 1] and all(r.noise == 0.4 for r in runs)
    assert [(r.method, r.epochs, r.seed) for r in matched] == [('none', 6, 0), ('none', 6, 1)]

    accuracy.write_markdown(tmp_path / 'report.md', args, extra, rows, runner)
    report = (tmp_path / 'report.md').read_text()
    # dlb: 55.5 +- 0.71 at 3 epochs vs plain 53.5 at 3 epochs and 56.5 at 6 epochs (clean labels)
    assert '| dlb | 55.50 ± 0.71 | +2.00 | 570 | 30 | 9 | 6 | 56.50 ± 0.71 | -1.00 |' in report
    assert '## Training label noise 0.4' in report
    assert report.count('| none | 0.4 |') == 4  # every run is listed


def test_equal_image_epochs_rounds_to_the_nearest_epoch():
    assert accuracy.equal_image_epochs(570, 100) == 6
    assert accuracy.equal_image_epochs(540, 100) == 5
    assert accuracy.equal_image_epochs(10, 100) == 1


def test_bad_options_are_refused():
    with pytest.raises(SystemExit):
        accuracy.parse_args(['--methods', 'dbl'])
    with pytest.raises(SystemExit):
        accuracy.parse_args(['--train-label-noise', '1.0'])


def test_chart(tmp_path):
    pytest.importorskip('matplotlib')
    args, extra = accuracy.parse_args(['--methods', 'dlb', '--seeds', '0', '1', '--epochs', '2',
                                       '--train-label-noise', '0', '0.2', '--output-dir', str(tmp_path)])
    runner = FakeRunner(args, extra)
    assert accuracy.plot_chart(tmp_path / 'chart.png', args, accuracy.benchmark(args, runner))
    assert (tmp_path / 'chart.png').stat().st_size > 10000
