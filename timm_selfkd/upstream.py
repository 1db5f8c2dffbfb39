"""Run a user's own, unmodified timm `train.py` with a self-KD method injected.

    python -m timm_selfkd.upstream path/to/train.py --selfkd dlb --dlb-alpha 1 <any of that script's flags>

The script is loaded as a module (not `__main__`), checked, patched and its `main()` called:
- its parser gains the Self-KD group (`--selfkd`, `--list-selfkd`, `--dlb-alpha`, ...), so the flags are in its
  `--help`, its `-c` YAML config and the `args.yaml` it writes;
- the `ClassificationTask` it builds is the method's task, with the script's criterion, device and dtype;
- its training loader (timm's `create_loader(is_training=True)`) takes the method's batch sampler;
- each epoch's loss terms (`loss_ce`, `loss_kd`, ...) join its log lines and its `summary.csv`
  (`train_loss_ce`, ...), with the images and steps the epoch trained on.

`check_script` inspects the script's source first and refuses, in one line naming the failed check, scripts it
cannot drive (timm's task API appeared in 1.0.25; the optimizer is built from `task.get_trainable_module()`
since 1.0.27). Options the methods cannot take (NaFlex loader, scheduled image sizes, augmentation splits,
teacher distillation, mixup where the method refuses it, ...) are refused in one line with exit status 2,
before the script creates its output folder.
"""
import argparse
import ast
import importlib.util
import inspect
import logging
import os
import sys
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import IterableDataset

from timm_selfkd.errors import UsageError
from timm_selfkd.cli import add_selfkd_arguments, format_methods, resolve_selfkd_args
from timm_selfkd.runtime.data import install_batch_stream
from timm_selfkd.methods.base import RunInfo, SelfKDTask
from timm_selfkd.registry import get_method

__all__ = ['IncompatibleScript', 'check_script', 'load_script', 'Injection', 'run', 'main']

PROG = 'timm_selfkd.upstream'
USAGE = f"""usage: python -m {PROG} TRAIN_PY [--selfkd NAME] [--list-selfkd] [method flags] [TRAIN_PY's own flags]

Runs timm's train.py (timm >= 1.0.27, unmodified) with a self-knowledge-distillation method in place of its
ClassificationTask. `python -m {PROG} TRAIN_PY --help` lists the script's flags with the Self-KD group."""

_TASK_ARGS = ('model', 'criterion', 'criterion_kwargs', 'device', 'dtype', 'verbose')  # ClassificationTask's
_TASK_MODULE = 'timm.task'


class IncompatibleScript(UsageError):
    """The script is not a timm train.py this adapter can drive; the message names the failed check."""


# ---------------------------------------------------------------------------------------------------------------
# The compatibility gate: what the patching relies on, read from the source before anything runs.

def _calls(tree: ast.AST, name: str) -> List[ast.Call]:
    """Calls of the plain name `name(...)` anywhere in `tree`."""
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name]


