"""The README's "Which method?" tables: for each question a user asks, the methods that answer it, with what their
papers report (typed here, with paper, table and row) beside what our benchmarks measured (read from the results
files by `benchmarks/evidence.py`). `python benchmarks/charts.py` writes them into the README; a test checks that
the README holds their rendering of the committed results.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from evidence import RESULTS, Change, Evidence, StepCost, read_markdown_table

NEARLY_FREE = 1.05  # step time over plain training's
CALIBRATION_FILE = 'pskd_topk_fashion_mnist.md'  # benchmarks/pskd_topk.py: plain and PS-KD, NLL and ECE
SETTING_NAMES = {'demo': 'ours, demo recipe', 'modern': 'ours, modern recipe',
                 'noise0.4': 'ours, 40 % of the training labels wrong'}


@dataclass
class Row:
    """A method in a question's table: `--selfkd` spec as shown, what its paper reports, the overhead row of its
    cost (default: the method) and the accuracy runs that measured it (None: not measured as shown)."""
    shown: str
    paper: str
    method: Optional[str]
    cost: Optional[str] = None


@dataclass
class Question:
    title: str
    lead: str
    rows: Sequence[Row]
    settings: Tuple[str, ...] = ('demo', 'modern')


QUESTIONS = [
    Question(
        'CNNs: the largest reported gains',
        'Each paper against its own baseline, on its own data and schedule (CIFAR: 200-300 epochs; ImageNet: '
        '100): the rows do not compare with each other. The paper text of the second-wave methods (MixSKD, DKS, '
        'Zipf\'s LS, USKD, R-Drop, FRSKD) is not available to this project: their rows cite the official code\'s '
        'README, as our recipes in `configs/` do.',
        [Row('`self_guidance`', 'ResNet-110, CIFAR-100: error 26.18 -> 21.60, +4.6 (Zheng & Peng, table 1)',
             'self_guidance'),
         Row('`multi_exit --multi-exit-pskd` (PS-KD + BYOT + DMFL)', 'ResNet-50, CIFAR-100: error 21.96 -> '
             '17.52, +4.4 (Chottananurak et al., table 1, rows 9 and 16)', None, 'multi_exit:pskd=true'),
         Row('`mixskd`', 'ResNet-18, CIFAR-100: 76.24 -> 80.32, +4.1 (official Self-KD-Lib README; paper text '
             'not available)', 'mixskd'),
         Row('`dlb`', 'VGG-19, CIFAR-100: error 27.16 -> 24.53, +2.6; TinyImageNet +3.3 (Shen et al., table 2; '
             'DLB at half the epochs, i.e. equal images)', 'dlb'),
         Row('`dks`', 'ResNet-18, ImageNet: 68.94 -> 71.32, +2.4 (official README\'s ImageNet table; paper text '
             'not available)', 'dks'),
         Row('`zipfls`', 'ResNet-18, CIFAR-100: 75.51 -> 77.38, +1.9 (official README, main results; paper text '
             'not available)', 'zipfls'),
         Row('`pskd`', 'ResNet-18, CIFAR-100: error 21.41 -> 19.94, +1.5 (Chottananurak et al., table 1, rows 1 '
             'and 4)', 'pskd'),
         Row('`bake`', 'ResNet-50, ImageNet: 76.8 -> 78.0, +1.2, at +3.7 % GPU time per step (Ge et al., '
             'table 2)', 'bake')]),
    Question(
        'ViT and Swin: the largest reported gains',
        'Of the papers and official code this project could check, only these report gains on a ViT or a Swin. '
        'None of our accuracy runs trains a transformer (ConvNeXt-Atto under the modern recipe, one seed, is the '
        'nearest: `benchmarks/results/accuracy_modern_convnext_atto.md`).',
        [Row('`bake`', 'Swin-T, ImageNet: 81.3 -> 82.0, +0.7, at +1.5 % GPU time per step; Swin-B +0.4 (Ge et '
             'al., table 3)', 'bake'),
         Row('`uskd`', 'DeiT-Tiny, ImageNet: 74.42 -> 74.97, +0.55; Swin-T 81.18 -> 81.49, +0.31 (official '
             'README\'s table; paper text not available)', 'uskd'),
         Row('`rdrop`', 'ViT-B/16 fine-tuned on ImageNet: 83.97 -> 84.38, +0.4 (the paper\'s table as our recipe '
             'recalls it: not checked against a paper text)', 'rdrop')]),
    Question(
        'Noisy labels',
        'Symmetric noise: a fraction of the training labels replaced by random classes, the validation labels '
        'clean (`--train-label-noise`). Of the papers this project has, only DLB\'s measures label noise.',
        [Row('`dlb`', 'CIFAR-100: +2.4 at 10 % noise, rising to +4.4 at 60 % (Shen et al., fig. 2, sec. 4.4)',
             'dlb'),
         Row('`bake`', 'no label-noise result (robustness to corrupted images: ImageNet-C, table 9)', 'bake'),
         Row('`multi_exit`', 'no label-noise result', 'multi_exit')],
        ('noise0.4',)),
    Question(
        'Small data',
        'Our own runs are small-data runs (4000 Fashion-MNIST images, 10 classes). The papers\' small sets are '
        'fine-grained: CUB-200-2011 has about 30 training images per class.',
        [Row('`bake`', 'ResNet-18, CUB-200-2011: error 46.00 -> 29.74, +16.3; Stanford Dogs +6.1; MIT67 +4.8 '
             '(Ge et al., table 8)', 'bake'),
         Row('`cskd`', 'ResNet-18, CUB-200-2011: error 46.00 -> 33.28, +12.7 (Ge et al., table 8)', 'cskd'),
         Row('`multi_exit` (ours: BYOT + DMFL, its default)', 'BYOT alone (`--no-multi-exit-dmfl`), ResNet-18, '
             'CUB-200-2011: error 46.00 -> 40.76, +5.2 (Ge et al., table 8)', 'multi_exit'),
         Row('`ddgsd`', 'ResNet-18, CUB-200-2011: error 46.00 -> 41.17, +4.8 (Ge et al., table 8)', 'ddgsd')]),
    Question(
        'Calibration',
        'Every run logs NLL, ECE and AURC (`eval_nll`, `eval_ece`, `eval_aurc` in its `summary.csv`); the '
        'accuracy benchmark keeps only top-1, so PS-KD against plain training '
        '(`benchmarks/pskd_topk.py`: 6 epochs on 2000 Fashion-MNIST images, 2 seeds) is our one calibration '
        'measurement.',
        [Row('`pskd`', 'ResNet-18, CIFAR-100: ECE 5.14 -> 4.21 %, NLL 0.87 -> 0.79 (Chottananurak et al., table '
             '1, rows 1 and 4)', 'pskd'),
         Row('`multi_exit --multi-exit-pskd` (PS-KD + BYOT + DMFL)', 'ResNet-18, CIFAR-100: ECE 5.14 -> 4.15 %, '
             'NLL 0.87 -> 0.72 (table 1, row 8)', None, 'multi_exit:pskd=true'),
         Row('`multi_exit` (BYOT + DMFL)', 'ResNet-18, CIFAR-100: ECE 5.14 -> 11.74 %, NLL 0.87 -> 1.02: worse '
             '(table 1, row 7)', None, 'multi_exit')],
        ('calibration',)),
    Question(
        'What needs a long schedule to pay off',
        'PS-KD trusts its own past predictions more every epoch (their weight grows linearly to 0.8 at the last '
        'epoch), and its early predictions are poor teachers. MrKD\'s copies are refreshed every 25 epochs: in a '
        'shorter run they stay the initial weights (the log warns). Our 4-epoch runs show neither paying off.',
        [Row('`pskd`', 'ResNet-18, CIFAR-100 (epochs not stated; PS-KD\'s own code trains 300): error 21.41 -> '
             '19.94, +1.5 (Chottananurak et al., table 1, rows 1 and 4)', 'pskd'),
         Row('`mrkd`', 'ResNet-164, CIFAR-100, 200 epochs: error 23.46 -> 22.23, +1.2 (Wang et al., table 1, '
             'MrKD3)', 'mrkd'),
         Row('`mrkd_tc`', 'PreResNet-110, CIFAR-100, 200 epochs: error 25.63 -> 24.68, +0.95 (Wang et al., table '
             '1, MrKD3-TC)', 'mrkd_tc')]),
]


def _signed(value: float) -> str:
    return f'{value:+.2f}'


def change_cell(change: Change, seeds: int) -> str:
    """`mean [lowest, highest]` of the per-seed changes; a failed seed is said."""
    if change.delta != change.delta:
        return 'failed'
    cell = _signed(change.delta)
    if len(change.per_seed) > 1:
        cell += f' [{_signed(min(change.per_seed))}, {_signed(max(change.per_seed))}]'
    if len(change.per_seed) < seeds:
        cell += f' ({seeds - len(change.per_seed)} of {seeds} seeds failed)'
    return cell


def evidence_cell(e: Optional[Evidence]) -> str:
    """The change at equal images, and at equal epochs where that is another comparison."""
    if e is None:
        return 'not measured'
    cell = change_cell(e.equal_images, e.seeds)
    return cell + f'; equal epochs {change_cell(e.equal_epochs, e.seeds)}' if e.reads_more else cell


def cost_cell(cost: Optional[StepCost], e: Optional[Evidence]) -> str:
    if cost is None:
        return 'not measured'
    cell = f'{cost.ratio:.2f}x'
    return cell + f' per step, {e.equal_epochs.time:.1f}x per epoch' if e is not None and e.reads_more else cell


def calibration_cell(row: Row) -> str:
    """Plain training's ECE and NLL against the method's, from `benchmarks/pskd_topk.py`'s table."""
    if row.method != 'pskd':
        return 'not measured'
    table = read_markdown_table(RESULTS / CALIBRATION_FILE, 'run')
    plain, pskd = table['plain'], table['pskd dense']
    mean = lambda cell: float(cell.split()[0])  # noqa: E731  'mean (min-max)'
    return (f'ECE {mean(plain["ece"]):.2f} -> {mean(pskd["ece"]):.2f} %, NLL {mean(plain["nll"]):.3f} -> '
            f'{mean(pskd["nll"]):.3f}')


