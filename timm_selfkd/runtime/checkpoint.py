"""Checkpoints of a run: written atomically, with the loop's position, and read back with one-line errors.

Every checkpoint (`last`, `checkpoint-N`, `model_best`, `recovery-E-S`) holds timm's entries (`state_dict`, which
loads in plain `timm.create_model(..., checkpoint_path=...)`, `task_state`, `optimizer`, EMA, loss scaler,
`args`, `epoch`) and `loop`: the epoch, the steps of it already trained, the update count, the scheduler,
the epoch's running loss sums and the run's wandb id (`timm_selfkd.runtime.trackers`). A run resumed from it
continues at the next step with the same batches; with the per-step and per-sample seeding of
`timm_selfkd.runtime.batch_stream` nothing else is needed to reproduce the rest of the run exactly.
"""
import argparse
import errno
import logging
import os
import pickle
import shutil
import zipfile
from typing import Any, Callable, Dict, Optional, Set

import torch
from timm.utils import CheckpointSaver

from timm_selfkd.errors import UsageError, first_line

__all__ = ['AMP_SCALER_KEY', 'RunSaver', 'CheckpointWriteError', 'read_checkpoint', 'check_same_run', 'load_error',
           'is_temporary', 'remove_partial_files']

_logger = logging.getLogger(__name__)

AMP_SCALER_KEY = 'amp_scaler'  # timm's key for the fp16 loss scaler's state
_TIMM_TEMPORARIES = ('tmp.pth.tar', 'recovery_tmp.pth.tar')  # timm's names for `last` and a recovery being written
_TMP_SUFFIX = '.tmp'  # ours: a copy of `last` (checkpoint-N, model_best) being made
_writing: Set[str] = set()  # temporary files of the saves in progress in this process


def is_temporary(path: str) -> bool:
    """Whether `path` is the temporary file of a checkpoint save (complete or not, it is never loaded)."""
    name = os.path.basename(path)
    return name in _TIMM_TEMPORARIES or name.endswith('.pth.tar' + _TMP_SUFFIX)


def remove_partial_files() -> None:
    """Remove the temporary files of the saves in progress: for an exit at once (a second stop signal), which
    runs no `finally`. Safe in a signal handler: a file already renamed into place is not there any more."""
    for path in list(_writing):
        try:
            os.unlink(path)
        except OSError:
            pass
    _writing.clear()


def _discard(path: str) -> None:
    _writing.discard(path)
    try:
        os.unlink(path)
    except OSError:
        pass


def _os_error(error: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write: torch's zip writer reports a failed `write` of its file object as a
    RuntimeError ('unexpected pos') whose context is the OSError (ENOSPC, EIO, ...)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _ByteCount:
    """A file object that only counts what is written to it (the size of a checkpoint, without a disk)."""

    def __init__(self):
        self.bytes = 0

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self.bytes += size
        return size

    def flush(self) -> None:
        pass


def _bytes(count: int) -> str:
    unit = next(u for u in range(4, -1, -1) if count >= 1024 ** u or u == 0)
    return f'{count} bytes' + (f' ({count / 1024 ** unit:.1f} {"KMGT"[unit - 1]}iB)' if unit else '')


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written: the file, why, the bytes it needs and the free space there."""

    def __init__(self, path: str, error: OSError, needed: Optional[int]):
        folder = os.path.dirname(os.path.abspath(path))
        existing = folder
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        try:
            free = f'{_bytes(shutil.disk_usage(existing).free)} free in {existing}'
        except OSError:
            free = f'free space in {existing} unknown'
        needs = f'it needs {_bytes(needed)}' if needed is not None else 'its size unknown'
        gone = '' if os.path.isdir(folder) else f'; the folder {folder} is gone'
        self.path, self.needed = path, needed
        self.message = f'cannot write checkpoint {path}: {error.strerror or error} ({needs}, {free}){gone}'
        super().__init__(error.errno or errno.EIO, self.message)

    def __str__(self) -> str:
        return self.message


class RunSaver(CheckpointSaver):
    """timm's `CheckpointSaver` whose files are complete on disk before they replace the previous ones.

    A file is written to a temporary name, flushed to disk and renamed over its target (copies of `last`, i.e.
    `checkpoint-N` and `model_best`, too), so a kill or a full disk during a save leaves the previous checkpoint
    intact. A failed write removes its temporary file and raises `CheckpointWriteError` (the file, the bytes it
    needs, the free space); a second stop signal during a save removes it too (`remove_partial_files`), and the
    temporary files of an earlier run that was killed mid-save are removed when the saver starts. Each file gets
    the loop's position from `loop_state()`.
    """

    def __init__(self, *args, loop_state: Callable[[], Dict[str, Any]], **kwargs):
        super().__init__(*args, **kwargs)
        self.loop_state = loop_state
        self._target = ''  # the file the save in progress is for (its temporary file is named by timm)
        for folder in {self.checkpoint_dir, self.recovery_dir}:
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                if is_temporary(name):
                    _logger.warning(f'removing {os.path.join(folder, name)}: the temporary file of a checkpoint '
                                    'save that did not finish')
                    _discard(os.path.join(folder, name))

    def save_checkpoint(self, epoch: int, metric=None):
        self._target = os.path.join(self.checkpoint_dir, 'last' + self.extension)
        return super().save_checkpoint(epoch, metric)

    def save_recovery(self, epoch: int, batch_idx: int = 0) -> None:
        self._target = os.path.join(self.recovery_dir, f'{self.recovery_prefix}-{epoch}-{batch_idx}{self.extension}')
        super().save_recovery(epoch, batch_idx)

    def _replace(self, src: str, dst: str) -> None:
        try:
            os.replace(src, dst)  # atomic; timm's version unlinks dst first, leaving a moment with no checkpoint
        except OSError as e:
            size = os.path.getsize(src) if os.path.exists(src) else None
            _discard(src)
            raise CheckpointWriteError(dst, e, size) from e
        _writing.discard(src)

    def _duplicate(self, src: str, dst: str) -> None:
        """`dst` becomes a copy of `src` (a hard link where the file system has them), atomically."""
        tmp = dst + _TMP_SUFFIX
        _writing.add(tmp)
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            try:
                os.link(src, tmp)
            except OSError:  # no hard links here (or across these folders): a copy
                shutil.copy2(src, tmp)
        except OSError as e:
            _discard(tmp)
            raise CheckpointWriteError(dst, e, os.path.getsize(src) if os.path.exists(src) else None) from e
        self._replace(tmp, dst)

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
        _writing.add(save_path)
        try:
            with open(save_path, 'wb') as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as e:
            _discard(save_path)
            cause = _os_error(e) if isinstance(e, (OSError, RuntimeError)) else None
            if cause is None:
                raise
            counter = _ByteCount()
            torch.save(state, counter)
            raise CheckpointWriteError(self._target or save_path, cause, counter.bytes) from e


def read_checkpoint(path: str, mmap: bool = False) -> Dict[str, Any]:
    """Load a training checkpoint on the CPU (tensors and plain values only); a missing, truncated or corrupt
    file, or one that is no training checkpoint, is a `UsageError` naming it. With `mmap`, tensors are read only
    when used (the file's structure is still checked whole)."""
    if not os.path.isfile(path):
        raise UsageError(f'checkpoint {path!r} does not exist')
    if is_temporary(path):
        raise UsageError(f'{path!r} is the temporary file of a checkpoint save that did not finish, never a '
                         'checkpoint: resume last.pth.tar or the newest recovery-E-S.pth.tar of its folder')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = first_line(e)
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
