"""The method guide and the charts (benchmarks/charts.py, evidence.py, guide.py, label_placement.py): the results
files read back as the benchmarks wrote them, the top-1 changes and comparison times against hand-computed values,
the README's guide as the rendering of the committed results, every method and stack in it, and labels that do
not overlap."""
import csv
import sys
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'benchmarks'))
import accuracy  # noqa: E402
import charts  # noqa: E402
import evidence  # noqa: E402
import guide  # noqa: E402
import overhead  # noqa: E402
from compat_matrix import matrix_methods  # noqa: E402
from timm_selfkd.cost.measure import MethodRun, Result  # noqa: E402

RUNS_FILES = sorted(evidence.RESULTS.glob('*_runs.csv'))


def test_readme_guide_is_the_rendering_of_the_committed_results():
    """After a benchmark's results change, `python benchmarks/charts.py` rewrites the README's guide."""
    assert charts.main(['--check']) == 0


def test_check_finds_a_stale_guide_and_missing_markers(tmp_path, capsys):
    readme = tmp_path / 'README.md'
    readme.write_text('intro\n<!-- guide -->\nold\n<!-- /guide -->\nrest\n')
    assert charts.main(['--check', '--readme', str(readme)]) == 1
    assert 'is not the rendering' in capsys.readouterr().err
    readme.write_text('no markers\n')
    assert charts.main(['--check', '--readme', str(readme)]) == 2
    assert capsys.readouterr().err.strip() == \
        'benchmarks/charts.py: error: no <!-- guide --> ... <!-- /guide --> markers'


@pytest.mark.parametrize('runs_file', RUNS_FILES, ids=lambda path: path.stem)
def test_recorded_runs_give_back_the_committed_tables(runs_file, tmp_path):
    """A benchmark read back from its runs CSV matches plain runs at equal images as it did when it ran: its
    tables, written again, are the committed ones line for line."""
    args, rows = accuracy.recorded_benchmark(runs_file)
    args.recipe = REPO / 'configs' / 'demo_fashion_mnist.yaml'
    runner = accuracy.RecordedRunner(accuracy.read_runs_csv(runs_file))
    accuracy.write_markdown(tmp_path / 'tables.md', args, [], rows, runner)
    table = [line for line in (tmp_path / 'tables.md').read_text().splitlines() if line.startswith('| ')]
    committed = runs_file.with_name(runs_file.name.replace('_runs.csv', '.md')).read_text().splitlines()
    assert table == [line for line in committed if line.startswith('| ')]


def test_every_method_and_stack_is_in_the_chart_and_the_guide():
    costs = evidence.step_costs()
    for name in charts.PANELS:
        assert set(evidence.setting(name, costs)) == set(matrix_methods()) - {'none'}, name


def _write_runs(path, runs):
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in fields(accuracy.Run)])
        writer.writeheader()
        writer.writerows(asdict(run) for run in runs)


def _run(method, seed, epochs, top1, steps, error=''):
    return accuracy.Run(method, 0.0, seed, epochs, top1=top1, best=top1, images=steps * 10., steps=steps,
                        error=error)


def test_changes_and_comparison_times_by_hand(tmp_path):
    """DLB reads every image twice per epoch (twice the steps); LsrKD once; USKD's seed 1 failed."""
    runs = [_run('none', 0, 4, 70., 100), _run('dlb', 0, 4, 74., 200), _run('none', 0, 8, 75., 200),
            _run('lsrkd', 0, 4, 71., 100), _run('uskd', 0, 4, 73., 100),
            _run('none', 1, 4, 72., 100), _run('dlb', 1, 4, 75., 200), _run('none', 1, 8, 77., 200),
            _run('lsrkd', 1, 4, 71., 100), _run('uskd', 1, 4, float('nan'), 0, error='loss is nan')]
    _write_runs(tmp_path / 'a_runs.csv', runs)
    costs = {'dlb': evidence.StepCost(1.1, 0.9, 1.2), 'lsrkd': evidence.StepCost(1.0, 0.95, 1.05),
             'uskd': evidence.StepCost(1.02, 1.0, 1.04)}
    found = evidence.measured([tmp_path / 'a_runs.csv'], costs)
    assert list(found) == ['dlb', 'lsrkd', 'uskd']
    dlb = found['dlb']
    assert dlb.reads_more and dlb.seeds == 2
    # equal epochs: 74.5 - 71 over plain's 4 epochs, in 200 / 100 x 1.1 of its time
    assert dlb.equal_epochs.delta == pytest.approx(3.5) and dlb.equal_epochs.per_seed == pytest.approx([4, 3])
    assert (dlb.equal_epochs.time, dlb.equal_epochs.time_low, dlb.equal_epochs.time_high) == \
        pytest.approx((2.2, 1.8, 2.4))
    # equal images: 74.5 - 76 over plain's 8 epochs, same steps
    assert dlb.equal_images.delta == pytest.approx(-1.5) and dlb.equal_images.per_seed == pytest.approx([-1, -2])
    assert dlb.equal_images.time == pytest.approx(1.1)
    lsrkd = found['lsrkd']
    assert not lsrkd.reads_more and lsrkd.equal_images == lsrkd.equal_epochs
    assert lsrkd.equal_images.delta == pytest.approx(0) and lsrkd.equal_images.per_seed == pytest.approx([1, -1])
    uskd = found['uskd']  # equal epochs: 73 - 71 (both plain seeds); equal images: 73 - 70 (seed 0's plain only)
    assert uskd.equal_epochs.delta == pytest.approx(2) and uskd.equal_epochs.per_seed == pytest.approx([3])
    assert uskd.equal_images.delta == pytest.approx(3) and uskd.equal_images.per_seed == pytest.approx([3])
    assert guide.evidence_cell(dlb) == '-1.50 [-2.00, -1.00]; equal epochs +3.50 [+3.00, +4.00]'
    assert guide.evidence_cell(uskd) == '+3.00 (1 of 2 seeds failed)'
    assert guide.cost_cell(costs['dlb'], dlb) == '1.10x per step, 2.2x per epoch'
    del costs['lsrkd']
    with pytest.raises(ValueError, match='lsrkd has accuracy runs in a_runs.csv but no step time'):
        evidence.measured([tmp_path / 'a_runs.csv'], costs)


