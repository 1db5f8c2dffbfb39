"""Command line of `train.py`: timm's flag names, timm's YAML semantics, and one flag per method
hyper-parameter generated from the registry.

`-c recipe.yaml` sets argparse defaults and the command line overrides them, as in timm; unlike timm, an
unknown YAML key is an error that names the closest valid key.
"""
import argparse
import sys
from typing import Any, Dict, List, Optional

from timm.utils import ParseKwargs

from timm_selfkd.options import REFUSED_OPTIONS, read_recipe, read_recipe_path
from timm_selfkd.errors import UsageError
from timm_selfkd.methods.stack import is_layout
from timm_selfkd.registry import (build_hparams, constraint_text, did_you_mean, get_method, hparam_dest, hparam_fields,
                                  hparam_flag, list_methods, method_parts)
from timm_selfkd.runtime.transforms import TRAIN_CROP_MODES

__all__ = ['UsageError', 'OneLineParser', 'parse_args', 'add_selfkd_arguments', 'resolve_selfkd_args', 'method_hparams',
           'recipe_values', 'format_methods']


class OneLineParser(argparse.ArgumentParser):
    """Reports a usage error as a single line naming the problem (the full usage is in `--help`)."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message}\n')


class _Switch(argparse.Action):
    """A boolean flag that both forms set: timm's name switches it on (`--amp`, `--no-aug`), the opposite form off
    (`--no-amp`, `--aug`), so that whatever a recipe switches on, the command line can switch off."""

    def __init__(self, option_strings: List[str], dest: str, default: bool = False, help: Optional[str] = None):
        flag = option_strings[-1]
        self.opposite = f'--{flag[len("--no-"):]}' if flag.startswith('--no-') else f'--no-{flag[2:]}'
        super().__init__([*option_strings, self.opposite], dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, option_string != self.opposite)

    def format_usage(self) -> str:
        return ' | '.join(self.option_strings)


_TYPES = {'bool': bool, 'int': int, 'float': float, 'str': str}  # dataclass annotations given as strings
_MINIMUMS = {'epochs': 1, 'batch_size': 1, 'recovery_interval': 0, 'check_interval': 0, 'nonfinite_patience': 1,
             'grad_accum_steps': 1, 'val_interval': 1, 'aug_repeats': 0,
             'validation_batch_size': 1, 'img_size': 1, 'log_interval': 1, 'checkpoint_hist': 1, 'recount': 1,
             'warmup_epochs': 0, 'cooldown_epochs': 0, 'workers': 0, 'train_subset': 0, 'val_subset': 0,
             'train_crop_padding': 0, 'cutout': 0, 'mixup': 0., 'cutmix': 0., 'lr': 0., 'weight_decay': 0.,
             'mixup_off_epoch': 0}
_PROBABILITIES = ('hflip', 'vflip', 'reprob', 'mixup_prob', 'mixup_switch_prob', 'model_ema_decay')
# not recipe keys
_RUN_ONLY = {'config', 'list_selfkd', 'distributed', 'world_size', 'rank', 'local_rank', 'selfkd_hparams'}


def add_selfkd_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Self-KD group to `parser`: `--selfkd`, `--list-selfkd` and one flag per method hyper-parameter
    (`--dlb-alpha`, dest and YAML key `dlb_alpha`), generated from the registry. Hyper-parameter defaults are
    None (= the paper's, from the dataclass), so that setting another method's value can be told apart."""
    group = parser.add_argument_group('Self-KD', 'method and its hyper-parameters (see --list-selfkd)')
    group.add_argument('--selfkd', default='none', metavar='NAME',
                       help=f'self-KD method: {", ".join(list_methods())}, or a batch layout stacked on a method, '
                            'LAYOUT+METHOD (e.g. ddgsd+dlb) (default: none = plain timm training)')
    group.add_argument('--list-selfkd', action='store_true', help='list methods, hyper-parameters and papers; exit')
    for name in list_methods():
        spec = get_method(name)
        for field in hparam_fields(spec):
            help_text = f'{name}: {field.metadata.get("help", "")} ({_default_and_range(field)})'
            kwargs: Dict[str, Any] = dict(dest=hparam_dest(name, field.name), default=None, help=help_text)
            field_type = _TYPES.get(field.type, field.type)
            if field_type is bool:
                kwargs['action'] = argparse.BooleanOptionalAction
            elif 'choices' in field.metadata:  # shown as {a,b}
                kwargs.update(type=field_type, choices=field.metadata['choices'])
            else:
                kwargs.update(type=field_type, metavar=field_type.__name__.upper())
            group.add_argument(hparam_flag(name, field.name), **kwargs)


