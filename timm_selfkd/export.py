"""`python -m timm_selfkd.export RUN_DIR OUT_DIR`: a trained run's model in timm's Hugging Face layout.

OUT_DIR gets what `timm.create_model('local-dir:OUT_DIR', pretrained=True)` (or `'hf-hub:REPO'` once pushed)
loads, written by timm's own `save_for_hf`: `config.json` (architecture, classes, construction arguments and the
run's evaluation preprocessing as the pretrained config) and `model.safetensors`, the plain timm model (the parts a
method trains besides it live in the checkpoint's task state and are not exported); and `README.md`, the model
card (`timm_selfkd.model_card`) rendered by timm's `generate_readme`. `--push-to-hub REPO` uploads the same with
timm's `push_to_hf_hub`.

The weights are `model_best.pth.tar`'s (`--checkpoint last`: `last.pth.tar`'s), their EMA when the run kept one
(`--no-ema`: the trained weights). OUT_DIR is written into a temporary folder beside it and renamed into place, so
an error leaves no half-written OUT_DIR.
"""
import argparse
import csv
import importlib.util
import inspect
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional

import timm
import yaml
from timm.data import resolve_data_config
from timm.models import clean_state_dict, push_to_hf_hub, save_for_hf
from timm.models._hub import generate_readme

from timm_selfkd.errors import UsageError, first_line
from timm_selfkd.model_card import ExportedWeights, method_record, model_card
from timm_selfkd.options import model_arguments
from timm_selfkd.runtime.checkpoint import load_error, read_checkpoint

__all__ = ['main']

PROG = 'python -m timm_selfkd.export'
CHECKPOINTS = {'best': 'model_best.pth.tar', 'last': 'last.pth.tar'}
# pretrained-config entries that describe timm's published weights of the architecture, not the run's
SOURCE_WEIGHTS_KEYS = ('tag', 'license', 'origin_url', 'paper_ids', 'paper_name', 'notes')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0].split(': ', 1)[1])
    parser.add_argument('run_dir', metavar='RUN_DIR', help='a run folder of train.py (args.yaml, summary.csv, '
                                                           'model_best.pth.tar, last.pth.tar)')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='the folder to write: new or empty (see --force)')
    parser.add_argument('--checkpoint', choices=sorted(CHECKPOINTS), default='best',
                        help='model_best.pth.tar or last.pth.tar (default: best)')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                        help='export the EMA weights (default: when the run kept them, --model-ema); '
                             '--no-ema: the trained weights')
    parser.add_argument('--force', action='store_true', help='replace OUT_DIR when it holds files')
    parser.add_argument('--push-to-hub', metavar='REPO', default=None,
                        help='also upload to the Hugging Face Hub repository REPO (user/name) with timm\'s '
                             'push_to_hf_hub (log in first: hf auth login); the card is uploaded when the '
                             'repository has none')
    parser.add_argument('--private', action='store_true', help='create the Hub repository private')
    return parser.parse_args(argv)


def check_packages() -> None:
    """The Hub client and safetensors (timm's dependencies), and a timm whose save_for_hf takes the data config."""
    missing = [name for name in ('huggingface_hub', 'safetensors') if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f'exporting needs {" and ".join(missing)}: pip install {" ".join(missing)}')
    if 'data_config' not in inspect.signature(save_for_hf).parameters:
        raise UsageError(f'exporting needs timm 1.0.31 or newer (its save_for_hf writes the run\'s preprocessing), '
                         f'installed: {timm.__version__}: pip install -U timm')


def check_out_dir(out_dir: str, run_dir: str, force: bool) -> None:
    out = os.path.realpath(out_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f'OUT_DIR {out_dir!r} exists and is not a folder')
    if os.path.commonpath([out, os.path.realpath(run_dir)]) == out:
        raise UsageError(f'OUT_DIR {out_dir!r} is the run folder or holds it: choose another folder')
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise UsageError(f'OUT_DIR {out_dir!r} exists and holds files: choose another folder, or replace it '
                         'with --force')