def _is_method_call(node: ast.AST, method: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == method


def _module_functions(tree: ast.Module) -> Dict[str, ast.FunctionDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def _module_assigns(tree: ast.Module, name: str) -> List[ast.AST]:
    """Values assigned to the module-level name `name` (also in chains `a = b = value`)."""
    return [node.value for node in tree.body if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)]


def _imported_from(tree: ast.Module, module: str) -> set:
    """Names the script imports at module level with `from module import ...`."""
    return {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
            and node.module == module for alias in node.names}


def _from_trainable_module(function: ast.FunctionDef, call: ast.Call) -> bool:
    """Whether the first argument of `call` is `<task>.get_trainable_module()`, directly or through the last
    assignment of a name before the call."""
    if not call.args:
        return False
    arg = call.args[0]
    if _is_method_call(arg, 'get_trainable_module'):
        return True
    if not isinstance(arg, ast.Name):
        return False
    assigned = [node for node in ast.walk(function) if isinstance(node, ast.Assign) and node.lineno < call.lineno
                and any(isinstance(t, ast.Name) and t.id == arg.id for t in node.targets)]
    last = max(assigned, key=lambda node: node.lineno, default=None)
    return last is not None and _is_method_call(last.value, 'get_trainable_module')


def check_script(path: str) -> None:
    """Refuse a script this adapter cannot drive, naming the first failed check.

    Checks, in order: a readable Python file; a timm train.py (module-level `parser`, `_parse_args()`,
    `train_one_epoch(epoch, ...)`, `main()`, `_logger`); timm's task API (`from timm.task import
    ClassificationTask`, built with arguments a `SelfKDTask` takes); the optimizer built from
    `task.get_trainable_module()` (so it holds the parameters of the method's trainable module); loaders built by
    `timm.data.create_loader`; checkpoints saved through the task (`CheckpointSaver(..., task=task)`).

    Raises:
        IncompatibleScript: one line, naming the check.
    """
    name = os.path.basename(path)
    try:
        with open(path, encoding='utf-8') as f:
            source = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise IncompatibleScript(f'cannot read {path!r}: {getattr(e, "strerror", None) or e}') from e
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise IncompatibleScript(f'{name} is not a Python script (syntax error at line {e.lineno})') from e

    functions = _module_functions(tree)
    for function in ('main', '_parse_args', 'train_one_epoch'):
        if function not in functions:
            raise IncompatibleScript(f'{name} is not a timm train.py: it defines no {function}()')
    parameters = functions['train_one_epoch'].args.args
    if not parameters or parameters[0].arg != 'epoch':
        raise IncompatibleScript(f'{name}: its train_one_epoch() does not take the epoch as first argument')
    if not any(_is_method_call(value, 'ArgumentParser') or (isinstance(value, ast.Call) and isinstance(
            value.func, ast.Name) and value.func.id == 'ArgumentParser') for value in _module_assigns(tree, 'parser')):
        raise IncompatibleScript(f'{name} is not a timm train.py: no module-level `parser = ArgumentParser(...)`')
    if not any(_is_method_call(value, 'getLogger') for value in _module_assigns(tree, '_logger')):
        raise IncompatibleScript(f'{name} is not a timm train.py: no module-level `_logger = logging.getLogger(...)`')

    task_names = _imported_from(tree, _TASK_MODULE)
    if not task_names:
        raise IncompatibleScript(f'{name} is too old to drive: it does not use timm\'s task API (no import from '
                                 f'{_TASK_MODULE}, timm >= 1.0.25)')
    if 'ClassificationTask' not in task_names or not _calls(tree, 'ClassificationTask'):
        raise IncompatibleScript(f'{name} does not build a {_TASK_MODULE}.ClassificationTask for the adapter to '
                                 'replace')
    for call in _calls(tree, 'ClassificationTask'):
        unknown = sorted({kw.arg or '**' for kw in call.keywords} - set(_TASK_ARGS)) + (
            ['positional arguments after model'] if len(call.args) > 1 else [])
        if unknown:
            raise IncompatibleScript(f'{name} builds ClassificationTask with arguments a self-KD task does not '
                                     f'take: {", ".join(unknown)} (line {call.lineno})')

    optimizer_calls = [(function, call) for function in functions.values()
                       for call in _calls(function, 'create_optimizer_v2')]
    if not optimizer_calls or not all(_from_trainable_module(f, c) for f, c in optimizer_calls):
        raise IncompatibleScript(f'{name} is too old to drive: its optimizer is not built from '
                                 'task.get_trainable_module() (timm >= 1.0.27)')
    if 'create_loader' not in _imported_from(tree, 'timm.data') or not _calls(functions['main'], 'create_loader'):
        raise IncompatibleScript(f'{name} does not build its loaders with timm.data.create_loader')
    savers = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and 'CheckpointSaver' in (
        getattr(node.func, 'id', None), getattr(node.func, 'attr', None))]
    if not savers or not all(any(kw.arg == 'task' for kw in saver.keywords) for saver in savers):
        raise IncompatibleScript(f'{name} does not give its CheckpointSaver the task (task=...), which saves the '
                                 'bare timm model and the method\'s state')