class _Refuse(argparse.Action):
    """A flag of timm's train.py that this trainer does not take: using it is a one-line error saying why."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f'{option_string} is not supported by timm_selfkd\'s train.py: {self.help}')


def _add_refused_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Flags of timm\'s train.py not supported here (each is an error)')
    for option in REFUSED_OPTIONS:
        group.add_argument(option.flag, nargs=option.nargs, action=_Refuse, default=None, help=option.reason)


_REFUSED_KEYS = {option.dest: option.reason for option in REFUSED_OPTIONS}  # as recipe keys


def _build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog='train.py', description='Train a timm model with a self-knowledge-distillation method')
    p.add_argument('-c', '--config', default='', metavar='FILE', help='YAML recipe; its keys set the defaults')

    g = p.add_argument_group('Dataset')
    g.add_argument('data', nargs='?', metavar='DIR', help='path to dataset (positional is *deprecated*)')
    g.add_argument('--data-dir', metavar='DIR', help='path to dataset (root dir)')
    g.add_argument('--dataset', default='', metavar='NAME',
                   help='fashion_mnist (local IDX files), or any timm dataset: torch/cifar10, hfds/..., '
                        'empty = image folder (default: "")')
    g.add_argument('--train-split', default='train', metavar='NAME')
    g.add_argument('--val-split', default='validation', metavar='NAME')
    g.add_argument('--dataset-download', action=_Switch,
                   help='allow torchvision datasets to download (needs a network)')
    g.add_argument('--class-map', default='', type=str, metavar='FILENAME', help='class to index mapping file')
    g.add_argument('--input-img-mode', default=None, type=str, help='image conversion mode of the data set\'s images')
    g.add_argument('--input-key', default=None, type=str, help='data set key of the input images')
    g.add_argument('--target-key', default=None, type=str, help='data set key of the target labels')
    g.add_argument('--dataset-trust-remote-code', action=_Switch,
                   help='allow a Hugging Face data set to run code from its repository')
    g.add_argument('--train-num-samples', default=None, type=int, metavar='N',
                   help='samples in the train split, for streamed (iterable) data sets')
    g.add_argument('--val-num-samples', default=None, type=int, metavar='N',
                   help='samples in the validation split, for streamed (iterable) data sets')
    g.add_argument('--train-subset', type=int, default=0, metavar='N', help='train on N random images (0 = all)')
    g.add_argument('--val-subset', type=int, default=0, metavar='N', help='validate on N random images (0 = all)')
    g.add_argument('--train-label-noise', type=float, default=0.0, metavar='P',
                   help='symmetric label noise: a fraction P in [0, 1) of the training labels (drawn with --seed) '
                        'replaced by another class, uniformly; the samplers see the same noisy labels (default: 0)')

    g = p.add_argument_group('Model')
    g.add_argument('--model', default='resnet18', type=str, metavar='MODEL')
    g.add_argument('--pretrained', action=_Switch, help='start from pretrained weights')
    g.add_argument('--pretrained-path', default=None, type=str, metavar='PATH',
                   help='load this file as the pretrained weights (with head adaptation)')
    g.add_argument('--initial-checkpoint', default='', type=str, metavar='PATH',
                   help='start from the model weights of this checkpoint (not its optimizer, method or epoch)')
    g.add_argument('--num-classes', type=int, default=None, metavar='N')
    g.add_argument('--in-chans', type=int, default=None, metavar='N')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='image size (default: model default)')
    g.add_argument('--input-size', default=None, nargs=3, type=int, metavar='N',
                   help='input dimensions (d h w, e.g. --input-size 3 224 224)')
    g.add_argument('--crop-pct', default=None, type=float, metavar='N')
    g.add_argument('--mean', type=float, nargs='+', default=None, metavar='MEAN')
    g.add_argument('--std', type=float, nargs='+', default=None, metavar='STD')
    g.add_argument('--interpolation', default='', type=str, metavar='NAME')
    g.add_argument('-b', '--batch-size', type=int, default=128, metavar='N', help='images per step per process')
    g.add_argument('-vb', '--validation-batch-size', type=int, default=None, metavar='N')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    g.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='drop path (stochastic depth) rate')
    g.add_argument('--drop-connect', type=float, default=None, metavar='PCT', help='deprecated name of --drop-path')
    g.add_argument('--drop-block', type=float, default=None, metavar='PCT', help='drop block rate')
    g.add_argument('--gp', default=None, type=str, metavar='POOL', help='global pool type (model default if unset)')
    g.add_argument('--bn-momentum', type=float, default=None, help='BatchNorm momentum override')
    g.add_argument('--bn-eps', type=float, default=None, help='BatchNorm epsilon override')
    g.add_argument('--head-init-scale', default=None, type=float, help='scale the classifier\'s initial weights')
    g.add_argument('--head-init-bias', default=None, type=float, help='initial value of the classifier\'s bias')
    g.add_argument('--fast-norm', action=_Switch, help='timm\'s experimental fast norm layers')
    g.add_argument('--channels-last', action=_Switch, help='channels-last memory layout')
    g.add_argument('--grad-checkpointing', action=_Switch,
                   help='gradient checkpointing through the model\'s blocks or stages')
    g.add_argument('--grad-accum-steps', type=int, default=1, metavar='N',
                   help='batches whose gradients are accumulated into one optimizer update')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile the model with this backend')
    g.add_argument('--torchcompile-mode', type=str, default=None, help='torch.compile mode')

    g = p.add_argument_group('Optimizer')
    g.add_argument('--opt', default='sgd', type=str, metavar='OPTIMIZER')
    g.add_argument('--opt-eps', default=None, type=float, metavar='EPSILON')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    g.add_argument('--momentum', type=float, default=0.9, metavar='M')
    g.add_argument('--weight-decay', type=float, default=2e-5)
    g.add_argument('--clip-grad', type=float, default=None, metavar='NORM')
    g.add_argument('--clip-mode', type=str, default='norm', help='norm, value or agc')
    g.add_argument('--layer-decay', type=float, default=None)
    g.add_argument('--layer-decay-min-scale', type=float, default=0, help='layer-wise lr decay minimum scale')
    g.add_argument('--layer-decay-no-opt-scale', type=float, default=None,
                   help='layer-wise lr scale below which parameters are frozen')
    g.add_argument('--opt-kwargs', nargs='*', default={}, action=ParseKwargs, help='more optimizer arguments')

    g = p.add_argument_group('Learning rate schedule')
    g.add_argument('--sched', type=str, default='cosine', metavar='SCHEDULER')
    g.add_argument('--sched-on-updates', action=_Switch)
    g.add_argument('--lr', type=float, default=None, metavar='LR',
                   help='learning rate (default: --lr-base scaled by the global batch size)')
    g.add_argument('--lr-base', type=float, default=0.1, metavar='LR')
    g.add_argument('--lr-base-size', type=int, default=256, metavar='DIV')
    g.add_argument('--lr-base-scale', type=str, default='', metavar='SCALE', help='linear or sqrt (default: by opt)')
    g.add_argument('--warmup-lr', type=float, default=1e-5, metavar='LR')
    g.add_argument('--min-lr', type=float, default=0, metavar='LR')
    g.add_argument('--epochs', type=int, default=300, metavar='N')
    g.add_argument('--decay-milestones', default=[90, 180, 270], type=int, nargs='+', metavar='MILESTONES')
    g.add_argument('--decay-epochs', type=float, default=90, metavar='N')
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    g.add_argument('--warmup-prefix', action=_Switch)
    g.add_argument('--cooldown-epochs', type=int, default=0, metavar='N')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N', help='patience of the plateau schedule')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='PCT', help='lr noise on/off epochs')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    g.add_argument('--lr-cycle-mul', type=float, default=1.0, metavar='MULT')
    g.add_argument('--lr-cycle-decay', type=float, default=0.5, metavar='MULT')
    g.add_argument('--lr-cycle-limit', type=int, default=1, metavar='N')
    g.add_argument('--lr-k-decay', type=float, default=1.0, help='k-decay of cosine/poly schedules')

    g = p.add_argument_group('Augmentation and regularization')
    g.add_argument('--no-aug', action=_Switch)
    g.add_argument('--train-crop-mode', default=None, choices=TRAIN_CROP_MODES,
                   help='training crop: timm\'s rrc (random-resized crop, default), rkrc, rkrr, or pad: the CIFAR '
                        'papers\' zero-pad and random crop (with --train-crop-padding)')
    g.add_argument('--train-crop-padding', type=int, default=4, metavar='N',
                   help='zero padding on each side for --train-crop-mode pad (default: 4)')
    g.add_argument('--cutout', type=int, default=0, metavar='N',
                   help='Cutout: one NxN hole per image, mean colour, centre uniform and clipped at the border '
                        '(DLB sec. 4.3: 16; default 0: off)')
    g.add_argument('--scale', type=float, nargs='+', default=[0.08, 1.0], metavar='PCT')
    g.add_argument('--ratio', type=float, nargs='+', default=[3. / 4., 4. / 3.], metavar='RATIO')
    g.add_argument('--hflip', type=float, default=0.5)
    g.add_argument('--vflip', type=float, default=0.)
    g.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    g.add_argument('--color-jitter-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--grayscale-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--gaussian-blur-prob', type=float, default=None, metavar='PCT')
    g.add_argument('--aa', type=str, default=None, metavar='NAME', help='auto augment policy, e.g. rand-m9-mstd0.5')
    g.add_argument('--aug-repeats', type=float, default=0,
                   help='repeated augmentation: epochs of the same length made of images drawn this many times '
                        '(each copy on another rank under DDP), as timm\'s RepeatAugSampler')
    g.add_argument('--reprob', type=float, default=0., metavar='PCT', help='random erase prob')
    g.add_argument('--remode', type=str, default='pixel')
    g.add_argument('--recount', type=int, default=1)
    g.add_argument('--mixup', type=float, default=0.0, help='mixup alpha, mixup enabled if > 0')
    g.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha, cutmix enabled if > 0')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    g.add_argument('--mixup-prob', type=float, default=1.0)
    g.add_argument('--mixup-switch-prob', type=float, default=0.5)
    g.add_argument('--mixup-mode', type=str, default='batch')
    g.add_argument('--mixup-off-epoch', default=0, type=int, metavar='N')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing of the cross-entropy term')
    g.add_argument('--bce-loss', action=_Switch, help='binary cross-entropy as the hard-label term')
    g.add_argument('--bce-sum', action=_Switch, help='BCE summed over classes')
    g.add_argument('--bce-target-thresh', type=float, default=None, help='binarize soft BCE targets above this')
    g.add_argument('--bce-pos-weight', type=float, default=None, help='BCE positive weight')
    g.add_argument('--train-interpolation', type=str, default='random')

    g = p.add_argument_group('Model exponential moving average')
    g.add_argument('--model-ema', action=_Switch)
    g.add_argument('--model-ema-decay', type=float, default=0.9998)
    g.add_argument('--model-ema-warmup', action=_Switch)

    g = p.add_argument_group('Miscellaneous')
    g.add_argument('--seed', type=int, default=42, metavar='S')
    g.add_argument('--log-interval', type=int, default=50, metavar='N')
    g.add_argument('--checkpoint-hist', type=int, default=10, metavar='N')
    g.add_argument('-j', '--workers', type=int, default=4, metavar='N')
    g.add_argument('--amp', action=_Switch, help='automatic mixed precision')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--no-prefetcher', action=_Switch)
    g.add_argument('--pin-mem', action=_Switch)
    g.add_argument('--output', default='', type=str, metavar='PATH', help='output folder (default: ./output/train)')
    g.add_argument('--experiment', default='', type=str, metavar='NAME', help='name of the run\'s sub-folder')
    g.add_argument('--eval-metric', default='top1', type=str, metavar='EVAL_METRIC')
    g.add_argument('--resume', default='', type=str, metavar='PATH',
                   help='continue the run of this checkpoint at its next step (epoch or recovery checkpoint); '
                        '"auto": the newest one in the run\'s folder (--output/--experiment), a new run if none')
    g.add_argument('--no-resume-opt', action=_Switch)
    g.add_argument('--recovery-interval', type=int, default=0, metavar='N',
                   help='also write a recovery checkpoint every N steps (0: only on SIGTERM/SIGINT)')
    g.add_argument('--check-interval', type=int, default=0, metavar='N',
                   help='steps between checks for stop signals and non-finite losses, agreed by all ranks '
                        '(default 0: every step on the CPU, every 20 on GPUs)')
    g.add_argument('--nonfinite', default='stop', choices=('stop', 'skip'),
                   help='on a non-finite loss: stop the run (default) or skip the step\'s update (one host sync '
                        'per step)')
    g.add_argument('--nonfinite-patience', type=int, default=25, metavar='K',
                   help='consecutive non-finite steps that stop a run with fp16 loss scaling or --nonfinite skip '
                        '(otherwise the first one stops it)')
    g.add_argument('--device', default='cuda', type=str, help='cuda, cpu, cuda:1 ... (cuda falls back to cpu)')
    g.add_argument('--dist-backend', default=None, type=str, help='default: nccl on cuda, gloo otherwise')
    g.add_argument('--dist-bn', type=str, default='reduce', choices=('reduce', 'broadcast', ''),
                   help='under DDP without --sync-bn, average (reduce) or copy (broadcast) BatchNorm statistics '
                        'across ranks before each validation')
    g.add_argument('--no-ddp-bb', action=_Switch, help='no DDP buffer broadcast')
    g.add_argument('--synchronize-step', action=_Switch,
                   help='wait for the device at the end of each step (timing)')
    g.add_argument('--val-interval', type=int, default=1, metavar='N', help='epochs between validations')
    g.add_argument('--sync-bn', action=_Switch,
                   help='synchronise BatchNorm statistics across processes (CUDA; matters for BAKE\'s per-class '
                        'batches)')

    g = p.add_argument_group('Tracking', 'every epoch\'s summary.csv row also to wandb or TensorBoard (rank 0; '
                                          'optional extras: pip install "timm-selfkd[wandb,tensorboard]")')
    g.add_argument('--log-wandb', action=_Switch,
                   help='log the run\'s options and method hyper-parameters and every epoch\'s metrics to wandb; '
                        'a resumed run continues its wandb run')
    g.add_argument('--wandb-project', default=None, type=str, metavar='NAME', help='wandb project name')
    g.add_argument('--wandb-tags', default=[], type=str, nargs='+', metavar='TAG', help='wandb tags')
    g.add_argument('--wandb-resume-id', default='', type=str, metavar='ID',
                   help='with --resume: continue this wandb run (default: the one the checkpoint names)')
    g.add_argument('--log-tensorboard', nargs='?', const='', default=None, metavar='DIR',
                   help='write TensorBoard events to DIR (without DIR: the run\'s folder): every epoch\'s metrics '
                        'and the loss terms every --log-interval steps')

    add_selfkd_arguments(p)
    _add_refused_flags(p)
    return p


def _load_recipe(parser: argparse.ArgumentParser, argv: List[str]) -> Dict[str, Any]:
    """The recipe of `-c` (`read_recipe`), each key checked against the parser's flags."""
    recipe = read_recipe(argv)
    path = read_recipe_path(argv)
    actions = {a.dest: a for a in parser._actions if a.dest != 'help' and a.dest not in _RUN_ONLY}
    for key in recipe:
        if key in _REFUSED_KEYS:
            raise UsageError(f'recipe {path} sets {key!r}, which timm_selfkd\'s train.py does not support: '
                             f'{_REFUSED_KEYS[key]}')
        if key not in actions and key not in _RUN_ONLY:
            raise UsageError(f'unknown key {key!r} in recipe {path}{did_you_mean(str(key), actions)}')
    return {key: _typed(actions[key], value) for key, value in recipe.items() if key not in _RUN_ONLY}