def test_runs_csv_round_trip(tmp_path):
    runs = [_run('none', 0, 4, 70.25, 100), _run('dlb', 1, 4, float('nan'), 0, error='stopped: loss is nan')]
    _write_runs(tmp_path / 'runs.csv', runs)
    back = accuracy.read_runs_csv(tmp_path / 'runs.csv')
    assert back[0] == runs[0] and back[1].error == runs[1].error and back[1].top1 != back[1].top1
    assert isinstance(back[0].seed, int) and isinstance(back[0].top1, float)


def test_step_costs_read_what_the_overhead_benchmark_writes(tmp_path):
    args = overhead.parse_args(['--methods', 'none,dlb,self_guidance:skip_dropped=false', '--steps', '4'])
    times = {'none': np.array([1., 1., 2., 2.]), 'dlb': np.array([1., 2., 3., 4.]),
             'self_guidance:skip_dropped=false': np.array([2., 2., 4., 4.])}
    results = {label: Result(MethodRun(label, label.split(':')[0]), times=value, peak_bytes=100, steps_per_epoch=1)
               for label, value in times.items()}
    table = overhead.report(args, results)
    (tmp_path / 'overhead.md').write_text('# title\n\n- a line\n\n' + table)
    costs = evidence.read_step_costs(tmp_path / 'overhead.md')
    assert list(costs) == ['none', 'dlb', 'self_guidance:skip_dropped=false']
    # dlb / none per round: 1, 2, 1.5, 2 -> median 1.75, quartiles 1.375 and 2
    assert (costs['dlb'].ratio, costs['dlb'].low, costs['dlb'].high) == pytest.approx((1.75, 1.375, 2.0), abs=1e-3)
    assert costs['self_guidance:skip_dropped=false'].ratio == pytest.approx(2.0)


def test_markdown_table_reader(tmp_path):
    path = tmp_path / 't.md'
    path.write_text('text | not a table\n\n| a | b |\n|---|--:|\n| x | 1 |\n| y | 2 |\n\n'
                    '| a | c |\n|---|---|\n| z | 3 |\n')
    assert evidence.read_markdown_table(path, 'a') == {'x': {'a': 'x', 'b': '1'}, 'y': {'a': 'y', 'b': '2'}}
    with pytest.raises(ValueError, match='no table with a first column "method"'):
        evidence.read_markdown_table(path, 'method')


def test_labels_of_a_crowded_scatter_do_not_overlap(tmp_path):
    plt = pytest.importorskip('matplotlib.pyplot')
    from matplotlib.text import Text
    from label_placement import place_labels
    jitter = np.random.default_rng(0).uniform(-0.03, 0.03, (30, 2))  # a crowded grid, 15-25 pixels apart
    points = [(0.25 * (i % 6) + dx, 0.25 * (i // 6) + dy) for i, (dx, dy) in enumerate(jitter)] + [(2., 2.), (2., 2.)]
    figure, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(*zip(*points), 'o')
    ax.set_xlim(-2, 3)
    ax.set_ylim(-2, 3)
    annotations = place_labels(ax, points, [f'm{i}' for i in range(len(points))], fontsize=8)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, renderer) for a in annotations]  # the text, without its leader line
    frame = ax.get_window_extent(renderer)
    assert len(annotations) == 31  # the two points drawn on top of each other share a label
    assert any(a.get_text() == 'm30, m31' for a in annotations)
    for i, box in enumerate(boxes):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert not any(box.overlaps(other) for other in boxes[i + 1:])
        assert not any(box.contains(*ax.transData.transform(point)) for point in points)
    plt.close(figure)


def test_gain_vs_cost_chart(tmp_path):
    pytest.importorskip('matplotlib')
    costs = evidence.step_costs()
    charts.gain_vs_cost_chart(tmp_path / 'chart.png', {name: evidence.setting(name, costs) for name in charts.PANELS})
    assert (tmp_path / 'chart.png').stat().st_size > 50000
