"""`python -m timm_selfkd.cost`: what each self-KD method costs on your model and device, against plain training.

Every requested method and plain training train a copy of the same model on synthetic batches of the model's input
size (no data set), their steps interleaved round-robin; one table gives each method's step-time ratio and its
spread, images/s, peak memory and its ratio, the state it keeps between steps, and the wall time of E epochs of
N images at equal epochs and at equal images. A method that runs out of memory or is refused for the model is a
row with the reason.

Examples:
    python -m timm_selfkd.cost --model resnet50 --input-size 3 224 224 -b 128 --amp --selfkd all
    python -m timm_selfkd.cost -c configs/bake_imagenet_swin_t.yaml --dataset-size 1281167 --json cost.json
"""
import argparse
import dataclasses
import json
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.utils import ParseKwargs

from timm_selfkd.cli import (OneLineParser, add_selfkd_arguments, format_methods, method_hparams, read_recipe,
                              read_recipe_path)
from timm_selfkd.cli import parse_args as parse_train_args
from timm_selfkd.cost.measure import MethodRun, Setting, measure
from timm_selfkd.cost.report import cost_rows, environment, markdown
from timm_selfkd.errors import UsageError
from timm_selfkd.registry import get_method, hparam_dest, hparam_fields, hparam_flag, list_methods, method_parts

__all__ = ['build_parser', 'method_runs', 'main', 'STACKS']

PROG = 'python -m timm_selfkd.cost'

STACKS = ('ddgsd+dlb',)  # the stacks `--selfkd all` measures besides every registered method (DLB paper, table 3)
# state worth knowing of a method at another setting, reported beside its row: PS-KD's top-k table (10 classes)
STATE_VARIANTS = {'pskd': {'topk': 10}}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split('\n\n')[0],
                       epilog='Each method\'s own flags (--dlb-alpha, ...) are train.py\'s; see --list-selfkd.')
    p.add_argument('-c', '--config', default='', metavar='FILE',
                   help='a train.py recipe (YAML): its model, input, batch, precision, epochs, method and '
                        'hyper-parameters become the defaults; its other keys are training options, not used here')
    g = p.add_argument_group('Model and step (as train.py)')
    g.add_argument('--model', default='resnet18', metavar='MODEL', help='any timm model name (default: resnet18)')
    g.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, help='timm.create_model arguments')
    g.add_argument('--num-classes', type=int, default=None, metavar='N', help='default: the model\'s')
    g.add_argument('--input-size', type=int, nargs=3, default=None, metavar='N',
                   help='input dimensions (d h w, e.g. --input-size 3 224 224; default: the model\'s)')
    g.add_argument('--img-size', type=int, default=None, metavar='N', help='square images of this size')
    g.add_argument('--drop-path', type=float, default=None, metavar='PCT', help='stochastic-depth rate of the model')
    g.add_argument('-b', '--batch-size', type=int, default=64, metavar='N',
                   help='images (rows) per step for every method, even (default: 64)')
    g.add_argument('--amp', action='store_true', default=False, help='automatic mixed precision')
    g.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    g.add_argument('--channels-last', action='store_true', default=False)
    g.add_argument('--grad-checkpointing', action='store_true', default=False)
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor',
                   help='torch.compile every task with this backend (warm-up steps then include compiling)')
    g.add_argument('--opt', default='sgd', metavar='OPTIMIZER', help='timm optimizer (default: sgd)')
    g.add_argument('--mixup', type=float, default=0., help='mixup alpha for every method')
    g.add_argument('--cutmix', type=float, default=0., help='CutMix alpha for every method')
    g.add_argument('--device', default='cuda', help='cuda, cpu, cuda:1 ... (cuda falls back to cpu)')
    g = p.add_argument_group('Measurement and projection')
    g.add_argument('--steps', type=int, default=10, metavar='N', help='timed steps per method (default: 10)')
    g.add_argument('--warmup', type=int, default=2, metavar='N', help='untimed steps per method first (default: 2)')
    g.add_argument('--dataset-size', type=int, default=50_000, metavar='N',
                   help='training images N of the projected run and of per-sample state (default: 50000)')
    g.add_argument('--epochs', type=int, default=100, metavar='E', help='epochs of the projected run (default: 100)')
    g.add_argument('--time-limit', type=float, default=None, metavar='S',
                   help='stop timing early (after one timed step) so that the whole measurement takes about S s')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--json', default='', metavar='FILE', help='also write the rows, setting and environment here')
    add_selfkd_arguments(p)
    p.set_defaults(selfkd='all')
    p._option_string_actions['--selfkd'].help = (
        'methods to measure besides plain training: a comma-separated list of methods and stacks (LAYOUT+METHOD), '
        f'or all: every registered method and {", ".join(STACKS)} (default: all)')
    return p


def _recipe_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """The recipe's values of this command's options, read and checked as train.py reads them."""
    recipe = read_recipe(argv)
    if not recipe:
        return {}
    train_args = parse_train_args(['-c', read_recipe_path(argv)])
    dests = {action.dest for action in parser._actions}
    return {key: getattr(train_args, key) for key in recipe if key in dests}


def _hparam_flags():
    """(method, dest, flag) of every method hyper-parameter flag."""
    return [(name, hparam_dest(name, field.name), hparam_flag(name, field.name))
            for name in list_methods() for field in hparam_fields(get_method(name))]