def _typed(action: argparse.Action, value: Any) -> Any:
    """A recipe value checked against its flag's type and choices (argparse converts only string defaults and
    checks choices only on the command line)."""
    if action.choices is not None and value is not None and value not in action.choices:
        raise UsageError(f'recipe key {action.dest!r} must be one of {", ".join(map(str, action.choices))}, '
                         f'got {value!r}')
    flag_type = bool if action.nargs == 0 else action.type
    if flag_type not in (bool, int, float) or value is None or (isinstance(value, str) and flag_type is not bool):
        return value

    def fits(item):
        if flag_type is bool or isinstance(item, bool):
            return isinstance(item, bool) and flag_type is bool
        return isinstance(item, int) or (flag_type is float and isinstance(item, float))

    items = value if isinstance(value, list) else [value]
    wrong = next((item for item in items if not fits(item)), None)
    if wrong is not None or (isinstance(value, list) and action.nargs in (None, 0)):
        raise UsageError(f'recipe key {action.dest!r} must be {flag_type.__name__}, got {value!r}')
    if flag_type is float:
        return [float(v) for v in value] if isinstance(value, list) else float(value)
    return value


def recipe_values(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's options as a recipe (a run's `args.yaml` can be passed back with `-c`)."""
    return {key: value for key, value in vars(args).items() if key not in _RUN_ONLY and key not in _REFUSED_KEYS}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse `argv` with timm's semantics: recipe values become defaults, flags override them."""
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    try:
        recipe = _load_recipe(parser, argv)
    except UsageError as e:
        parser.error(str(e))
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    if args.list_selfkd:
        return args
    try:
        check_values(args)
    except UsageError as e:
        parser.error(str(e))
    try:
        args.selfkd_hparams = resolve_selfkd_args(args, recipe, argv)  # built once, carried to the task
    except ValueError as e:
        parser.error(str(e))
    return args


