"""BAKE: batch knowledge ensembling (Ge et al., 2021, sec. 3.2-3.3, eq. 2-9, Alg. 1)."""
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

from timm_selfkd.components.losses import bake_targets, kd_kl
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.components.samplers import ClassGroupBatchSampler
from timm_selfkd.methods.base import LogitsAndFeatures, Needs, SelfKDTask, world_size


@dataclass
class BAKEHparams:
    weight: float = hparam(1.0, 'weight lambda of the distillation term (eq. 2)', within='[0, inf)')
    temperature: float = hparam(4.0, 'softening temperature tau (eq. 1-2)', within='(0, inf)')
    omega: float = hparam(0.5, 'ensembling weight w of eq. 9 (0.9 on some small sets)', within='[0, 1]')
    same_class: int = hparam(1, 'M: images of the anchor\'s class added per anchor (sec. 3.3; 3 on CIFAR/CUB)',
                             within='[1, inf)')
    global_batch: bool = hparam(True, 'under DDP, ensemble over the batch of all ranks, as the official code does')


def _gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks (no gradient), in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@register_method('bake', hparams=BAKEHparams, paper='Ge et al., Self-distillation with Batch Knowledge '
                                                    'Ensembling Improves ImageNet Classification, 2021')
class BAKETask(SelfKDTask):
    """Distil soft targets ensembled from the other images of the batch, weighted by feature affinity.

    Loss `ce(z, y) + lambda * T^2 * KL(Q || softmax(z / T))` over all images (eq. 2), with Q from eq. 9
    (`timm_selfkd.components.losses.bake_targets`). Pooled features come from the same forward pass as the logits.
    Batches hold whole groups of an anchor and M same-class images (`ClassGroupBatchSampler`).

    Mixup/CutMix (`Needs(mixup='loader')`), as the official code's "BAKE + CutMix" (table 6; yxgeee/BAKE,
    imagenet/pycls `core/trainer.py` and `datasets/transforms.py` `cutmix_batch`): the per-class batch is formed
    first (our sampler), then timm's collate (or the loop) mixes it; `ce` is timm's soft-target cross-entropy on
    the mixed targets (label smoothing in them), and eq. 9 ensembles the knowledge from the mixed images' own
    features and predictions, over all images as without mixup. The official code's `CUTMIX.OFF_EPOCH` (the
    last 5 epochs unmixed) is timm's `--mixup-off-epoch`. One difference: timm pairs image i with image B-1-i
    (the batch flipped; in pair and elem modes too), where the official code mixes each image with a random
    permutation of the batch. With the interleaved groups here, the images of group g are mixed with those of
    group G-1-g (another random anchor's), and when the batch holds an odd number G of groups the middle group is
    mixed with itself (one class, so its targets stay unmixed).
    """

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(mixup='loader', own_batches=True)

    def wrap_model(self, model):
        return LogitsAndFeatures(model)

    @classmethod
    def check_setup(cls, hparams, *, batch_size):
        ClassGroupBatchSampler.check_batch_size(batch_size, hparams.same_class)

    def batch_sampler(self, *, index_sampler, labels, batch_size, seed, rank, world_size):
        if labels is None:
            raise ValueError('BAKE needs the class label of every training image for its per-class batches, '
                             'and this dataset does not expose them')
        return ClassGroupBatchSampler(labels, batch_size, self.hparams.same_class, seed=seed, rank=rank,
                                      world_size=world_size, anchor_sampler=index_sampler)

    def soft_targets(self, output: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Eq. 9 targets for this rank's images; over the global batch when asked and distributed."""
        if not (self.hparams.global_batch and world_size() > 1):
            return bake_targets(features, output, self.hparams.omega, self.hparams.temperature)
        batch = output.shape[0]
        targets = bake_targets(_gather_rows(features.detach()), _gather_rows(output.detach()),
                               self.hparams.omega, self.hparams.temperature)
        return targets[dist.get_rank() * batch:(dist.get_rank() + 1) * batch]

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output, features = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        loss_kd = kd_kl(output, self.soft_targets(output, features), self.hparams.temperature)
        return {
            'loss': loss_ce + self.hparams.weight * loss_kd,
            'output': output,
            'loss_ce': loss_ce,
            'loss_kd': loss_kd,
        }
