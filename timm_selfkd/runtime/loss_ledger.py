"""The loss terms of an epoch, as the loops report them: one ledger for train.py and the upstream adapter."""
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist

__all__ = ['LossLedger']


class LossLedger:
    """Sums every `loss*` term a task returns over the steps of an epoch, on the device (read only when logged
    or summarised, so no host sync per step), with the steps it covers and the images they trained on."""

    def __init__(self, sums: Optional[Dict[str, torch.Tensor]] = None, steps: int = 0, images: int = 0):
        self.sums: Dict[str, torch.Tensor] = dict(sums or {})
        self.steps = steps
        self.images = images

    def add(self, out: Mapping[str, torch.Tensor], images: int) -> None:
        """Count one step: its loss terms (the keys of `out` that start with `loss`) and its images."""
        for name, value in out.items():
            if name.startswith('loss'):
                self.sums[name] = self.sums.get(name, 0) + value.detach().float()
        self.steps += 1
        self.images += images

    def host_sums(self) -> Dict[str, float]:
        """Each term's sum so far, read from the device at once (one host sync)."""
        return dict(zip(self.sums, torch.stack(list(self.sums.values())).tolist())) if self.sums else {}

    def text(self, sums: Optional[Mapping[str, float]] = None) -> str:
        """This process's means so far, as `name value` pairs for a log line (from `sums`, `host_sums()` already
        read, or read here)."""
        sums = self.host_sums() if sums is None else sums
        return '  '.join(f'{name} {total / max(self.steps, 1):.4f}' for name, total in sums.items())

    def epoch_metrics(self, device: torch.device, distributed: bool) -> Dict[str, float]:
        """Each term's mean over the steps, averaged over the processes, and the images of all processes (one
        all-reduce and one host sync)."""
        names = list(self.sums)
        values = torch.stack([self.sums[n].to(device) / max(self.steps, 1) for n in names] +
                             [torch.tensor(float(self.images), device=device)])
        world = 1
        if distributed:
            dist.all_reduce(values)
            world = dist.get_world_size()
        values = values.tolist()
        metrics = {name: value / world for name, value in zip(names, values)}
        metrics['images'] = values[-1]
        return metrics