def check_values(args: argparse.Namespace) -> None:
    """Refuse option values that timm would reject later with a traceback (or use without complaint)."""
    for dest, low in _MINIMUMS.items():
        value = getattr(args, dest)
        if value is not None and value < low:
            raise UsageError(f'--{dest.replace("_", "-")} must be >= {low}, got {value}')
    for dest in _PROBABILITIES:
        if not 0 <= getattr(args, dest) <= 1:
            raise UsageError(f'--{dest.replace("_", "-")} must be in [0, 1], got {getattr(args, dest)}')
    if not 0 <= args.smoothing < 1:
        raise UsageError(f'--smoothing must be >= 0 and < 1, got {args.smoothing}')
    if args.input_size is not None and min(args.input_size) < 1:
        raise UsageError(f'--input-size must be positive, got {args.input_size}')
    if not 0 <= args.train_label_noise < 1:
        raise UsageError(f'--train-label-noise must be in [0, 1), got {args.train_label_noise}')


def resolve_selfkd_args(args: argparse.Namespace, recipe: Dict[str, Any], argv: List[str]):
    """The selected method's hyper-parameters from parsed Self-KD flags (of any parser that has them).

    `-c dlb_recipe.yaml --selfkd none` runs the recipe's baseline: the recipe's values of another method are
    dropped from `args`; given on the command line, they stay an error.

    Args:
        args: Parsed arguments, with the flags of `add_selfkd_arguments`.
        recipe: The YAML recipe's keys and values (empty without one).
        argv: The command line, to tell the flags given there from the recipe's values.

    Raises:
        ValueError: another method's hyper-parameter is set, or a value is out of range.
    """
    _drop_recipe_hparams_of_other_methods(args, recipe, _given_on_command_line(argv))
    return method_hparams(args)


