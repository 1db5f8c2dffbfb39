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
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml
from timm.data import FastCollateMixup

from timm_selfkd.errors import UsageError
from timm_selfkd.cli import add_selfkd_arguments, format_methods, resolve_selfkd_args
from timm_selfkd.methods.base import SelfKDTask
from timm_selfkd.options import REFUSED_OPTIONS, mixup_active, mixup_arguments, read_recipe, refused_options_set
from timm_selfkd.runtime.loss_ledger import LossLedger
from timm_selfkd.wiring import Mixing, MethodWiring

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


class _TermsInLog(logging.Filter):
    """Appends the loss terms to the records the script logs while an epoch trains."""

    def __init__(self, injection: 'Injection'):
        super().__init__()
        self.injection = injection

    def filter(self, record: logging.LogRecord) -> bool:
        ledger = self.injection.ledger
        if self.injection.in_epoch and ledger.sums and isinstance(record.msg, str):
            record.msg = f'{record.msg}  {ledger.text()}'
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
        self.wiring: Optional[MethodWiring] = None
        self.task: Optional[SelfKDTask] = None
        self.loader: Optional[_LoaderSlot] = None
        self.dataset = None
        self.batch_size = 0
        self.stream = None
        self.mixing: Optional[Mixing] = None  # the batch-form Mixup of a method that mixes its batches itself
        self.in_epoch = False
        self.ledger = LossLedger()
        self.log_filter = _TermsInLog(self)

    def install(self) -> None:
        module = self.module
        # the script's own defaults of the options we refuse (before its -c config turns into defaults)
        self.refused_defaults = {option.dest: module.parser.get_default(option.dest) for option in REFUSED_OPTIONS}
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
                self.wiring = MethodWiring(args.selfkd,
                                           resolve_selfkd_args(args, read_recipe(sys.argv[1:]), sys.argv[1:]))
                refused_options_set(args, self.refused_defaults)
                self.wiring.check(batch_size=args.batch_size, bce=bool(getattr(args, 'bce_loss', False)))
            except ValueError as e:
                raise UsageError(str(e)) from e
            self.args = args
            if vars(args) != before and isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], str):
                # a recipe's values of another method were dropped: the saved args.yaml must not carry them
                return args, yaml.safe_dump(args.__dict__, default_flow_style=False)
            return result

        return wrapped

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
            task = self.wiring.create_task(model, mixed=mixup_active(self.args), **bound)
            self._attach(task)
        except ValueError as e:  # a model or data set the method cannot train, e.g. a class with one image for BAKE
            raise UsageError(str(e)) from e
        task.register_forward_hook(self._count, with_kwargs=True)
        self.task = task
        return task

    def _wrap_create_loader(self, create_loader: Callable) -> Callable:
        signature = inspect.signature(create_loader)

        def wrapped(dataset, *a, **kw):
            call = signature.bind(dataset, *a, **kw)
            call.apply_defaults()
            if not call.arguments.get('is_training'):
                return create_loader(dataset, *a, **kw)
            self.wiring.check(batch_size=call.arguments['batch_size'], dataset=dataset)
            self.dataset, self.batch_size = dataset, call.arguments['batch_size']
            if self._task_mixes() and isinstance(call.arguments.get('collate_fn'), FastCollateMixup):
                call.arguments['collate_fn'] = None  # unmixed batches: the method mixes them (`_attach`)
            self.loader = _LoaderSlot(create_loader(*call.args, **call.kwargs))
            return self.loader

        return wrapped

    def _attach(self, task: SelfKDTask) -> None:
        """The method's batches into the training loader and the run's facts into the task (`attach`)."""
        args = self.args
        if self._task_mixes():
            self.mixing = self.wiring.mixing(mixup_arguments(args, task.get_eval_model().num_classes),
                                             prefetcher=False, off_epoch=getattr(args, 'mixup_off_epoch', 0))
        attached = self.wiring.attach(task, loader=self.loader.loader, dataset=self.dataset,
                                      batch_size=self.batch_size, num_epochs=args.epochs, seed=args.seed,
                                      aug_repeats=getattr(args, 'aug_repeats', 0) or 0, mixing=self.mixing)
        self.loader.swap(attached.loader)
        self.stream = attached.stream
        if args.rank == 0:
            batches = type(self.stream.batch_sampler).__name__ if self.stream is not None else 'the data set\'s stream'
            self.module._logger.info(f'timm_selfkd: --selfkd {task.method}: {type(task).__name__} '
                                     f'({self.wiring.hparams}) in place of ClassificationTask; batches from {batches}, '
                                     f'{attached.steps_per_epoch} per epoch')

    def _count(self, module, args, kwargs, output) -> None:
        """Forward hook of the task: its loss terms and images into the epoch's ledger."""
        input = args[0] if args else kwargs.get('input')
        self.ledger.add(output, input.shape[0] if isinstance(input, torch.Tensor) else 0)

    def _task_mixes(self) -> bool:
        """Mixup is on and the method mixes its batches itself: the script's collate or loop must not."""
        return mixup_active(self.args) and self.wiring.task_mixes

    def _wrap_train_one_epoch(self, train_one_epoch: Callable) -> Callable:
        signature = inspect.signature(train_one_epoch)

        def wrapped(epoch, *a, **kw):
            if self.task is None:
                raise RuntimeError(f'{PROG}: the script trains without building its ClassificationTask')
            if self.mixing is not None:
                call = signature.bind(epoch, *a, **kw)
                if 'mixup_fn' in call.arguments:
                    call.arguments['mixup_fn'] = None  # the method mixes (the script's loop would mix again)
                epoch, a, kw = call.args[0], call.args[1:], call.kwargs
                self.mixing.set_epoch(epoch)  # as the script's own switch
            if self.stream is not None:
                self.stream.set_epoch(epoch)  # v1.0.28 does not tell a batch sampler the epoch
            self.ledger = LossLedger()
            self.in_epoch = True
            try:
                metrics = train_one_epoch(epoch, *a, **kw)
            finally:
                self.in_epoch = False
            terms = self.ledger.epoch_metrics(self.task.device, dist.is_available() and dist.is_initialized())
            terms.pop('loss', None)  # the script reports its own loss
            metrics.update(terms, steps=self.ledger.steps)
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