def _method_names(selfkd: str) -> List[str]:
    names = [name.strip() for name in selfkd.split(',') if name.strip()]
    if 'all' in names:
        names = list_methods() + list(STACKS)
    for name in names:
        get_method(name)  # an unknown name: a ValueError naming the closest one
    return [name for name in dict.fromkeys(names) if name != 'none']


def method_runs(args: argparse.Namespace, given: set) -> List[MethodRun]:
    """Plain training, then each requested method with its own flags' values (a stack: each part's).

    A flag of a method that is not measured is an error when given on the command line (`given`: their dests);
    from a recipe, it is left out (`-c dlb_recipe.yaml --selfkd bake`), as train.py does.
    """
    names = _method_names(args.selfkd)
    measured = {part for name in names for part in method_parts(name)}
    flags = _hparam_flags()
    for owner, dest, flag in flags:
        if getattr(args, dest) is not None and owner not in measured and dest in given:
            raise UsageError(f'{flag} is a hyper-parameter of {owner}, which is not measured (--selfkd {args.selfkd})')
    runs = [MethodRun('none', 'none')]
    for name in names:
        own = argparse.Namespace(**vars(args))
        own.selfkd = name
        for owner, dest, _ in flags:
            if owner not in method_parts(name):
                setattr(own, dest, None)
        hparams = method_hparams(own)
        values = {field.name: getattr(hparams, field.name) for field in dataclasses.fields(hparams)}
        variant = STATE_VARIANTS.get(name, {})
        other = dataclasses.replace(hparams, **variant)
        runs.append(MethodRun(_label(name, hparams), name, values,
                              state_variants={_label(name, other): variant} if other != hparams else {}))
    return runs


def _label(name: str, hparams: Any) -> str:
    """`name`, with the hyper-parameters set away from their defaults: `pskd (topk=10)`."""
    default = dataclasses.asdict(type(hparams)())
    changed = [f'{key}={value}' for key, value in dataclasses.asdict(hparams).items() if value != default[key]]
    return f'{name} ({", ".join(changed)})' if changed else name


def _setting(args: argparse.Namespace) -> Setting:
    device = args.device
    if device.startswith('cuda') and not torch.cuda.is_available():
        print(f'--device {device} requested but CUDA is not available: using the CPU', file=sys.stderr)
        device = 'cpu'
    input_size = tuple(args.input_size) if args.input_size else (3, args.img_size, args.img_size) \
        if args.img_size else None
    model_kwargs = dict(args.model_kwargs)
    if args.drop_path is not None:
        model_kwargs.setdefault('drop_path_rate', args.drop_path)
    return Setting(model=args.model, model_kwargs=model_kwargs, num_classes=args.num_classes, input_size=input_size,
                   batch_size=args.batch_size, device=device, amp=args.amp, amp_dtype=args.amp_dtype,
                   channels_last=args.channels_last, grad_checkpointing=args.grad_checkpointing,
                   torchcompile=args.torchcompile, opt=args.opt, mixup=args.mixup, cutmix=args.cutmix,
                   num_epochs=args.epochs, num_samples=args.dataset_size, seed=args.seed)


def _check(args: argparse.Namespace) -> None:
    if args.batch_size < 4 or args.batch_size % 2:
        raise UsageError(f'-b must be even and >= 4 (DLB halves the batch, BAKE groups it), got {args.batch_size}')
    for name, low in (('steps', 1), ('warmup', 1), ('epochs', 1), ('dataset_size', args.batch_size)):
        if getattr(args, name) < low:
            raise UsageError(f'--{name.replace("_", "-")} must be >= {low}, got {getattr(args, name)}')
    if args.input_size is not None and min(args.input_size) < 1:
        raise UsageError(f'--input-size must be positive, got {args.input_size}')


def parse_args(argv: Optional[Sequence[str]] = None):
    """The options (a recipe's values as defaults, flags overriding them) and the rows to measure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    given = {dest for dest, value in vars(parser.parse_args(argv)).items() if value is not None}
    try:
        parser.set_defaults(**_recipe_defaults(parser, argv))
    except UsageError as e:
        parser.error(str(e))
    args = parser.parse_args(argv)
    if args.list_selfkd:
        return args, []
    try:
        _check(args)
        return args, method_runs(args, given)
    except ValueError as e:  # UsageError, an unknown method or hyper-parameter, a value out of range
        parser.error(str(e))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, runs = parse_args(argv)
    if args.list_selfkd:
        print(format_methods())
        return
    setting = _setting(args)
    start = time.perf_counter()
    print(f'measuring on {setting.device}: {", ".join(run.label for run in runs)}', file=sys.stderr, flush=True)
    try:
        results = measure(setting, runs, args.steps, args.warmup, time_limit=args.time_limit)
        rows = cost_rows(results, setting, args.epochs)
    except ValueError as e:  # the model cannot be built, or plain training cannot run on it
        print(f'{PROG}: error: {str(e).splitlines()[0]}', file=sys.stderr)
        sys.exit(2)
    env = environment(setting.device, shlex.join(['python', '-m', 'timm_selfkd.cost', *argv]))
    text = markdown(rows, setting, args.epochs, env['device'])
    print(text + f'\n(measured in {time.perf_counter() - start:.0f} s)', flush=True)
    if args.json:
        record = {'environment': env, 'setting': dataclasses.asdict(setting), 'epochs': args.epochs,
                  'steps': args.steps, 'warmup': args.warmup, 'rows': rows, 'markdown': text}
        with open(args.json, 'w') as f:
            json.dump(record, f, indent=1)
        print(f'wrote {args.json}', file=sys.stderr)