def load_script(path: str, argv: List[str]) -> ModuleType:
    """Execute the script's module level as a module named `timm_upstream_train` (its `__main__` block does not
    run), with `sys.argv` as the script will see it (argparse takes its program name from it)."""
    sys.argv = [path, *argv]
    spec = importlib.util.spec_from_file_location('timm_upstream_train', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not isinstance(getattr(module, 'parser', None), argparse.ArgumentParser):
        raise IncompatibleScript(f'{os.path.basename(path)}: its module-level `parser` is not an ArgumentParser')
    return module


# ---------------------------------------------------------------------------------------------------------------
# Option checks: what the script can be asked for that the methods cannot take.

def _mixup_active(args) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


# (destination, is it set, why not); destinations the script does not have are skipped
_REFUSED_OPTIONS = (
    ('naflex_loader', bool, 'NaFlex batches are patch sequences of varying length from their own sampler; '
                            'self-KD tasks train on image tensors in the batches their method chooses'),
    ('train_img_sizes', lambda v: v is not None, 'scheduled resolutions change the batch size from batch to '
                                                 'batch; the methods\' batches have one size'),
    ('aug_splits', lambda v: v > 0, 'each batch would hold every image once per split, which no method\'s loss '
                                    'expects'),
    ('jsd_loss', bool, 'the JSD loss needs augmentation splits, which the methods cannot take'),
    ('split_bn', bool, 'BatchNorm per augmentation split needs augmentation splits, which the methods cannot take'),
    ('aug_repeats', lambda v: v > 0, 'the batch stream that feeds the task (seeded, the method\'s batches) replaces '
                                     'the repeated-augmentation sampler'),
    ('use_multi_epochs_loader', bool, 'the batch stream that feeds the task replaces the loader\'s sampler, and with '
                                      'it the multi-epoch loader'),
    ('torchscript', bool, 'the methods may wrap the model or hook its classifier, which a scripted model does not '
                          'allow (--torchcompile works)'),
    ('kd_model_name', lambda v: v is not None, 'a teacher distillation task would replace the self-KD task; the '
                                               'two cannot combine'),
)


def _flag(dest: str) -> str:
    return '--' + dest.replace('_', '-')


def _refuse_options(args: argparse.Namespace) -> None:
    for dest, is_set, reason in _REFUSED_OPTIONS:
        if hasattr(args, dest) and is_set(getattr(args, dest)):
            raise UsageError(f'{_flag(dest)} cannot be used with --selfkd {args.selfkd}: {reason}')


# ---------------------------------------------------------------------------------------------------------------
# Run-time pieces.

class _LoaderSlot:
    """The training loader as the script holds it. The loader inside is replaced once the task exists, as the
    method's batch sampler is wired into loader and task together; attributes (`sampler`, `batch_sampler`,
    `dataset`, `mixup_enabled`, ...) are the loader's."""

    def __init__(self, loader):
        object.__setattr__(self, 'loader', loader)

    def swap(self, loader) -> None:
        object.__setattr__(self, 'loader', loader)

    def __iter__(self):
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.loader, name, value)


class _LossTerms:
    """Sums the task's `loss_*` terms over an epoch on the device (read only when logged or summarised), and
    counts the images and steps."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.steps = 0
        self.images = 0

    def hook(self, module, args, kwargs, output) -> None:
        """Forward hook of the task (`register_forward_hook(..., with_kwargs=True)`)."""
        input = args[0] if args else kwargs.get('input')
        self.steps += 1
        self.images += input.shape[0] if isinstance(input, torch.Tensor) else 0
        for name, value in output.items():
            if name.startswith('loss_'):  # the script accounts for `loss` itself
                self.sums[name] = self.sums.get(name, 0) + value.detach().float()

    def log_text(self) -> str:
        """This process's means since the epoch began, as `name value` pairs."""
        return '  '.join(f'{name} {float(total) / self.steps:.4f}' for name, total in self.sums.items())

    def epoch_metrics(self, device: torch.device) -> Dict[str, float]:
        """The epoch's mean of each term over all processes, the images of all processes and the steps."""
        distributed = dist.is_available() and dist.is_initialized()
        names = list(self.sums)
        values = torch.stack([self.sums[n].to(device) / max(self.steps, 1) for n in names] + [
            torch.tensor(float(self.images), device=device)])
        if distributed:
            dist.all_reduce(values)
        values = values.tolist()
        world = dist.get_world_size() if distributed else 1
        metrics = {name: value / world for name, value in zip(names, values)}
        metrics.update(images=values[-1], steps=self.steps)
        return metrics


