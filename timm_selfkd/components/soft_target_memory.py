"""Per-sample memory of past predictions (PS-KD's P, and any method that needs each image's last softmax).

Layout: a table keyed by the integer dataset index (row i = sample i), in half precision, in host memory,
once per node: the node's local rank 0 creates it as a file in /dev/shm, every local rank maps it, and the file
is unlinked at once (the mapping lives until the last process exits, so nothing is left behind, even after a
crash). Dense rows hold all K probabilities (2 K bytes per sample: ImageNet-1k 1.28M x 1000 = 2.56 GB per
node); top-k rows hold the k largest probabilities and their classes (4 k bytes per sample), and the rest of
the probability mass is spread evenly over the other classes when read. A row of zeros was never written.

DDP write protocol (samples move between ranks every epoch, and every node needs every row):
  1. `update` (every step, every rank, a collective): the step's (indices, encoded rows) are all-gathered from
     all ranks, so every process holds every row of the step; they are copied to the host asynchronously.
  2. `flush` (next step): each process writes the rows whose index is its local rank modulo the local world
     size, so each row of a node's table is written by one process, in step order; within a step the last
     occurrence of an index wins (the same choice on every node).
  3. `lookup`: rows of the step just gathered are read from that gathered copy, older rows from the table.
     Those were flushed by their writer before it entered the previous step's all-gather, which this process
     has completed, so every read sees every earlier write: no barrier, no race.
Call `flush` then `barrier` before reading the whole table (a checkpoint): `sync` does both.

Example:
    >>> memory = SoftTargetMemory(num_samples=50000, num_classes=100, device=device)
    >>> memory.flush()
    >>> probs, written = memory.lookup(indices)   # (B, K) float32, (B,) bool, on `device`
    >>> memory.update(indices, logits.softmax(-1))
"""
import logging
import os
import tempfile
import uuid
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['SoftTargetMemory', 'memory_bytes', 'shared_zeros']

_logger = logging.getLogger(__name__)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _class_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def memory_bytes(num_samples: int, num_classes: int, topk: int = 0) -> int:
    """Bytes of the table for `num_samples` rows: dense fp16 rows, or top-k fp16 values + int16/int32 classes."""
    if not topk:
        return num_samples * num_classes * 2
    return num_samples * topk * (2 + torch.empty(0, dtype=_class_dtype(num_classes)).element_size())


