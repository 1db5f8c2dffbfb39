"""A run's folder: never overwritten by a new run, written by one run at a time, and where `--resume auto` finds
the checkpoint to continue.

A folder holds a run when it has the run's `summary.csv` or a checkpoint (`last`, `model_best`, `checkpoint-N`,
`recovery-E-S`; not the temporary file of a save). `args.yaml` alone does not count: a run writes it first, and a
run that ended before its first checkpoint or summary row left nothing to continue or to lose (a run still going
holds the folder's lock).
"""
import fcntl
import logging
import os
import re
import socket
from typing import List, Optional, Tuple

from timm_selfkd.errors import UsageError
from timm_selfkd.runtime.checkpoint import is_temporary, read_checkpoint

__all__ = ['LOCK_NAME', 'run_files', 'refuse_new_run', 'newest_checkpoint', 'auto_resume', 'FolderLock']

_logger = logging.getLogger(__name__)

LOCK_NAME = '.lock'
_SUMMARY = 'summary.csv'
_LAST = 'last.pth.tar'
_NAMED = (re.compile(r'recovery-(\d+)-(\d+)\.pth\.tar'), re.compile(r'checkpoint-(\d+)\.pth\.tar'))


def run_files(folder: str) -> List[str]:
    """The files of `folder` that make it a run's (see the module's docstring), sorted; [] for no folder."""
    if not os.path.isdir(folder):
        return []
    return sorted(name for name in os.listdir(folder)
                  if name == _SUMMARY or (name.endswith('.pth.tar') and not is_temporary(name)))


def _shown(names: List[str], most: int = 3) -> str:
    return ', '.join(names[:most]) + (f' and {len(names) - most} more' if len(names) > most else '')


def refuse_new_run(folder: str) -> None:
    """A `UsageError` naming the ways on when `folder` already holds a run."""
    found = run_files(folder)
    if found:
        raise UsageError(f'{folder} already holds a run ({_shown(found)}): continue it with --resume auto (or '
                         '--resume FILE), or start a new run with another --experiment')


def _position(name: str) -> Optional[Tuple[int, int, int]]:
    """(epoch, 1 at the epoch's end else 0, step) of a recovery or epoch checkpoint, from its name."""
    recovery, epoch = (pattern.fullmatch(name) for pattern in _NAMED)
    if recovery:
        return int(recovery[1]), 0, int(recovery[2])
    return (int(epoch[1]), 1, 0) if epoch else None


def _loads(path: str) -> Optional[dict]:
    try:
        return read_checkpoint(path, mmap=True)
    except UsageError as e:
        _logger.warning(f'--resume auto: skipping a checkpoint that does not load: {e}')
        return None


def newest_checkpoint(folder: str) -> Optional[str]:
    """The checkpoint `--resume auto` continues: the newest one of `folder` that loads (`read_checkpoint`), from
    `recovery-E-S` (epoch E, S steps done), `checkpoint-N` and `last` (the newest epoch checkpoint); one that does
    not load is skipped with a warning. None when there is none."""
    best = None  # (position, path); `last` wins a tie with the checkpoint-N it was copied to
    last = os.path.join(folder, _LAST)
    if os.path.isfile(last):
        checkpoint = _loads(last)
        if checkpoint is not None:
            best = ((checkpoint.get('epoch', -1), 1, 1), last)
    positions = {name: _position(name) for name in run_files(folder)}
    for position, name in sorted(((position, name) for name, position in positions.items() if position),
                                 reverse=True):
        if best is not None and position <= best[0]:
            break
        if _loads(os.path.join(folder, name)) is not None:
            best = (position, os.path.join(folder, name))
            break
    return best[1] if best else None


def auto_resume(folder: str) -> str:
    """What `--resume auto` resumes in `folder`: its newest checkpoint that loads, or '' (a new run) when the folder
    holds no run; a run without a checkpoint that loads (all damaged, or one that diverged before its first) is a
    `UsageError`."""
    newest = newest_checkpoint(folder)
    if newest:
        return newest
    found = run_files(folder)
    if found:
        raise UsageError(f'--resume auto: {folder} holds a run ({_shown(found)}) but no checkpoint that loads to '
                         'continue it: start a new run with another --experiment')
    _logger.info(f'--resume auto: no checkpoint in {folder}: a new run')
    return ''


class FolderLock:
    """This process's hold on a run folder: `fcntl.flock` on its `.lock` file, which names the holder.

    The kernel releases the lock when the process ends, however it ends (a crash, SIGKILL), so a stale `.lock`
    file never blocks a later run. `release` removes the file while still holding the lock; a process that opened
    the removed file sees that it no longer is the folder's and opens the new one.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        """Hold the folder, or raise a `UsageError` naming the run that holds it. On a file system without locks,
        warn and go on unguarded."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'a process'
                os.close(fd)
                raise UsageError(f'another run ({holder}) is writing {self.folder}: wait for it to end, or start this '
                                 'one with another --experiment') from None
            except OSError as e:  # ENOLCK, EOPNOTSUPP: some network file systems
                _logger.warning(f'cannot lock {self.path} ({e.strerror or e}): a second run started into this '
                                'folder at the same time would not be refused')
            if self._current(fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f'pid {os.getpid()} on {socket.gethostname()}\n'.encode())
        self._fd = fd

    def _current(self, fd: int) -> bool:
        """Whether `fd` is still the folder's lock file (not one a releasing holder removed)."""
        try:
            found = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