class _TermsInLog(logging.Filter):
    """Appends the loss terms to the records the script logs while an epoch trains."""

    def __init__(self, injection: 'Injection'):
        super().__init__()
        self.injection = injection

    def filter(self, record: logging.LogRecord) -> bool:
        terms = self.injection.terms
        if self.injection.in_epoch and terms.steps and terms.sums and isinstance(record.msg, str):
            record.msg = f'{record.msg}  {terms.log_text()}'
        return True


class Injection:
    """The patches that put a self-KD method into a loaded train.py module, and their state during a run.

    `install()` replaces the module's `_parse_args`, `ClassificationTask`, `create_loader` and `train_one_epoch`
    with wrappers, adds the Self-KD flags to its parser and a filter to its logger; `uninstall()` takes the
    logger filter off again (the module itself is discarded after the run).
    """

    def __init__(self, module: ModuleType):
        self.module = module
        self.args: Optional[argparse.Namespace] = None
        self.spec = None
        self.hparams = None
        self.task: Optional[SelfKDTask] = None
        self.loader: Optional[_LoaderSlot] = None
        self.dataset = None
        self.batch_size = 0
        self.stream = None
        self.in_epoch = False
        self.terms = _LossTerms()
        self.log_filter = _TermsInLog(self)

    def install(self) -> None:
        module = self.module
        add_selfkd_arguments(module.parser)
        module.parser.error = self._parser_error
        module._parse_args = self._wrap_parse_args(module._parse_args)
        module.ClassificationTask = self._build_task
        module.create_loader = self._wrap_create_loader(module.create_loader)
        module.train_one_epoch = self._wrap_train_one_epoch(module.train_one_epoch)
        module._logger.addFilter(self.log_filter)

    def uninstall(self) -> None:
        self.module._logger.removeFilter(self.log_filter)

    @staticmethod
    def _parser_error(message: str) -> None:
        """The script's argparse errors as one line, like the adapter's (argparse prints the usage first)."""
        raise UsageError(message)

    def _wrap_parse_args(self, parse_args: Callable) -> Callable:
        def wrapped(*a, **kw):
            result = parse_args(*a, **kw)
            args = result[0] if isinstance(result, tuple) else result
            if args.list_selfkd:
                print(format_methods())
                sys.exit(0)
            before = dict(vars(args))
            try:
                self.hparams = resolve_selfkd_args(args, self._recipe(), sys.argv[1:])
                self.spec = get_method(args.selfkd)
                _refuse_options(args)
                self.spec.task_cls.check_setup(self.hparams, batch_size=args.batch_size, mixup=_mixup_active(args))
                if _mixup_active(args) and self.spec.task_cls.mixes_batches:
                    raise ValueError(f'--mixup/--cutmix cannot be used with --selfkd {args.selfkd} under a timm '
                                     'script: the method mixes its batches itself (DLB replays the repeated half\'s '
                                     'mix of one step earlier), and the script mixes whole batches; use '
                                     'timm_selfkd\'s train.py')
            except ValueError as e:
                raise UsageError(str(e)) from e
            self.args = args
            if vars(args) != before and isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
                # a recipe's values of another method were dropped: the saved args.yaml must not carry them
                return args, yaml.safe_dump(args.__dict__, default_flow_style=False)
            return result

        return wrapped

    @staticmethod
    def _recipe() -> Dict[str, Any]:
        """The `-c` YAML config of the command line, as the script reads it (empty without one)."""
        config_parser = argparse.ArgumentParser(add_help=False)
        config_parser.add_argument('-c', '--config', default='')
        known, _ = config_parser.parse_known_args(sys.argv[1:])
        if not known.config:
            return {}
        with open(known.config) as f:
            return yaml.safe_load(f) or {}

    def _build_task(self, *a, **kw) -> SelfKDTask:
        """Stands in for `ClassificationTask(model=..., criterion=..., device=..., dtype=..., verbose=...)`."""
        from timm.task import ClassificationTask
        bound = inspect.signature(ClassificationTask.__init__).bind(None, *a, **kw).arguments
        bound.pop('self')
        model = bound.pop('model')
        if self.loader is None:
            raise IncompatibleScript(f'{os.path.basename(self.module.__file__)} builds its task before a training '
                                     'loader from timm.data.create_loader(is_training=True), whose batches the '
                                     'method must choose')
        try:
            task = self.spec.task_cls(model, self.hparams, **bound)
            self._wire(task, model.num_classes)
        except ValueError as e:  # a model or data set the method cannot train, e.g. a class with one image for BAKE
            raise UsageError(str(e)) from e
        task.register_forward_hook(self.terms.hook, with_kwargs=True)
        self.task = task
        return task

    def _wrap_create_loader(self, create_loader: Callable) -> Callable:
        signature = inspect.signature(create_loader)

        def wrapped(dataset, *a, **kw):
            call = signature.bind(dataset, *a, **kw)
            call.apply_defaults()
            if not call.arguments.get('is_training'):
                return create_loader(dataset, *a, **kw)
            if isinstance(dataset, IterableDataset):
                raise UsageError(f'--dataset {self.args.dataset}: a streamed (iterable) data set cannot be read in '
                                 'the batches a method chooses, one seeded sample at a time')
            self.dataset, self.batch_size = dataset, call.arguments['batch_size']
            self.loader = _LoaderSlot(create_loader(dataset, *a, **kw))
            return self.loader

        return wrapped

    def _wire(self, task: SelfKDTask, num_classes: int) -> None:
        """The method's batches into the training loader and the task (`install_batch_stream`: one call), then
        the facts of the run into the task (`bind_run`)."""
        args = self.args
        loader, self.stream = install_batch_stream(
            self.loader.loader, task, self.hparams, self.dataset, batch_size=self.batch_size, seed=args.seed,
            rank=args.rank, world_size=args.world_size)
        self.loader.swap(loader)
        task.bind_run(RunInfo(
            num_epochs=args.epochs, steps_per_epoch=len(loader), num_samples=len(self.dataset),
            num_classes=num_classes, batch_size=self.batch_size, world_size=args.world_size, rank=args.rank,
            local_rank=args.local_rank, local_world_size=int(os.environ.get('LOCAL_WORLD_SIZE', args.world_size))))
        if args.rank == 0:
            sampler = type(self.stream.batch_sampler).__name__
            self.module._logger.info(f'timm_selfkd: --selfkd {self.spec.name}: {type(task).__name__} ({self.hparams}) '
                                     f'in place of ClassificationTask; batches from {sampler}, {len(loader)} per epoch')

    def _wrap_train_one_epoch(self, train_one_epoch: Callable) -> Callable:
        def wrapped(epoch, *a, **kw):
            if self.task is None:
                raise RuntimeError(f'{PROG}: the script trains without building its ClassificationTask')
            self.stream.set_epoch(epoch)  # v1.0.28 does not tell a batch sampler the epoch
            self.terms.reset()
            self.in_epoch = True
            try:
                metrics = train_one_epoch(epoch, *a, **kw)
            finally:
                self.in_epoch = False
            metrics.update(self.terms.epoch_metrics(self.task.device))
            self.task.sync_task_state()  # every rank, before rank 0 saves the epoch's checkpoint
            return metrics

        return wrapped


def run(path: str, argv: List[str]) -> None:
    """Check, load, patch and run the script at `path` with its command line `argv`.

    Raises:
        UsageError: the script cannot be driven, or the options cannot be used with the method (one line).
    """
    check_script(path)
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python train.py` would, for its own imports
    try:
        module = load_script(path, argv)
        injection = Injection(module)
        injection.install()
        try:
            module.main()
        finally:
            injection.uninstall()
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE)
        sys.exit(0 if argv else 2)
    try:
        run(argv[0], argv[1:])
    except UsageError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