def _create_private(path: str, nbytes: int) -> None:
    """Create `path` (it must not exist; a link is not followed) readable and writable by its owner only,
    whatever the umask, and reserve `nbytes` in it. /dev/shm is writable by everyone: the table holds what
    the model predicted for every training image, so no other user may read it, and none may plant the file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, 'O_NOFOLLOW', 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only have taken bits away; this also restores the owner's
        os.posix_fallocate(fd, 0, max(nbytes, 1))
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def shared_zeros(shape: Tuple[int, ...], dtype: torch.dtype, local_rank: int, local_world_size: int,
                 tag: str = 'memory') -> torch.Tensor:
    """A zero-filled CPU tensor shared by the `local_world_size` processes of this node (collective).

    One process per node: an ordinary tensor. Otherwise the node's local rank 0 reserves a file in /dev/shm
    (`posix_fallocate`, so a too small /dev/shm fails here, on every rank, with a ValueError naming the size,
    rather than with SIGBUS later), every process maps it, and it is unlinked once all have: the mapping
    outlives the name, so the memory is freed when the last process exits, however it exits.
    """
    numel = int(torch.Size(shape).numel())
    if local_world_size == 1 or not _distributed():
        return torch.zeros(shape, dtype=dtype)
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    folder = '/dev/shm' if os.path.isdir('/dev/shm') else tempfile.gettempdir()
    path = os.path.join(folder, f'timm_selfkd-{tag}-{token[0]}')
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    error = None
    if local_rank == 0:
        try:
            _create_private(path, nbytes)
        except OSError as e:
            error = (f'cannot reserve {nbytes / 2 ** 30:.2f} GiB of shared memory for the {tag} in {folder} '
                     f'({e.strerror}); enlarge it (docker run --shm-size) or store less')
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # also a barrier: every node's file exists after it
    failure = next((e for e in errors if e), None)
    if failure:
        if local_rank == 0 and not error:
            os.unlink(path)
        raise ValueError(failure)
    table = torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    dist.barrier()
    if local_rank == 0:
        os.unlink(path)
    return table


def _layout(topk: int) -> str:
    return f'top-{topk}' if topk else 'dense'


def _to_host(tensor: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A host copy of `tensor`, started asynchronously from a CUDA device (wait on the returned event)."""
    if tensor.device.type != 'cuda':
        return tensor.cpu(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' equally shaped tensors, concatenated along dim 0 in rank order."""
    out = tensor.new_empty((dist.get_world_size() * tensor.shape[0], *tensor.shape[1:]))
    gather = getattr(dist, 'all_gather_single', None) or dist.all_gather_into_tensor  # the newer name
    gather(out, tensor.contiguous())
    return out


class SoftTargetMemory:
    """The last predicted distribution of every training sample, keyed by dataset index (see the module doc).

    Args:
        num_samples: Rows (training-set size).
        num_classes: K.
        topk: 0 for dense rows, else the number of probabilities kept per row (1..K).
        device: Device of `update`'s inputs and of `lookup`'s outputs.
        local_rank: This process's rank on its node.
        local_world_size: Processes on this node (they share one table).
    """

    def __init__(self, num_samples: int, num_classes: int, topk: int = 0, *, device: Optional[torch.device] = None,
                 local_rank: int = 0, local_world_size: int = 1):
        if not 0 <= topk <= num_classes:
            raise ValueError(f'a top-k memory keeps 1 to {num_classes} (the class count) probabilities per sample, '
                             f'got {topk}')
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.topk = topk
        self.device = torch.device(device or 'cpu')
        self.local_rank = local_rank
        self.local_world_size = local_world_size
        share = dict(local_rank=local_rank, local_world_size=local_world_size)
        self.values = shared_zeros((num_samples, topk or num_classes), torch.float16, tag='memory-values', **share)
        self.classes = shared_zeros((num_samples, topk), _class_dtype(num_classes), tag='memory-classes',
                                    **share) if topk else None
        self._pending = None  # (indices, values, classes, event): the last update's gathered rows, on the host
        self._recent = None  # (sorted unique indices, values, classes): the last flushed step's rows

    @property
    def nbytes(self) -> int:
        """Bytes of the table (per node)."""
        return memory_bytes(self.num_samples, self.num_classes, self.topk)

    def encode(self, probs: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Rows as sent: fp16 probabilities, or the top-k fp16 probabilities and their classes (int32, which
        NCCL and gloo can gather; stored in the table's int16/int32)."""
        if not self.topk:
            return probs.half(), None
        top = probs.topk(self.topk, dim=-1)
        return top.values.half(), top.indices.int()

    def decode(self, values: torch.Tensor, classes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 distributions (B, K) and whether each row was ever written (a never-written row is zeros)."""
        values = values.float()
        written = values.sum(dim=-1) > 0
        if classes is None:
            return values, written
        rest = (1 - values.sum(dim=-1, keepdim=True)).clamp(min=0) / max(self.num_classes - self.topk, 1)
        probs = rest.expand(values.shape[0], self.num_classes).clone()
        return probs.scatter_(1, classes.long(), values), written

    @torch.no_grad()
    def update(self, indices: torch.Tensor, probs: torch.Tensor) -> None:
        """Record this step's predictions: every rank calls it at every step (an all-gather under DDP; every
        rank's batch must have the same size). The rows reach the table at the next `flush`; a row that is not
        finite (a diverged step) is stored as never written."""
        probs = probs.detach().float()
        probs = torch.where(probs.isfinite().all(dim=-1, keepdim=True), probs, 0.)  # stored as never written
        values, classes = self.encode(probs)
        indices = indices.to(values.device)
        parts = [indices, values] + ([classes] if classes is not None else [])
        if _distributed():
            parts = [_gather(part) for part in parts]
        host = [_to_host(part) for part in parts]
        event = host[-1][1]  # recorded after every copy was queued
        self._pending = (host[0][0], host[1][0], host[2][0] if classes is not None else None, event)

    def flush(self) -> None:
        """Write the pending rows whose index belongs to this local rank (index mod local world size)."""
        if self._pending is None:
            return
        indices, values, classes, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        order = torch.argsort(indices, stable=True)
        ordered = indices[order]
        last = torch.ones_like(ordered, dtype=torch.bool)
        last[:-1] = ordered[1:] != ordered[:-1]  # the last occurrence of each index wins
        keep = order[last]
        indices, values = ordered[last], values[keep]
        classes = classes[keep].to(self.classes.dtype) if classes is not None else None
        mine = indices % self.local_world_size == self.local_rank
        self.values[indices[mine]] = values[mine]
        if classes is not None:
            self.classes[indices[mine]] = classes[mine]
        self._recent = (indices, values, classes)

    def lookup(self, indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored distributions of `indices` (float32 (B, K) on `device`) and which were ever written.

        Call `flush` first. Indices on the host avoid a device-to-host copy."""
        rows = indices.cpu()
        values = self.values[rows]
        classes = self.classes[rows] if self.classes is not None else None
        if self._recent is not None and len(self._recent[0]):
            recent, recent_values, recent_classes = self._recent
            position = torch.searchsorted(recent, rows).clamp(max=len(recent) - 1)
            hit = recent[position] == rows
            values[hit] = recent_values[position[hit]]
            if classes is not None:
                classes[hit] = recent_classes[position[hit]]
        move = dict(device=self.device, non_blocking=True)
        if self.device.type == 'cuda':
            values = values.pin_memory()
            classes = classes.pin_memory() if classes is not None else None
        return self.decode(values.to(**move), classes.to(**move) if classes is not None else None)

    def sync(self) -> None:
        """Flush and wait for every process (collective): afterwards the table holds every recorded row."""
        self.flush()
        if _distributed():
            dist.barrier()

    def state_dict(self) -> Dict[str, Any]:
        """The table (call `sync` on every rank first) and its shape; the tensors are views, not copies."""
        state = {'num_samples': self.num_samples, 'num_classes': self.num_classes, 'topk': self.topk,
                 'values': self.values}
        if self.classes is not None:
            state['classes'] = self.classes
        return state

    def check_state(self, state: Dict[str, Any], what: str = 'memory') -> None:
        """Raise a ValueError saying what differs when `state` cannot be loaded."""
        for key, name in (('num_samples', 'training images'), ('num_classes', 'classes')):
            if state[key] != getattr(self, key):
                raise ValueError(f'the checkpoint\'s {what} is for {state[key]} {name}, this run has '
                                 f'{getattr(self, key)}')
        if state['topk'] != self.topk:
            raise ValueError(f'the checkpoint\'s {what} is {_layout(state["topk"])}, this run asks for '
                             f'{_layout(self.topk)}')

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Load a `state_dict` (collective under DDP: the node's local rank 0 writes the shared table)."""
        self.check_state(state)
        self._pending = self._recent = None
        if self.local_rank == 0 or self.local_world_size == 1:
            self.values.copy_(state['values'])
            if self.classes is not None:
                self.classes.copy_(state['classes'])
        if _distributed():
            dist.barrier()