def read_run(run_dir: str, which: str):
    """args.yaml (the recipe), summary.csv's rows, the checkpoint and its file name; a folder that is no run
    folder, or lacks the checkpoint, is a one-line error."""
    if not os.path.isdir(run_dir):
        raise UsageError(f'RUN_DIR {run_dir!r} is not a folder')
    missing = [name for name in ('args.yaml', 'summary.csv') if not os.path.isfile(os.path.join(run_dir, name))]
    if missing:
        raise UsageError(f'{run_dir!r} is not a run folder of train.py: it has no {" and no ".join(missing)}')
    with open(os.path.join(run_dir, 'args.yaml')) as f:
        try:
            recipe = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise UsageError(f'{os.path.join(run_dir, "args.yaml")!r} is not YAML: {str(e).splitlines()[0]}') from e
    if not isinstance(recipe, dict):
        raise UsageError(f'{os.path.join(run_dir, "args.yaml")!r} holds no run arguments')
    with open(os.path.join(run_dir, 'summary.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    name = CHECKPOINTS[which]
    if not os.path.isfile(os.path.join(run_dir, name)):
        others = [key for key, other in CHECKPOINTS.items() if os.path.isfile(os.path.join(run_dir, other))]
        hint = f': export {CHECKPOINTS[others[0]]} with --checkpoint {others[0]}' if others else \
            ' (train.py writes it when an epoch ends; a recovery checkpoint is not exported: resume the run)'
        raise UsageError(f'{run_dir!r} has no {name}{hint}')
    checkpoint = read_checkpoint(os.path.join(run_dir, name))
    if not isinstance(checkpoint.get('args'), argparse.Namespace):
        raise UsageError(f'{os.path.join(run_dir, name)!r} records no run arguments (args): not a checkpoint of '
                         'train.py or timm\'s train.py')
    return recipe, rows, checkpoint, name


def trained_model(checkpoint: Dict[str, Any], ema: Optional[bool], path: str):
    """The plain timm model of the run with the chosen weights (the EMA's by default when kept), in eval mode."""
    kept = checkpoint.get('state_dict_ema') is not None
    if ema and not kept:
        raise UsageError(f'{path!r} holds no EMA weights (the run was trained without --model-ema): export the '
                         'trained weights without --ema')
    use_ema = kept if ema is None else ema
    run_args = checkpoint['args']
    kwargs = model_arguments(run_args, training=False)  # the drop rates do not shape the evaluated model
    try:
        model = timm.create_model(run_args.model, **kwargs)
        model.load_state_dict(clean_state_dict(checkpoint['state_dict_ema' if use_ema else 'state_dict']))
    except (RuntimeError, TypeError) as e:  # an unknown model, arguments it does not take, weights that do not fit
        raise UsageError(f'{path!r} does not load into {run_args.model} {kwargs}: {load_error(e)}') from e
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in SOURCE_WEIGHTS_KEYS}
    return model.eval(), use_ema


def write_atomically(out_dir: str, write) -> None:
    """`write(folder)` into a temporary folder beside OUT_DIR, then renamed into place (replacing OUT_DIR)."""
    out = os.path.abspath(out_dir)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.', suffix='.partial', dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # a folder as os.makedirs makes it (mkdtemp's is private)
    except OSError as e:
        raise UsageError(f'cannot write OUT_DIR {out_dir!r}: {e.strerror or e}') from e
    try:
        write(staging)
        if os.path.exists(out):  # empty, or replaced with --force
            old = staging[:-len('.partial')] + '.old'
            os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old)
        else:
            os.rename(staging, out)
    except OSError as e:
        raise UsageError(f'cannot write OUT_DIR {out_dir!r}: {e.strerror or e}') from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export(args: argparse.Namespace) -> None:
    check_packages()
    check_out_dir(args.out_dir, args.run_dir, args.force)
    recipe, rows, checkpoint, name = read_run(args.run_dir, args.checkpoint)
    try:
        method = method_record(recipe)
    except ValueError as e:  # a method not registered here, or a recorded value it refuses
        raise UsageError(f'{os.path.join(args.run_dir, "args.yaml")!r}: {e}') from e
    path = os.path.join(args.run_dir, name)
    model, ema = trained_model(checkpoint, args.ema, path)
    run_args = checkpoint['args']
    data_config = resolve_data_config(vars(run_args), model=model)  # as train.py's evaluation loader
    weights = ExportedWeights(name, checkpoint['epoch'], ema, best=args.checkpoint == 'best')
    load_name = f'hf-hub:{args.push_to_hub}' if args.push_to_hub else f'local-dir:{args.out_dir}'
    card = model_card(method, recipe, rows, run_args, model, data_config, weights, load_name)
    model_name = (args.push_to_hub or os.path.abspath(args.out_dir)).rstrip('/').rsplit('/', 1)[-1]

    def write(folder: str) -> None:
        save_for_hf(model, folder, data_config=data_config, safe_serialization=True)
        with open(os.path.join(folder, 'README.md'), 'w', encoding='utf-8') as f:
            f.write(generate_readme(card, model_name))

    write_atomically(args.out_dir, write)
    print(f'{PROG}: exported {weights.describe(run_args)} from {args.run_dir} to {args.out_dir} '
          f'({", ".join(sorted(os.listdir(args.out_dir)))}); load it with '
          f'timm.create_model({f"local-dir:{args.out_dir}"!r}, pretrained=True)')
    if args.push_to_hub:
        push(model, args.push_to_hub, card, data_config, args.private, args.out_dir)


def push(model, repo: str, card: Dict[str, Any], data_config: Dict[str, Any], private: bool, out_dir: str) -> None:
    try:
        commit = push_to_hf_hub(model, repo, commit_message=f'Add {model.pretrained_cfg["architecture"]} trained '
                                                            'with timm-selfkd', private=private, model_card=card,
                                data_config=data_config, safe_serialization=True)
    except Exception as e:  # the Hub client's errors (network, login, permission) share no base class
        reason = first_line(e)
        print(f'{PROG}: error: pushing to {repo!r} failed ({reason}); {out_dir} is complete', file=sys.stderr)
        sys.exit(1)
    print(f'{PROG}: pushed to the Hugging Face Hub: {commit}')


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    try:
        export(args)
    except UsageError as e:
        print(f'{PROG}: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