def _given_on_command_line(argv: List[str]) -> set:
    """The Self-KD destinations of the flags present in `argv` (a parser of those flags alone, no defaults)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_selfkd_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def _drop_recipe_hparams_of_other_methods(args: argparse.Namespace, recipe: Dict[str, Any], given: set) -> None:
    """`-c dlb_recipe.yaml --selfkd none` runs the recipe's baseline: the recipe's DLB values do not apply
    once the command line picks another method (given on the command line, they are still an error)."""
    if args.selfkd == recipe.get('selfkd', 'none'):
        return
    for name in list_methods():
        for field in hparam_fields(get_method(name)):
            dest = hparam_dest(name, field.name)
            if name not in method_parts(args.selfkd) and dest in recipe and dest not in given:
                setattr(args, dest, None)


def method_hparams(args: argparse.Namespace):
    """The selected method's hyper-parameter dataclass (a stack's: one per part, each from its own flags);
    setting another method's hyper-parameter is an error."""
    spec = get_method(args.selfkd)
    values = {name: {} for name in method_parts(spec.name)}
    for name in list_methods():
        for field in hparam_fields(get_method(name)):
            value = getattr(args, hparam_dest(name, field.name))
            if value is None:
                continue
            if name not in values:
                raise UsageError(f'{hparam_flag(name, field.name)} ({hparam_dest(name, field.name)}) is a '
                                 f'hyper-parameter of {name}, but the method is {spec.name!r}')
            values[name][field.name] = value
    return build_hparams(spec, values if len(values) > 1 else values[spec.name])


