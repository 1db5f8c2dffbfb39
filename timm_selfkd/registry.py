"""Method registry: one name -> one `TrainingTask` subclass, its hyper-parameters and its paper.

A method is a `TrainingTask` subclass decorated with `register_method`. Its hyper-parameters are a dataclass
whose fields, declared with `hparam`, carry the paper defaults, a help text and the values they take; the CLI
flags (`--dlb-alpha`), YAML keys (`dlb_alpha`), `--help` and `--list-selfkd` are generated from it, and
`build_hparams`, which builds it for the command line, recipes, `create_task` and stacks, checks every value
(`check_hparams`, one message per kind of problem, naming the method and the field).

Example:
    >>> @dataclass
    ... class MyHparams:
    ...     weight: float = hparam(1.0, 'KD weight (eq. 2)', within='[0, inf)')
    ...     temperature: float = hparam(4.0, 'softening temperature (eq. 1)', within='(0, inf)')
    ...     mode: str = hparam('eval', 'mode the copies run in', choices=('eval', 'train'))
    >>> @register_method('mine', hparams=MyHparams, paper='Someone et al., 2024')
    ... class MyTask(SelfKDTask):
    ...     ...

A value that is neither a number in an interval nor one of some choices (a string to parse, e.g. a list of levels)
is checked by a function given as `check=`, which raises a ValueError completing the sentence that names the method
and the field ('must be ..., got ...'). A rule across fields stays in the dataclass's `__post_init__`.

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
import inspect
import math
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

__all__ = ['MethodSpec', 'register_method', 'register_stack_builder', 'get_method', 'list_methods', 'method_parts',
           'hparam', 'Bounds', 'hparam_fields', 'hparam_flag', 'hparam_dest', 'build_hparams', 'check_hparams',
           'constraint_text']

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
        summary: One line for `--list-selfkd`; default: the first sentence of the class docstring.
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
        _METHODS[name] = MethodSpec(name, task_cls, hparams, paper, _first_sentence(task_cls.__doc__)
                                    if summary is None else summary)
        hparams.method = name
        return task_cls

    return decorator


_ABBREVIATIONS = ('e.g.', 'i.e.', 'al.', 'eq.', 'sec.', 'fig.', 'cf.', 'vs.')  # a full stop that ends no sentence


def _first_sentence(doc: Optional[str]) -> str:
    """The first sentence of a docstring's first paragraph, its lines joined ('' for no docstring)."""
    paragraph = ' '.join(inspect.cleandoc(doc or '').split('\n\n')[0].split())
    for end in re.finditer(r'(?<=[.!?])\s+(?=[A-Z`])', paragraph):
        if not paragraph[:end.start()].lower().endswith(_ABBREVIATIONS):
            return paragraph[:end.start()]
    return paragraph


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


def hparam_dest(method: str, field_name: str) -> str:
    """The argparse destination and YAML key of a registered method's hyper-parameter: `{method}_{field}`."""
    return f'{method}_{field_name}'


def build_hparams(spec: MethodSpec, values: Dict[str, Any]):
    """The hyper-parameter dataclass with these values, checked (`check_hparams`); an unknown name or a value it
    does not take is a ValueError naming the method and the field (and an unknown name's closest field)."""
    hparams = _instantiate(spec, values)
    check_hparams(hparams)
    return hparams


def _instantiate(spec: MethodSpec, values: Dict[str, Any]):
    names = [f.name for f in hparam_fields(spec)]
    for key in values:
        if key not in names:
            raise ValueError(f'method {spec.name!r} has no hyper-parameter {key!r}{did_you_mean(key, names)}')
    if spec.name in _STACKS:  # one dataclass (or a dict of its values) per part
        values = {key: _instantiate(get_method(key), value) if isinstance(value, dict) else value
                  for key, value in values.items()}
    return spec.hparams_cls(**values)


# Hyper-parameter declarations and their one check

_INTERVAL = re.compile(r'\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*')


@dataclass(frozen=True)
class Bounds:
    """An interval in the usual notation: '[0, 1]', '(0, inf)', '[0, 1)'; a bracket includes its end, a parenthesis
    excludes it."""
    low: float
    high: float
    low_included: bool
    high_included: bool

    @classmethod
    def parse(cls, text: str) -> 'Bounds':
        match = _INTERVAL.fullmatch(text)
        if match is None:
            raise ValueError(f'an interval is written [low, high], (low, high), [low, high) or (low, high], '
                             f'got {text!r}')
        opening, low, high, closing = match.groups()
        return cls(float(low), float(high), opening == '[', closing == ']')

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = self.low <= value if self.low_included else self.low < value
        below = value <= self.high if self.high_included else value < self.high
        return above and below

    def __str__(self) -> str:
        """'>= 0', '> 0' for a half-line, else 'in [0, 1)'."""
        if math.isinf(self.high):
            return f'{">=" if self.low_included else ">"} {self.low:g}'
        return f'in {"[" if self.low_included else "("}{self.low:g}, {self.high:g}{"]" if self.high_included else ")"}'


def hparam(default: Any, help: str, *, within: Optional[str] = None, choices: Optional[Sequence[Any]] = None,
           check: Optional[Callable[[Any], Any]] = None, default_text: Optional[str] = None) -> Any:
    """A dataclass field of a method's hyper-parameters.

    Args:
        default: The paper's value; None for one the run resolves (then `default_text` says how, e.g. '2.5/K').
        help: What it is, where the paper defines it, what the official code uses.
        within: The interval of valid numbers, e.g. '[0, 1]' (`Bounds`).
        choices: The valid values.
        check: A function of the value that raises a ValueError saying what is wrong ('must be ..., got ...').
        default_text: The default as shown to users, for a default the run resolves.
    """
    metadata = {'help': help, 'within': within and Bounds.parse(within), 'choices': choices and tuple(choices),
                'check': check, 'default_text': default_text}
    return dataclasses.field(default=default, metadata={key: value for key, value in metadata.items() if value})


def check_hparams(hparams: Any) -> None:
    """Raise a ValueError naming the method and the hyper-parameter, for the first value of `hparams` outside its
    interval or choices or refused by its check; a field that holds hyper-parameters (a part of a stack) is checked
    in turn. None passes where it is the default (a value the run resolves)."""
    method = getattr(hparams, 'method', type(hparams).__name__)
    for field in dataclasses.fields(hparams):
        value = getattr(hparams, field.name)
        if dataclasses.is_dataclass(value):
            check_hparams(value)
        elif value is not None or field.default is not None:
            problem = _problem(field, value)
            if problem:
                raise ValueError(f'{method} {field.name} {problem}')


def _problem(field: dataclasses.Field, value: Any) -> str:
    bounds, choices, check = (field.metadata.get(key) for key in ('within', 'choices', 'check'))
    if (bounds is not None and value not in bounds) or (choices is not None and value not in choices):
        return f'must be {constraint_text(field)}, got {value!r}'
    if check is not None:
        try:
            check(value)
        except ValueError as e:
            return str(e)
    return ''


def constraint_text(field: dataclasses.Field) -> str:
    """The values a hyper-parameter takes, as declared: '>= 0', 'in [0, 1)', 'one of eval, train' ('' if not)."""
    bounds, choices = field.metadata.get('within'), field.metadata.get('choices')
    return ' and '.join(filter(None, (bounds and str(bounds), choices and f'one of {", ".join(map(str, choices))}')))


def did_you_mean(word: str, candidates) -> str:
    """A ' (did you mean X?)' suffix for error messages, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f' (did you mean {close[0]!r}?)' if close else ''
