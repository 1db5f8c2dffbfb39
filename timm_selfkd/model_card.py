"""The model card of an exported run: timm's model-card record (`timm.models._hub.generate_readme` renders it,
for `OUT_DIR/README.md` and for the Hub) naming the method, its paper and hyper-parameters, the exported weights,
the recipe and the run's metrics from `summary.csv`."""
import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import yaml

from timm_selfkd.cli import method_hparams
from timm_selfkd.registry import MethodSpec, get_method

__all__ = ['ExportedWeights', 'method_record', 'model_card']

# the bare model's evaluation columns of summary.csv (per-exit and ensemble columns are of training-only parts)
MODEL_METRICS = ('top1', 'top5', 'loss', 'nll', 'ece', 'aurc')
# the recipe keys a reader looks for first; read from the checkpoint's arguments (the lr there is resolved)
SALIENT_KEYS = ('model', 'pretrained', 'num_classes', 'epochs', 'batch_size', 'world_size', 'opt', 'lr',
                'weight_decay', 'sched', 'warmup_epochs', 'smoothing', 'mixup', 'cutmix', 'aa', 'drop_path',
                'model_ema', 'model_ema_decay', 'amp', 'seed')
# recipe keys that name the trainer's local files or its own trackers: left out of a card meant to be shared
LOCAL_PATH_KEYS = ('data_dir', 'data', 'output', 'experiment', 'resume', 'initial_checkpoint', 'pretrained_path',
                   'class_map', 'log_wandb', 'wandb_project', 'wandb_tags', 'wandb_resume_id', 'log_tensorboard')


@dataclasses.dataclass(frozen=True)
class ExportedWeights:
    """Which weights of the run are exported."""
    file: str  # model_best.pth.tar or last.pth.tar
    epoch: int
    ema: bool
    best: bool  # the run's best checkpoint (by the trained weights' eval metric)

    def describe(self, run_args: argparse.Namespace) -> str:
        kind = f'the EMA of the trained weights (decay {run_args.model_ema_decay})' if self.ema else \
            'the trained weights'
        chosen = f', the best eval {run_args.eval_metric} of the run' if self.best else ''
        return f'{kind} of {self.file} (epoch {self.epoch}{chosen})'


class _Recipe(argparse.Namespace):
    """`args.yaml` as parsed arguments; a key it lacks (a hyper-parameter added after the run) is unset."""

    def __getattr__(self, name: str):
        if name.startswith('_'):
            raise AttributeError(name)
        return None


def method_record(recipe: Dict[str, Any]) -> Tuple[MethodSpec, Any]:
    """The run's method (`selfkd`; none when unset) and its hyper-parameters: the recorded values, the rest the
    registry's defaults. A method not registered here, or a value it refuses, is a ValueError."""
    spec = get_method(recipe.get('selfkd') or 'none')
    return spec, method_hparams(_Recipe(**recipe))