def _table(question: Question, measured: Dict[str, Dict[str, Evidence]], costs: Dict[str, StepCost]) -> List[str]:
    header = ['method', 'paper reports', 'our step time (CPU)'] + [
        'ours: ECE and NLL, plain -> method' if s == 'calibration' else
        f'{SETTING_NAMES[s]}: top-1 change at equal images [per-seed range]' for s in question.settings]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for row in question.rows:
        demo = measured['demo'].get(row.method or row.cost)
        cells = [row.shown, row.paper, cost_cell(costs.get(row.cost or row.method), demo)]
        for setting in question.settings:
            cells.append(calibration_cell(row) if setting == 'calibration' else
                         evidence_cell(measured[setting].get(row.method)) if row.method else 'not measured')
        lines.append('| ' + ' | '.join(cells) + ' |')
    return lines


def _nearly_free(measured: Dict[str, Dict[str, Evidence]]) -> List[str]:
    """Every measured method whose step costs at most NEARLY_FREE x plain training's, cheapest first."""
    demo = measured['demo']
    rows = sorted((e for e in demo.values() if e.cost.ratio <= NEARLY_FREE), key=lambda e: e.cost.ratio)
    lines = ['| method | step time (CPU) | epoch time (CPU) | ours, demo recipe: top-1 change at equal images '
             '[per-seed range] | ours, modern recipe |', '|---|---|---|---|---|']
    for e in rows:
        lines.append(f'| `{e.method}` | {e.cost.ratio:.2f}x | {e.equal_epochs.time:.1f}x | {evidence_cell(e)} | '
                     f'{evidence_cell(measured["modern"].get(e.method))} |')
    return lines


def render(measured: Dict[str, Dict[str, Evidence]], costs: Dict[str, StepCost]) -> str:
    """The guide's tables, in markdown."""
    lines = [f'### Nearly free: at most {NEARLY_FREE:.2f}x plain training\'s step time', '',
             'Per step at the same batch size. DLB, BAKE, CS-KD and DDGSD read each image twice per epoch (DDGSD + '
             'DLB four times), so their epoch takes twice (four times) the steps: nearly free per step, not per '
             'epoch.', ''] + _nearly_free(measured)
    for question in QUESTIONS:
        lines += ['', f'### {question.title}', '', question.lead, ''] + _table(question, measured, costs)
    return '\n'.join(lines)
