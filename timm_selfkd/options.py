"""timm's training options as a self-KD run reads them, for `train.py` and for a user's timm script under the adapter:

- `REFUSED_OPTIONS`: the flags of timm's train.py that a self-KD run does not take, one reason each;
- `mixup_arguments`: timm's mixup/CutMix options as the arguments of its `Mixup`;
- `model_arguments`: timm's model options as the keyword arguments of its `create_model`;
- `read_recipe`: the YAML recipe named by `-c`.

Nothing here knows a method: what a method refuses is `timm_selfkd.wiring`'s.
"""
import argparse
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import yaml

from timm_selfkd.errors import UsageError

__all__ = ['RefusedOption', 'REFUSED_OPTIONS', 'refused_options_set', 'mixup_active', 'mixup_arguments',
           'model_arguments', 'read_recipe_path', 'read_recipe']


@dataclass(frozen=True)
class RefusedOption:
    """A flag of timm's train.py that a run refuses, with the one reason it gives.

    `scope`: 'selfkd' when no self-KD run can take it (refused by our train.py and by the adapter, which runs the
    user's script), 'train.py' when only our loop lacks it (the user's own script has it).
    """
    flag: str
    nargs: Any
    reason: str
    scope: str = 'selfkd'

    @property
    def dest(self) -> str:
        return self.flag[2:].replace('-', '_')


def _options(flags, reason: str):
    return tuple(RefusedOption(flag, nargs, reason) for flag, nargs in flags)


REFUSED_OPTIONS = (
    RefusedOption('--aug-splits', 1, 'each batch would hold every image once per split, which changes the batch '
                                     'layout the methods rely on'),
    RefusedOption('--jsd-loss', 0, 'the JSD loss needs --aug-splits'),
    RefusedOption('--resplit', 0, 'it needs --aug-splits'),
    RefusedOption('--split-bn', 0, 'it needs --aug-splits'),
    RefusedOption('--use-multi-epochs-loader', 0, 'the batch stream that feeds the task replaces the loader\'s '
                                                  'sampler each epoch'),
    RefusedOption('--torchscript', 0, 'the methods may wrap the model or hook its classifier, which a scripted '
                                      'model does not allow; use --torchcompile'),
    RefusedOption('--fuser', 1, 'it selects a TorchScript fuser; use --torchcompile'),
    *_options((('--naflex-loader', 0), ('--naflex-train-seq-lens', '+'), ('--naflex-max-seq-len', 1),
               ('--naflex-patch-sizes', '+'), ('--naflex-patch-size-probs', '+'), ('--naflex-loss-scale', 1),
               ('--naflex-patchify-channels-first', 0)),
              'NaFlex batches are patch sequences of varying length from their own sampler, not the image '
              'batches the methods choose'),
    *_options((('--train-img-sizes', '+'), ('--train-batch-sizes', '+'), ('--train-size-probs', '+'),
               ('--train-size-schedule', 1), ('--train-size-schedule-spread', 1), ('--train-size-random-mix', 1),
               ('--train-batches-per-epoch', 1), ('--train-steps-per-epoch', 1), ('--variable-batch-loss-scale', 1)),
              'variable image or batch sizes change the batch layout the methods rely on'),
    *_options((('--kd-model-name', 1), ('--kd-distill-type', 1), ('--kd-loss-type', 1), ('--distill-loss-weight', 1),
               ('--task-loss-weight', 1), ('--kd-temperature', 1), ('--kd-student-feature-dim', 1),
               ('--kd-teacher-feature-dim', 1), ('--kd-token-distill-type', 1)),
              'a teacher-distillation task would replace the self-KD task (here the model is its own teacher)'),
    # what only this project's train.py lacks; the user's own script under the adapter has it
    RefusedOption('--epoch-repeats', 1, 'an epoch is one pass of the method\'s batches; set --epochs', 'train.py'),
    RefusedOption('--start-epoch', 1, 'use --resume, which continues at the saved step', 'train.py'),
    RefusedOption('--worker-seeding', 1, 'every image is seeded from its own key (seed, rank, epoch, step, '
                                         'position)', 'train.py'),
    RefusedOption('--model-dtype', 1, 'self-KD terms need float32 weights; use --amp --amp-dtype bfloat16',
                  'train.py'),
    RefusedOption('--device-modules', '+', 'only CUDA and CPU devices are supported', 'train.py'),
    RefusedOption('--model-ema-force-cpu', 0, 'deprecated in timm; the EMA stays on the training device',
                  'train.py'),
    RefusedOption('--save-images', 0, 'debugging aid of timm\'s train.py', 'train.py'),
    RefusedOption('--tta', 1, 'validation runs without test-time augmentation', 'train.py'),
)


