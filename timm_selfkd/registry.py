"""Method registry: one name -> one `TrainingTask` subclass, its hyper-parameters and its paper.

A method is a `TrainingTask` subclass decorated with `register_method`. Its hyper-parameters are a dataclass
whose fields carry the paper defaults and a help text; the CLI flags (`--dlb-alpha`), YAML keys (`dlb_alpha`)
and `--list-selfkd` are generated from it.

Example:
    >>> @dataclass
    ... class MyHparams:
    ...     weight: float = field(default=1.0, metadata={'help': 'KD weight (eq. 2)'})
    >>> @register_method('mine', hparams=MyHparams, paper='Someone et al., 2024')
    ... class MyTask(SelfKDTask):
    ...     ...

`LAYOUT+METHOD` names a stack (`timm_selfkd.methods.stack`): a batch-layout method on another method, each
part with its own hyper-parameters; stacks are built on demand and not listed.

One task class may be registered under several names (presets of one implementation), each with its own
hyper-parameter dataclass (its fields and paper defaults) and summary; a dataclass belongs to one name only,
which registration writes into it as the class attribute `method` (`hparams.method`: the preset a task runs).

Third-party packages register methods the same way and expose the module that does it through the entry
point group `timm_selfkd.methods`; it is imported the first time the registry is read.
"""
import dataclasses
import difflib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

__all__ = ['MethodSpec', 'register_method', 'register_stack_builder', 'get_method', 'list_methods', 'method_parts',
           'hparam_fields', 'hparam_flag', 'build_hparams']

ENTRY_POINT_GROUP = 'timm_selfkd.methods'


@dataclass(frozen=True)
class MethodSpec:
    """Everything the trainer needs to know about one method."""
    name: str
    task_cls: Type
    hparams_cls: Type
    paper: str
    summary: str


_METHODS: Dict[str, MethodSpec] = {}
_STACKS: Dict[str, MethodSpec] = {}
STACK_SEPARATOR = '+'
_plugins_loaded = False
_stack_builder: Optional[Callable[['MethodSpec', 'MethodSpec'], Tuple[Type, Type]]] = None


def register_stack_builder(builder: Callable[['MethodSpec', 'MethodSpec'], Tuple[Type, Type]]) -> None:
    """Set the function that builds a stack's task class and hyper-parameters from its two parts
    (`timm_selfkd.methods.stack.build_stack`, which registers itself: the registry imports no method)."""
    global _stack_builder
    _stack_builder = builder


def register_method(name: str, *, hparams: Type, paper: str = '', summary: Optional[str] = None):
    """Class decorator that registers a `TrainingTask` subclass under `name`.

    Stack the decorator to register one class under several names (presets): each name has its own
    hyper-parameter dataclass, so the presets can differ in fields, defaults and help texts.

    Args:
        name: CLI/YAML name; also the prefix of the hyper-parameter flags (`--{name}-{field}`, `_` -> `-`).
        hparams: Dataclass of the method's hyper-parameters, defaults as in the paper; used by this name only.
        paper: Citation shown by `--list-selfkd`.
        summary: One line for `--list-selfkd`; default: the first line of the class docstring.
    """
    if not dataclasses.is_dataclass(hparams):
        raise TypeError(f'hparams for method {name!r} must be a dataclass, got {hparams!r}')
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f'method name must be a lower-case identifier, got {name!r}')

    def decorator(task_cls):
        if name in _METHODS and _METHODS[name].task_cls is not task_cls:
            raise ValueError(f'a method named {name!r} is already registered ({_METHODS[name].task_cls.__name__})')
        if vars(hparams).get('method', name) != name:
            raise ValueError(f'hparams {hparams.__name__} already belong to method {hparams.method!r}; '
                             f'give {name!r} a dataclass of its own (a subclass works)')
        doc_line = (task_cls.__doc__ or '').strip().splitlines()[0] if task_cls.__doc__ else ''
        _METHODS[name] = MethodSpec(name, task_cls, hparams, paper, doc_line if summary is None else summary)
        hparams.method = name
        return task_cls

    return decorator


def _load_methods() -> None:
    """Import the installed plug-ins (once); the built-in methods register when the package is imported."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        entry_point.load()


def list_methods() -> List[str]:
    """Names of every registered method, `none` (plain timm classification) first."""
    _load_methods()
    return sorted(_METHODS, key=lambda n: (n != 'none', n))


def get_method(name: str) -> MethodSpec:
    """Return the spec of a registered method or of a stack `LAYOUT+METHOD`; an unknown name raises a ValueError
    with the closest match."""
    _load_methods()
    if STACK_SEPARATOR in name:
        return _stack(name)
    if name not in _METHODS:
        raise ValueError(f'unknown self-KD method {name!r}{did_you_mean(name, _METHODS)}; '
                         f'choose from: {", ".join(list_methods())}')
    return _METHODS[name]


def method_parts(name: str) -> List[str]:
    """The registered methods a name is made of: itself, or the layout and the method of a stack."""
    return name.split(STACK_SEPARATOR)


def _stack(name: str) -> MethodSpec:
    if name not in _STACKS:
        parts = method_parts(name)
        if len(parts) != 2:
            raise ValueError(f'{name!r}: a stack is one batch layout on one method, LAYOUT{STACK_SEPARATOR}METHOD '
                             f'(e.g. ddgsd{STACK_SEPARATOR}dlb)')
        layout, base = (get_method(part) for part in parts)
        task_cls, hparams_cls = _stack_builder(layout, base)
        paper = f'{base.paper}; with the batch layout of {layout.paper}'
        _STACKS[name] = MethodSpec(name, task_cls, hparams_cls, paper, f'{layout.name} batch layout on {base.name}')
        hparams_cls.method = name
    return _STACKS[name]


def hparam_fields(spec: MethodSpec) -> List[dataclasses.Field]:
    """The dataclass fields of a method's hyper-parameters."""
    return list(dataclasses.fields(spec.hparams_cls))


def hparam_flag(method: str, field_name: str) -> str:
    """The command-line flag of a registered method's hyper-parameter: `--{method}-{field}`, `_` -> `-`."""
    return f'--{method}-{field_name}'.replace('_', '-')


def build_hparams(spec: MethodSpec, values: Dict[str, Any]):
    """Instantiate the hyper-parameter dataclass; an unknown name is a ValueError naming the closest field."""
    names = [f.name for f in hparam_fields(spec)]
    for key in values:
        if key not in names:
            raise ValueError(f'method {spec.name!r} has no hyper-parameter {key!r}{did_you_mean(key, names)}')
    if spec.name in _STACKS:  # one dataclass (or a dict of its values) per part
        values = {key: build_hparams(get_method(key), value) if isinstance(value, dict) else value
                  for key, value in values.items()}
    return spec.hparams_cls(**values)


def did_you_mean(word: str, candidates) -> str:
    """A ' (did you mean X?)' suffix for error messages, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else ''
