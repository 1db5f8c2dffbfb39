"""Where a run's numbers go: summary.csv always, and Weights & Biases (`--log-wandb`) and TensorBoard
(`--log-tensorboard`) when asked, from rank 0 only.

Every sink gets each epoch's summary row (every loss term, the evaluation metrics, images, steps, time, learning
rate, status); TensorBoard also gets the loss terms at each log interval, at the global step (batches trained).
The wandb run's id travels in the checkpoints (`state_dict`), so a resumed or requeued run continues the same
wandb run without being told its id.
"""
import argparse
import csv
import importlib
import os
from typing import Any, Dict, Mapping, Optional

from timm_selfkd.errors import UsageError, first_line
from timm_selfkd.runtime.loss_ledger import LossLedger

__all__ = ['SummaryCsv', 'RunLog']

_EXTRAS = {'wandb': ('--log-wandb', 'wandb', 'wandb'),
           'tensorboard': ('--log-tensorboard', 'torch.utils.tensorboard', 'tensorboard')}


def _require(extra: str):
    """The module an optional extra provides; a `UsageError` naming the flag and the install command without it."""
    flag, module, package = _EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f'{flag} needs the {package} package, which is not installed: pip install '
                         f'"timm-selfkd[{extra}]" (or pip install {package})') from e


class SummaryCsv:
    """summary.csv: one row per epoch. A row with a column the file lacks (the first validation after
    --val-interval epochs, say) widens the file; the file is replaced whole, so a kill never truncates it."""

    def __init__(self, path: str):
        self.path = path

    def write(self, row: Mapping[str, Any]) -> None:
        rows, columns = [], list(row)
        if os.path.exists(self.path):
            with open(self.path, newline='') as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                known = list(reader.fieldnames or [])
                columns = known + [c for c in row if c not in known]
        with open(self.path + '.tmp', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval='')
            writer.writeheader()
            writer.writerows(rows + [dict(row)])
        os.replace(self.path + '.tmp', self.path)


class RunLog:
    """The run's sinks: summary.csv, wandb and TensorBoard.

    Built from the parsed options before anything is written (a requested tracker whose package is missing is a
    `UsageError` then); `start` opens the sinks in the run's folder (rank 0; the other ranks pass no folder and
    log nothing); used as a context manager around the loop, it closes them with the run's exit status.
    """

    def __init__(self, args: argparse.Namespace):
        self.wandb_options = None
        if args.log_wandb:
            _require('wandb')
            if args.wandb_resume_id and not args.resume:
                raise UsageError('--wandb-resume-id continues the wandb run of a resumed training run: it needs '
                                 '--resume (a resumed run continues its own wandb run without it)')
            self.wandb_options = dict(project=args.wandb_project, tags=list(args.wandb_tags or []))
        self.wandb_id: Optional[str] = args.wandb_resume_id or None
        self.wandb_id_given = bool(args.wandb_resume_id)
        tensorboard = args.log_tensorboard  # a folder; '' (a recipe's true): the run's; None (a recipe's false): off
        self.tensorboard_dir = tensorboard if isinstance(tensorboard, str) else '' if tensorboard else None
        if self.tensorboard_dir is not None:
            _require('tensorboard')
        self.summary: Optional[SummaryCsv] = None
        self.wandb_run = None
        self.tensorboard = None
        self._last_point: Optional[tuple] = None  # (epoch, steps, sums) at the previous step point

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint keeps: the wandb run's id (None without one)."""
        return {'wandb_id': self.wandb_id}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the checkpoint's wandb run, unless `--wandb-resume-id` names one."""
        if not self.wandb_id_given:
            self.wandb_id = state.get('wandb_id') or self.wandb_id

    def start(self, output_dir: Optional[str], config: Dict[str, Any]) -> None:
        """Open the sinks in `output_dir` (None: this process logs nothing); `config` is the wandb run's config.
        A wandb run that cannot start (no login for an online run, say) is a `UsageError`."""
        if output_dir is None:
            return
        self.summary = SummaryCsv(os.path.join(output_dir, 'summary.csv'))
        if self.wandb_options is not None:
            wandb = _require('wandb')
            resume = ('must' if self.wandb_id_given else 'allow') if self.wandb_id else None
            try:
                self.wandb_run = wandb.init(name=os.path.basename(output_dir), config=config, id=self.wandb_id,
                                            resume=resume, **self.wandb_options)
            except wandb.Error as e:
                raise UsageError(f'--log-wandb: wandb could not start the run: {first_line(e)}') from e
            self.wandb_id = self.wandb_run.id
        if self.tensorboard_dir is not None:
            self.tensorboard = _require('tensorboard').SummaryWriter(log_dir=self.tensorboard_dir or output_dir)

    def epoch(self, row: Mapping[str, Any]) -> None:
        """An epoch's summary row (its `epoch` is the step of the wandb and TensorBoard points)."""
        self.summary.write(row)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(row), step=row['epoch'])
        if self.tensorboard is not None:
            for name, value in row.items():
                if name != 'epoch' and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(name, value, row['epoch'])
            self.tensorboard.flush()

    def step(self, epoch: int, batches: int, ledger: LossLedger, sums: Mapping[str, float]) -> None:
        """The loss terms at a log interval, for TensorBoard: `step/<term>`, each the mean over the steps since the
        previous point of the epoch, at `batches`, the batches trained in the run (`sums`: the epoch's
        `ledger.host_sums()`, as the step line read them)."""
        if self.tensorboard is None:
            return
        previous = self._last_point if self._last_point and self._last_point[0] == epoch else (epoch, 0, {})
        steps = ledger.steps - previous[1]
        if steps <= 0:  # no step counted since (all skipped by --nonfinite skip)
            return
        for name, total in sums.items():
            self.tensorboard.add_scalar(f'step/{name}', (total - previous[2].get(name, 0.)) / steps, batches)
        self._last_point = (epoch, ledger.steps, dict(sums))

    def __enter__(self) -> 'RunLog':
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """Close the sinks; the wandb run ends with the run's exit status (a stop signal marks it preempted)."""
        status = 0 if error is None else getattr(error, 'status', 1)  # `Stopped` carries the exit status
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            if status >= 128:  # stopped by a signal, to be resumed
                self.wandb_run.mark_preempting()
            self.wandb_run.finish(exit_code=status)