def refused_options_set(args: argparse.Namespace, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Refuse the options of a timm script's parsed `args` that no self-KD run can take (those it has), set to
    another value than `defaults` (the script parser's own defaults by destination, e.g. timm's
    `--naflex-train-seq-lens 128 256 ...` or `--kd-temperature 4`, which do nothing on their own)."""
    defaults = defaults or {}
    for option in REFUSED_OPTIONS:
        value = getattr(args, option.dest, None)
        if option.scope == 'selfkd' and value and value != defaults.get(option.dest):
            raise UsageError(f'{option.flag} cannot be used with --selfkd {args.selfkd}: {option.reason}')


def mixup_active(args: argparse.Namespace) -> bool:
    """Whether timm's mixup/CutMix options turn it on."""
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def mixup_arguments(args: argparse.Namespace, num_classes: int) -> Optional[Dict[str, Any]]:
    """The arguments of timm's `Mixup`/`FastCollateMixup` from its options (`--mixup`, `--cutmix`, ...,
    `--smoothing`); None when mixup/CutMix is off."""
    if not mixup_active(args):
        return None
    return dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                label_smoothing=args.smoothing, num_classes=num_classes)


def model_arguments(args: argparse.Namespace, training: bool = True) -> Dict[str, Any]:
    """timm's `create_model` keyword arguments from its options: `--model-kwargs`, then those set of the ones that
    shape the model (`--num-classes`, `--in-chans`, `--gp`, `--bn-eps`) and, with `training`, of the drop rates and
    the BatchNorm momentum (which an evaluated model does not use). Options a namespace lacks count as not set."""
    option = vars(args).get  # the arguments an older run recorded may lack one
    drop_path = option('drop_path') if option('drop_connect') is None else option('drop_connect')
    kwargs = dict(option('model_kwargs') or {})
    for key, value, shapes in (('num_classes', option('num_classes'), True), ('in_chans', option('in_chans'), True),
                               ('drop_path_rate', drop_path, False), ('drop_block_rate', option('drop_block'), False),
                               ('global_pool', option('gp'), True), ('bn_momentum', option('bn_momentum'), False),
                               ('bn_eps', option('bn_eps'), True)):
        if value is not None and (shapes or training):
            kwargs[key] = value
    return kwargs


def read_recipe_path(argv: Sequence[str]) -> str:
    """The `-c/--config` file named on a command line ('' without one): the one pre-parser of `-c`, for train.py
    and for timm scripts under the adapter."""
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('-c', '--config', default='')
    return config_parser.parse_known_args(list(argv))[0].config


def read_recipe(argv: Sequence[str]) -> Dict[str, Any]:
    """The YAML recipe of `-c` on a command line, as a mapping (empty without one)."""
    path = read_recipe_path(argv)
    if not path:
        return {}
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise UsageError(f'cannot read recipe {path!r}: {e.strerror}') from e
    except yaml.YAMLError as e:
        raise UsageError(f'recipe {path!r} is not valid YAML: {str(e).splitlines()[0]}') from e
    if not isinstance(recipe, dict):
        raise UsageError(f'recipe {path!r} must be a mapping of option names to values')
    return recipe