def _flat(values: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
    """A stack's hyper-parameters (one record per part) as `part.name` keys."""
    flat = {}
    for key, value in values.items():
        flat.update(_flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
    return flat


def _metrics(row: Dict[str, str], ema: bool) -> Dict[str, float]:
    prefix = 'eval_ema_' if ema else 'eval_'
    return {name: round(float(row[prefix + name]), 4) for name in MODEL_METRICS if row.get(prefix + name)}


def _row_of(rows: List[Dict[str, str]], epoch: int) -> Optional[Dict[str, str]]:
    """The epoch's last row (a run resumed from an earlier checkpoint writes an epoch's row again)."""
    return next((row for row in reversed(rows) if row.get('epoch') == str(epoch)), None)


def _evaluations(rows: List[Dict[str, str]], weights: ExportedWeights) -> Dict[str, Any]:
    """The metrics of the exported kind of weights at the exported epoch and, when that is another, at the end."""
    kind = 'EMA weights' if weights.ema else 'trained weights'
    exported, final = _row_of(rows, weights.epoch), rows[-1] if rows else None
    found = {f'Evaluation of the {kind}, epoch {weights.epoch} (summary.csv)': exported}
    if final is not None and final is not exported:
        found[f'Evaluation of the {kind} at the end of the run, epoch {final["epoch"]} (summary.csv)'] = final
    return {label: (_metrics(row, weights.ema) if row else {}) or 'not evaluated' for label, row in found.items()}


def _training_data(run_args: argparse.Namespace) -> str:
    if run_args.dataset:
        return run_args.dataset
    folder = str(run_args.data_dir or run_args.data or '').rstrip('/')
    return f'an image folder ({folder.rsplit("/", 1)[-1]})' if folder else 'an image folder'


def _initialisation(run_args: argparse.Namespace, model) -> str:
    if getattr(run_args, 'pretrained_path', None) or getattr(run_args, 'initial_checkpoint', None):
        return 'weights from a local file'
    if getattr(run_args, 'pretrained', False):
        return f'timm\'s pretrained {model.pretrained_cfg.get("hf_hub_id") or run_args.model}'
    return 'random (trained from scratch)'


def _usage(load_name: str, recipe: Dict[str, Any]) -> str:
    shared = {key: value for key, value in recipe.items() if value is not None and key not in LOCAL_PATH_KEYS}
    return (f'```python\nimport timm\n\nmodel = timm.create_model({load_name!r}, pretrained=True).eval()\n'
            'config = timm.data.resolve_data_config({}, model=model)  # the run\'s evaluation preprocessing\n'
            'transform = timm.data.create_transform(**config)\n'
            'logits = model(transform(image).unsqueeze(0))  # image: a PIL image\n```\n\n'
            'Train it again with timm-selfkd: save the recipe below as `recipe.yaml` and run '
            '`python train.py -c recipe.yaml --data-dir DATA`.\n\n'
            '<details><summary>The run\'s recipe (args.yaml without its unset keys, local paths and trackers)'
            '</summary>\n\n'
            f'```yaml\n{yaml.safe_dump(shared, sort_keys=False)}```\n</details>\n')


def model_card(method: Tuple[MethodSpec, Any], recipe: Dict[str, Any], rows: List[Dict[str, str]],
               run_args: argparse.Namespace, model, data_config: Dict[str, Any], weights: ExportedWeights,
               load_name: str) -> Dict[str, Any]:
    """timm's model-card record of the run (`method`: `method_record(recipe)`; `recipe`: args.yaml; `rows`:
    summary.csv; `run_args`: the checkpoint's arguments; `load_name`: what `timm.create_model` loads it from)."""
    spec, hparams = method
    plain = spec.name == 'none'
    trained_with = 'plain timm training (no self-knowledge distillation)' if plain else \
        f'the self-knowledge-distillation method `{spec.name}` ({spec.paper})'
    details = {
        'Model Type': 'Image classification',
        'Architecture': run_args.model,
        'Self-KD method': 'none' if plain else spec.name,
        **({} if plain else {'Paper': spec.paper}),
        **({'Hyper-parameters': _flat(dataclasses.asdict(hparams))} if dataclasses.fields(hparams) else {}),
        'Weights': weights.describe(run_args),
        'Params (M)': round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        'Image size': ' x '.join(map(str, data_config['input_size'][1:])),
        'Training data': _training_data(run_args),
        'Initialisation': _initialisation(run_args, model),
        'Recipe': {key: getattr(run_args, key) for key in SALIENT_KEYS if getattr(run_args, key, None) is not None},
        **_evaluations(rows, weights),
    }
    return {
        'tags': ['image-classification', 'timm', 'timm-selfkd', f'selfkd-{spec.name.replace("+", "-")}'],
        'description': f'A {run_args.model} image classifier trained with {trained_with} by timm-selfkd. The exported '
                       'model is the plain timm model: parts a method adds for training only are not in it.',
        'details': details,
        'usage': _usage(load_name, recipe),
    }
