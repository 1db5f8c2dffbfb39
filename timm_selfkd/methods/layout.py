"""The batch-layout protocol: what a method declares so that it can lead a stack, `--selfkd LAYOUT+METHOD`.

A batch layout changes which rows a batch holds (every image becomes `rows_per_image` consecutive rows) and adds
loss terms that read those rows; DDGSD's two views of every image are one (`methods/ddgsd.py`). A method is a
layout when its task class sets `layout` (`SelfKDTask.layout`) to an instance of a `BatchLayout` subclass. The
stack (`methods/stack.py`) composes the layout with another method through these hooks only:

================================================  ============================================  ====================
hook                                              what it gives                                 the stack calls it
================================================  ============================================  ====================
`rows_per_image`                                  the rows each image becomes (>= 2)            for the method's
                                                                                                batches (-b / rows)
`check_stack(hparams)`                            refuses layout hyper-parameters a stack       in `check_setup`
                                                  cannot take (default: takes all)
`wrap_batch_sampler(hparams, batch_sampler)`      the layout's batches from the method's: each  in `batch_sampler`
                                                  image's rows consecutive, images in order;
                                                  `set_epoch(e)` forwarded to the method's
                                                  sampler (the run replays epochs through it)
`terms(hparams, output)`                          its weighted loss on the method's logits      in `forward`, added
                                                  (one row per input row) and its named terms   to the method's loss
`mixer(mixup)`                                    a function `mix(input, target) -> target`     in `bind_run`, when
                                                  that mixes a batch of its rows in place with  the method takes
                                                  timm's batch-form `mixup`, the rows of one    mixed batches from
                                                  image under one mix, and returns the rows'    the loader
                                                  soft targets (B, K)
================================================  ============================================  ====================

`hparams` is the layout method's hyper-parameter dataclass. The method under the layout must give one output row
per input row (`Needs.row_aligned_output`) and must not be a layout itself. A method that mixes its batches
itself (`Needs.mixup == 'task'`) mixes the layout's rows in `--mixup-mode batch` (`methods/stack.py` says why).
"""
from abc import ABC, abstractmethod
from typing import Any, Callable, Dict, Tuple

import torch
from timm.data import Mixup
from torch.utils.data import Sampler

__all__ = ['BatchLayout', 'Mix']

Mix = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class BatchLayout(ABC):
    """A batch layout's hooks (see the module's table)."""

    rows_per_image: int = 2

    def check_stack(self, hparams: Any) -> None:
        """Raise a ValueError for layout hyper-parameters that cannot stack on a method."""

    @abstractmethod
    def wrap_batch_sampler(self, hparams: Any, batch_sampler: Sampler) -> Sampler:
        """The layout's batches made from a method's batch sampler (forwarding `set_epoch` to it)."""

    @abstractmethod
    def terms(self, hparams: Any, output: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The layout's weighted loss on the logits of a batch of its rows, and its named terms."""

    @abstractmethod
    def mixer(self, mixup: Mixup) -> Mix:
        """The function that mixes a batch of the layout's rows in place and returns their soft targets."""
