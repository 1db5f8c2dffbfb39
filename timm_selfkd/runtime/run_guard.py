"""Stopping a run cleanly: preemption signals and non-finite losses, agreed on by every rank.

The loop calls `RunGuard.observe` after every step (device work only, no host sync) and `RunGuard.poll` at every
check step (every `interval` steps, before every checkpoint and at the end of each epoch). A poll reads the
guard's few device values once and, under DDP, all-reduces them, so every rank stops after the same step.
"""
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from timm_selfkd.runtime.checkpoint import remove_partial_files

__all__ = ['RunGuard', 'Verdict']

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A repeat within this many seconds is the same stop request reaching the process twice (a scheduler signals every
# process of the job while torchrun forwards the signal to its ranks), not an impatient second one.
REPEAT_WINDOW_S = 2.0
_MAX_TERMS = 1024  # a divergence travels as one integer: first bad step * _MAX_TERMS + index of the bad term
_NONE = torch.iinfo(torch.int64).max  # "no bad step yet"


@dataclass(frozen=True)
class Verdict:
    """What a poll found: a stop request (signal number, 0 if none) and a divergence (first bad step or None)."""
    signum: int = 0
    bad_step: Optional[int] = None
    bad_term: str = ''


class RunGuard:
    """Stop requests from SIGTERM/SIGINT and the non-finite loss guard of one training run.

    Signals: the first SIGTERM or SIGINT only sets a flag (the loop finishes its step, saves and exits); a second
    one exits at once with status 128 + the signal number, unless it is the same signal within `REPEAT_WINDOW_S`
    seconds of the first (one request delivered twice, e.g. by the scheduler and by torchrun to each rank).

    Non-finite losses: a step is bad when its loss or any loss term is NaN or infinite. The run has diverged
    once `patience` consecutive steps were bad (1 in float32/bfloat16; more with fp16 loss scaling, whose
    scaler skips overflowing steps as a matter of course). The guard remembers the first step of that streak
    and the first bad term in it.

    Args:
        device: Device of the loss tensors.
        distributed: All-reduce the verdict over the process group.
        patience: Consecutive bad steps that count as divergence.
    """

    def __init__(self, device: torch.device, distributed: bool, patience: int = 1):
        self.distributed = distributed
        self.patience = patience
        self.signum = 0
        self._signalled_at = 0.0
        self._previous_handlers = {}
        self._term_names: List[str] = []
        # streak length, first step of the streak, index of the first bad term at that step
        self._state = torch.tensor([0, _NONE, 0], dtype=torch.int64, device=device)

    def install(self) -> None:
        """Route SIGTERM and SIGINT to the guard (main thread only, as Python requires)."""
        for sig in _SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum, frame) -> None:
        if signum == self.signum and time.monotonic() - self._signalled_at < REPEAT_WINDOW_S:
            return
        if self.signum:
            remove_partial_files()  # a save this interrupts leaves no temporary file (os._exit runs no `finally`)
            os._exit(128 + signum)
        self.signum, self._signalled_at = signum, time.monotonic()
        print(f'train.py: {signal.Signals(signum).name} received: stopping after this step '
              f'(send it again to exit at once)', file=sys.stderr, flush=True)

    def observe(self, step: int, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Record whether global step `step` was bad; returns the device flag (1 = bad). No host sync."""
        if not self._term_names:
            self._term_names = list(terms)
        finite = torch.stack([terms[name].detach().float() for name in self._term_names]).isfinite()
        bad = (~finite.all()).long()
        streak, start, term = self._state.unbind()
        starts = bad * (streak == 0).long()  # 1 when this bad step opens a streak
        first_bad_term = (~finite).long().argmax()
        self._state = torch.stack([
            (streak + 1) * bad,
            torch.where(starts.bool(), torch.full_like(start, step), torch.where(bad.bool(), start, _NONE)),
            torch.where(starts.bool(), first_bad_term, term),
        ])
        return bad

    def poll(self) -> Verdict:
        """Read (and under DDP agree on) the stop request and the divergence state: one host sync, and one
        all-reduce of two integers under DDP. A divergence reports the earliest bad streak of any rank."""
        streak, start, term = self._state.tolist()
        bad = start * _MAX_TERMS + term if streak >= self.patience else _NONE
        signum = self.signum
        if self.distributed:
            flags = torch.tensor([signum, -bad], dtype=torch.int64, device=self._state.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signum, bad = flags[0].item(), -flags[1].item()
        if bad == _NONE:
            return Verdict(signum)
        return Verdict(signum, bad // _MAX_TERMS, self._term_name(bad % _MAX_TERMS))

    def agree_bad(self, bad: torch.Tensor) -> bool:
        """Whether a step was bad on any rank (one host sync per call; for skipping a step's update)."""
        if self.distributed:
            bad = bad.clone()
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad)

    def _term_name(self, index: int) -> str:
        return self._term_names[index] if index < len(self._term_names) else 'loss'
