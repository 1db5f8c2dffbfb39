"""A ring of frozen weight snapshots of a model, run without gradient: MrKD's memory copies.

The snapshots are not modules of the task: they are flat tensors (one per dtype, shape (n, numel)) run through
a weightless skeleton of the model with `torch.func.functional_call`. So they are in no optimizer, no EMA and
no model `state_dict`, `task.train()`/`.eval()` do not touch them, and a refresh is one copy per dtype (a
broadcast under DDP), not n module copies.

Example:
    >>> ring = WeightRing(model, num_copies=3, train_mode=False)
    >>> ring.fill(model)                  # every slot = the current weights
    >>> ring.push(model)                  # newest := current, the oldest is dropped
    >>> logits = ring.forward_all(images) # (3, B, K), newest first, no gradient
"""
import copy
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ['WeightRing']

_logger = logging.getLogger(__name__)


def _named_tensors(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """Every parameter and buffer (non-persistent ones too) that a forward reads, by name."""
    return list(model.named_parameters()) + list(model.named_buffers())


class WeightRing:
    """n frozen snapshots of a model's parameters and buffers, newest first (theta_1 ... theta_n).

    Args:
        model: The model to snapshot (its structure is kept as a weightless skeleton on the meta device).
        num_copies: n.
        train_mode: Run the snapshots in training mode: batch statistics in BatchNorm (the snapshot's running
            statistics are neither used nor updated), dropout and drop path active. Otherwise eval mode.
        batched: Run all snapshots in one `torch.func.vmap` call instead of one call per snapshot; models
            vmap cannot run fall back to the loop (logged once).
    """

    def __init__(self, model: nn.Module, num_copies: int, train_mode: bool = False, batched: bool = False):
        if num_copies < 1:
            raise ValueError(f'a weight ring needs at least one copy, got {num_copies}')
        self.skeleton = copy.deepcopy(model).to('meta').train(train_mode)
        for module in self.skeleton.modules():
            if isinstance(module, _BatchNorm):  # in train mode: batch statistics, running ones untouched
                module.track_running_stats = False
        tensors = _named_tensors(model)
        self.names = [name for name, _ in tensors]
        self.layout: Dict[str, Tuple[torch.dtype, int, torch.Size]] = {}  # name -> (dtype, offset, shape)
        sizes: Dict[torch.dtype, int] = {}
        for name, tensor in tensors:
            offset = sizes.get(tensor.dtype, 0)
            self.layout[name] = (tensor.dtype, offset, tensor.shape)
            sizes[tensor.dtype] = offset + tensor.numel()
        device = tensors[0][1].device
        self.flat = {dtype: torch.zeros(num_copies, size, dtype=dtype, device=device) for dtype, size in sizes.items()}
        self.num_copies = num_copies
        self.newest = 0  # slot of theta_1; theta_i is slot (newest - i + 1) mod n
        self.filled = False
        self.batched = batched

    def _current(self, model: nn.Module) -> Dict[torch.dtype, torch.Tensor]:
        """The model's parameters and buffers, flattened per dtype in the ring's layout."""
        tensors = dict(_named_tensors(model))
        if list(tensors) != self.names:
            raise ValueError('the model no longer has the parameters and buffers the weight ring was built for')
        parts: Dict[torch.dtype, List[torch.Tensor]] = {dtype: [] for dtype in self.flat}
        for name in self.names:
            parts[self.layout[name][0]].append(tensors[name].detach().reshape(-1))
        return {dtype: torch.cat(chunks) for dtype, chunks in parts.items()}

    @torch.no_grad()
    def _write(self, slots: slice, model: nn.Module) -> None:
        for dtype, values in self._current(model).items():
            self.flat[dtype][slots] = values
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                # parameters match after a synchronised step, buffers (BN statistics) need not: rank 0's win
                dist.broadcast(self.flat[dtype][slots], src=0)  # whole rows of a contiguous tensor: in place

    def fill(self, model: nn.Module) -> None:
        """Set every snapshot to the model's current weights (the start of training)."""
        self._write(slice(None), model)
        self.newest = 0
        self.filled = True

    def push(self, model: nn.Module) -> None:
        """theta_i := theta_{i-1} for i = n..2, theta_1 := current weights (Alg. 1); the oldest slot is reused."""
        self.newest = (self.newest + 1) % self.num_copies
        self._write(slice(self.newest, self.newest + 1), model)

    def order(self) -> List[int]:
        """Slots from newest (theta_1) to oldest (theta_n)."""
        return [(self.newest - i) % self.num_copies for i in range(self.num_copies)]

    def _tensors(self, slot: Optional[int]) -> Dict[str, torch.Tensor]:
        """Views of one slot's (or, for None, all slots') tensors by name."""
        index = slice(None) if slot is None else slot
        lead = (self.num_copies,) if slot is None else ()
        return {name: self.flat[dtype][index, offset:offset + shape.numel()].view(lead + tuple(shape))
                for name, (dtype, offset, shape) in self.layout.items()}

    @torch.no_grad()
    def forward_all(self, input: torch.Tensor) -> torch.Tensor:
        """Every snapshot's output for `input`, stacked newest first: shape (n, *output shape)."""
        if self.batched:
            try:
                outputs = vmap(lambda tensors: functional_call(self.skeleton, tensors, (input,)),
                               randomness='different')(self._tensors(None))
                return outputs[torch.tensor(self.order(), device=outputs.device)]
            except (RuntimeError, NotImplementedError, ValueError) as e:
                _logger.warning(f'weight ring: vmap cannot run {type(self.skeleton).__name__} '
                                f'({str(e).splitlines()[0][:200]}); running the copies one by one')
                self.batched = False
        return torch.stack([functional_call(self.skeleton, self._tensors(slot), (input,)) for slot in self.order()])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Each tensor as (n, *shape), newest first, on the CPU; keys are the model's parameter/buffer names."""
        order = self.order()
        return {name: tensor[order].cpu() for name, tensor in self._tensors(None).items()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Inverse of `state_dict` (same names, shapes and number of copies)."""
        if sorted(state) != sorted(self.names):
            raise ValueError('the saved copies are of a model with other parameters or buffers')
        self.newest = 0
        order = self.order()
        with torch.no_grad():
            for name, tensor in self._tensors(None).items():
                if state[name].shape != tensor.shape:
                    raise ValueError(f'the saved copies of {name} have shape {tuple(state[name].shape)}, '
                                     f'this run needs {tuple(tensor.shape)}')
                tensor[order] = state[name].to(tensor.device, tensor.dtype)
        self.filled = True
