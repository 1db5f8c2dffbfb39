"""Checkpoints of a run: written atomically, with the loop's position, and read back with one-line errors.

Every checkpoint (`last`, `checkpoint-N`, `model_best`, `recovery-E-S`) holds timm's entries (`state_dict`, which
loads in plain `timm.create_model(..., checkpoint_path=...)`, `task_state`, `optimizer`, EMA, loss scaler,
`args`, `epoch`) and `loop`: the epoch, the steps of it already trained, the update count, the scheduler and
the epoch's running loss sums. A run resumed from it continues at the next step with the same batches; with
the per-step and per-sample seeding of `timm_selfkd.runtime.batch_stream` nothing else is needed to reproduce the rest of the
run exactly.
"""
import argparse
import os
import pickle
import zipfile
from typing import Any, Callable, Dict

import torch
from timm.utils import CheckpointSaver

from timm_selfkd.errors import UsageError

__all__ = ['AMP_SCALER_KEY', 'RunSaver', 'read_checkpoint', 'check_same_run', 'load_error']

AMP_SCALER_KEY = 'amp_scaler'  # timm's key for the fp16 loss scaler's state


class RunSaver(CheckpointSaver):
    """timm's `CheckpointSaver` whose files are complete on disk before they replace the previous ones.

    A file is written to a temporary name, flushed to disk and renamed over its target, so a kill or a full
    disk during a save leaves the previous checkpoint intact. Each file gets the loop's position from
    `loop_state()`.
    """

    def __init__(self, *args, loop_state: Callable[[], Dict[str, Any]], **kwargs):
        super().__init__(*args, **kwargs)
        self.loop_state = loop_state

    def _replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)  # atomic; timm's version unlinks dst first, leaving a moment with no checkpoint

    def _save(self, save_path: str, epoch: int, metric=None) -> None:
        state = {'epoch': epoch, 'arch': self.args.model, 'args': self.args, 'version': 2,
                 'optimizer': self.optimizer.state_dict()}
        if self.amp_scaler is not None:
            state[AMP_SCALER_KEY] = self.amp_scaler.state_dict()
        state.update(self.task.get_checkpoint_state(unwrap_fn=self.unwrap_fn))
        state.update(self.task.get_checkpoint_state(ema=True, unwrap_fn=self.unwrap_fn))
        if metric is not None:
            state['metric'] = metric
        state['saver'] = self.state_dict(epoch, metric)
        state['loop'] = self.loop_state()
        try:
            with open(save_path, 'wb') as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            if os.path.exists(save_path):
                os.remove(save_path)
            raise


def read_checkpoint(path: str) -> Dict[str, Any]:
    """Load a training checkpoint on the CPU (tensors and plain values only); a missing, truncated or corrupt
    file, or one that is no training checkpoint, is a `UsageError` naming it."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f'checkpoint {path!r} is truncated or corrupt ({reason})') from e
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise UsageError(f'{path!r} is not a training checkpoint (no state_dict); use --initial-checkpoint for '
                         'model weights')
    return checkpoint


def check_same_run(checkpoint: Dict[str, Any], args: argparse.Namespace, path: str) -> None:
    """Refuse to resume a checkpoint of another model or another self-KD method (its state would not apply)."""
    saved = checkpoint.get('args')
    if saved is None:
        return
    if getattr(saved, 'model', args.model) != args.model:
        raise UsageError(f'checkpoint {path!r} is of model {saved.model!r}, not {args.model!r}')
    method = getattr(saved, 'selfkd', 'none')
    if method != args.selfkd:
        raise UsageError(f'checkpoint {path!r} was trained with --selfkd {method}, not {args.selfkd}: resume it '
                         f'with --selfkd {method}, or start {args.selfkd} from its weights with --initial-checkpoint')


def load_error(error: RuntimeError) -> str:
    """The first specific line of a `load_state_dict` error (e.g. `size mismatch for fc.weight: ...`)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