def _default(field) -> str:
    """A hyper-parameter's default as shown to users: its `default_text` (e.g. `2.5/K`, resolved by the run) or
    the value."""
    default = field.metadata.get('default_text', field.default)
    return "''" if default == '' else str(default)


def _default_and_range(field) -> str:
    """'default: 0.8; in [0, 1]' (the range only where the field declares one)."""
    return '; '.join(filter(None, (f'default: {_default(field)}', constraint_text(field))))


SMOOTHING_NOTE = ('--smoothing defaults to timm\'s 0.1 and smooths every method\'s cross-entropy, where the official '
                  'codes of DKS, FRSKD, MixSKD, R-Drop and Zipf\'s LS use none (USKD\'s: none on ResNets, 0.1 on '
                  'DeiT/Swin); the method recipes in configs/ set the papers\' value, --smoothing 0 trains without')


def format_methods() -> str:
    """The text of `--list-selfkd`: the note on `--smoothing`, then every method, its paper, and each
    hyper-parameter with its default and range."""
    lines = [f'note: {SMOOTHING_NOTE}']
    for name in list_methods():
        spec = get_method(name)
        lines.append(f'{name}: {spec.summary}')
        lines.append(f'    paper: {spec.paper}')
        for field in hparam_fields(spec):
            help_text = field.metadata.get('help', '')
            constraint = constraint_text(field)
            lines.append(f'    {hparam_flag(name, field.name):<26} {hparam_dest(name, field.name):<22} '
                         f'default {_default(field):<6} {help_text}{f" ({constraint})" if constraint else ""}')
    layouts = [name for name in list_methods() if is_layout(get_method(name))]
    lines.append(f'LAYOUT+METHOD: a batch layout ({", ".join(layouts)}) stacked on another method, e.g. ddgsd+dlb '
                 '(DLB paper, table 3); each part keeps its own flags')
    return '\n'.join(lines)
