"""Stacks: a batch-layout method on top of another method, selected as `--selfkd LAYOUT+METHOD`.

A batch layout (`methods/layout.py`: the protocol and the table of its hooks) changes which rows a batch holds and
adds loss terms that read that layout; DDGSD is one (every image as two views, and the agreement of the views).
Stacked on a method, e.g. `ddgsd+dlb` (DLB paper, sec. 4.3: "distilling the last mini-batch for both two
predictions from different augmented versions"):

- batches: the method's own batch sampler (or plain batches from the run's index sampler), built for
  `-b / rows_per_image` images, expanded by the layout (`wrap_batch_sampler`). A layout that keeps the order of
  the images (rows of an image are consecutive) keeps the method's structure: DLB's repeated part still heads
  the batch, now as both views of each image.
- loss: the method's `forward` on the expanded batch (its cross-entropy covers every row, so every view), plus
  the layout's weighted `terms` on the method's logits, logged as `loss_<layout>_<term>`.
- needs: the method's `Needs`, with its own batches, and mixing in the task.
- mixup/CutMix: a method that mixes itself (DLB's `ReplayMixup`, PS-KD) mixes the expanded batch, and pairs row
  r of each block it mixes with row n-1-r of that block, one lambda/box per block; its blocks hold whole images
  (DLB's halves), so the rows of image i all go with the rows of one partner image (in reversed order) under one
  lambda/box and stay rows of one mixed image. That holds in `--mixup-mode batch` only (in 'pair'/'elem' the rows
  of an image would be in different pairs, under different lambdas): other modes are refused there. A method
  that takes mixed batches from the loader gets them mixed by the layout instead (its `mixer`, every mode), as
  the layout alone would mix them.
- everything else (state, resume, `bind_run` with the batch size in rows) is the method's.

The method must give logits for every row of its batch (`Needs.row_aligned_output`; not CS-KD, whose partners are
only a teacher). Each part keeps its own flags and YAML keys (`--ddgsd-weight`, `--dlb-alpha`).
"""
import dataclasses
from typing import Tuple, Type

from timm_selfkd.components.samplers import EpochBatchSampler
from timm_selfkd.methods.base import Needs
from timm_selfkd.registry import STACK_SEPARATOR, MethodSpec, register_stack_builder

__all__ = ['is_layout', 'build_stack']


def is_layout(spec: MethodSpec) -> bool:
    """Whether a method is a batch layout that can lead a stack."""
    return spec.task_cls.layout is not None


def build_stack(layout: MethodSpec, base: MethodSpec) -> Tuple[Type, Type]:
    """The task class and hyper-parameter dataclass of `layout` stacked on `base`; a ValueError if they do not
    stack."""
    name = f'{layout.name}{STACK_SEPARATOR}{base.name}'
    if not is_layout(layout):
        raise ValueError(f'{layout.name} is not a batch layout, so it cannot lead a stack ({name}); '
                         f'write LAYOUT{STACK_SEPARATOR}METHOD, e.g. ddgsd{STACK_SEPARATOR}dlb')
    if is_layout(base):
        raise ValueError(f'{name} stacks two batch layouts; stack a layout on a method that is not one')
    if not base.task_cls.requirements(base.hparams_cls()).row_aligned_output:
        raise ValueError(f'{base.name} cannot carry a batch layout ({name}): its forward gives logits for only part '
                         'of its batch')
    hparams_cls = dataclasses.make_dataclass(
        f'{layout.hparams_cls.__name__}On{base.hparams_cls.__name__}',
        [(part.name, part.hparams_cls, dataclasses.field(default_factory=part.hparams_cls)) for part in (layout, base)])
    return _stacked_task(layout, base, name), hparams_cls


def _stacked_task(layout: MethodSpec, base: MethodSpec, name: str) -> Type:
    layout_cls, base_cls, hooks = layout.task_cls, base.task_cls, layout.task_cls.layout
    rows = hooks.rows_per_image

    class StackedTask(base_cls):
        __doc__ = f'{layout.name} batch layout stacked on {base.name} (see timm_selfkd.methods.stack).'

        def __init__(self, model, hparams, **kwargs):
            super().__init__(model, getattr(hparams, base.name), **kwargs)
            self.stack_hparams, self.layout_hparams = hparams, getattr(hparams, layout.name)
            self.layout_mix = None  # the layout's own mix of its rows, when the method takes mixed batches

        @property
        def method_hparams(self):
            return self.stack_hparams

        @classmethod
        def requirements(cls, hparams) -> Needs:
            layout_needs = layout_cls.requirements(getattr(hparams, layout.name))
            base_needs = base_cls.requirements(getattr(hparams, base.name))
            return dataclasses.replace(base_needs, own_batches=True, mixup='task',
                                       bce_refusal=base_needs.bce_refusal or layout_needs.bce_refusal)

        def bind_run(self, run) -> None:
            base_mixes = base_cls.requirements(self.hparams).mixup == 'task'
            if base_mixes and run.mixup is not None and run.mixup.mode != 'batch':
                raise ValueError(f'{name} with --mixup-mode {run.mixup.mode}: {base.name} mixes the batch itself, '
                                 f'which keeps the {rows} rows of an image under one mix only in --mixup-mode batch')
            super().bind_run(run if base_mixes else dataclasses.replace(run, mixup=None))
            self.layout_mix = hooks.mixer(run.mixup) if not base_mixes and run.mixup is not None else None

        @classmethod
        def check_setup(cls, hparams, *, batch_size):
            layout_hparams, base_hparams = getattr(hparams, layout.name), getattr(hparams, base.name)
            layout_cls.check_setup(layout_hparams, batch_size=batch_size)
            hooks.check_stack(layout_hparams)
            try:
                base_cls.check_setup(base_hparams, batch_size=batch_size // rows)
            except ValueError as e:
                raise ValueError(f'{name} with -b {batch_size} gives {base.name} batches of {batch_size // rows} '
                                 f'images ({rows} rows each): {e}') from e

        def batch_sampler(self, *, index_sampler, batch_size, **kwargs):
            images = batch_size // rows
            inner = super().batch_sampler(index_sampler=index_sampler, batch_size=images, **kwargs) \
                if base_cls.requirements(self.hparams).own_batches else EpochBatchSampler(index_sampler, images)
            return hooks.wrap_batch_sampler(self.layout_hparams, inner)

        def forward(self, input, target):
            if self.layout_mix is not None and self.training:
                target = self.layout_mix(input, target)
            out = super().forward(input, target)
            extra, terms = hooks.terms(self.layout_hparams, out['output'])
            out['loss'] = out['loss'] + extra
            out.update({f'loss_{layout.name}_{term}': value for term, value in terms.items()})
            return out

    StackedTask.__name__ = StackedTask.__qualname__ = f'{layout_cls.__name__}On{base_cls.__name__}'
    return StackedTask


register_stack_builder(build_stack)
