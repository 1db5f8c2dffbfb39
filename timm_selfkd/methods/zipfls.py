"""Zipf's label smoothing (Liang et al., Efficient One Pass Self-distillation with Zipf's Label Smoothing, ECCV 2022).

Official code: megvii-research/zipfls (`pytorch_zipfls/losses.py` `zipf_loss`, `gen_pdf`, `get_masked_distribution`,
`kl_loss`; `train.py` and the models' `get_dense_info`; `megengine_zipfls/loss.py` is the same loss). No paper text
was at hand: the equations below are the paper's loss as the official code computes it (sec. 3 of the paper), cited
by content, not by equation number.

Not taken from the official code: its ablation options (random/constant/linear/exponential distributions instead of
Zipf's, soft ranks, the nearest-"friend" image's ranking, the `--mask` that keeps only correctly classified images,
extra exits with `--deeplayer` > 1); none is in its Zipf's LS recipes. One defect not reproduced: for torchvision's
DenseNet/MobileNetV2 on ImageNet/iNat its `train.py` votes with a separate `linear` layer that no gradient ever
reaches (argmax), i.e. a random classifier; here the votes always come from the model's own head.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn

from timm_selfkd.components.losses import known_label_smoothing, mixed_label_weights
from timm_selfkd.components.zipf_targets import (UPSAMPLE_MODES, position_logits, vote_counts, zipf_distribution,
                                                 zipf_nontarget_kl)
from timm_selfkd.methods.base import ModelWrapper, Needs, SelfKDTask
from timm_selfkd.registry import hparam, register_method

__all__ = ['ZipfLSHparams', 'DenseVotes', 'ZipfLSTask']


@dataclass
class ZipfLSHparams:
    weight: float = hparam(0.1, 'weight lambda of the Zipf KL term: ce + lambda * KL (official recipes: 0.1 on '
                                'CIFAR-100 and ImageNet, 1.0 on TinyImageNet and iNat21; its argparse default is 1.0)',
                           within='[0, inf)')
    power: float = hparam(1.0, 'Zipf exponent: a non-target class of rank r gets r^-power, normalised (official '
                               '--power, 1.0)', within='[0, inf)')
    dense: bool = hparam(True, 'rank the classes by dense votes (the classifier at every position of the final feature '
                               'map, argmax counted), as every official recipe (--dense); --no-zipfls-dense ranks by '
                               'the logits')
    upsample: str = hparam('none', 'none, bilinear or bicubic: upsample the final map x2 before the dense votes '
                                   '(official default none, ImageNet recipes none; its PyTorch CIFAR recipes '
                                   'bilinear); spatial maps only', choices=UPSAMPLE_MODES)


@contextmanager
def _eval_mode(module: nn.Module):
    """Run `module` in eval mode (dropout off, BatchNorm reading its running statistics, not updating them),
    then give every submodule back its own mode."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class DenseVotes(ModelWrapper):
    """A timm model returning `(logits, class scores)`: the scores that rank the classes are the dense votes
    (how many positions of the unpooled final map the model's head predicts each class at) or, with
    `dense=False`, the logits themselves (detached). The head runs once on the pooled features, as in plain
    training, and once more without gradient on every position (`components.zipf_targets.position_logits`)."""

    def __init__(self, model: nn.Module, dense: bool = True, upsample: str = 'none'):
        if dense and not (callable(getattr(model, 'forward_features', None))
                          and callable(getattr(model, 'forward_head', None))):
            raise ValueError(f'model {type(model).__name__} has no forward_features/forward_head, which zipfls '
                             'needs for its dense votes (the head at every position of the final feature map); '
                             '--no-zipfls-dense ranks by the logits instead')
        super().__init__(model)
        self.dense = dense
        self.upsample = upsample

    def forward(self, input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.dense:
            logits = self.model(input)
            return logits, logits.detach()
        features = self.model.forward_features(input)
        logits = self.model.forward_head(features)
        with torch.no_grad(), _eval_mode(self.model):
            votes = vote_counts(position_logits(self.model, features.detach(), self.upsample))
        return logits, votes


@register_method('zipfls', hparams=ZipfLSHparams,
                 paper='Liang et al., Efficient One Pass Self-distillation with Zipf\'s Label Smoothing, ECCV 2022',
                 summary='Zipf\'s label smoothing: the non-target classes, ranked by dense votes, get a Zipf '
                         'soft label (KL to the softmax over the non-target classes)')
class ZipfLSTask(SelfKDTask):
    """Zipf's label smoothing: `ce(z, y) + lambda * KL(q || p~)` on every image (paper sec. 3; official `zipf_loss`).

    - Dense votes: the model's classifier is applied at every position of the unpooled final feature map (per
      patch token for ViT-like models) and each position votes for its argmax class; `v_k` counts the votes of
      class k. (`dense=False`: `v = z`, the pooled logits.)
    - Ranks: `r_k = 1 + #{j : v_j > v_k}` over all K classes, the target included, ties sharing the smallest rank
      (the official code's `rankdata(-v, method='min')`; every class without a vote shares one rank).
    - Zipf soft label of the non-target classes: `q_k = r_k^-a / sum_{j != y} r_j^-a` for k != y (a = `power`).
    - `p~ = softmax(z_{-y})`, the softmax of the K - 1 non-target logits (the target's logit removed), and
      `KL(q || p~) = sum_{k != y} q_k (log q_k - log p~_k)`, averaged over the batch, at temperature 1.
    The votes carry no gradient (the official argmax has none); `q` is a constant of the step.

    The head at every position: `forward_head` runs on each position alone (a 1x1 map, a 1x1 NHWC map, or one
    token repeated as its own prefix tokens), so whatever the head applies after pooling applies per position:
    ResNet/EfficientNet/Swin: the classifier; ConvNeXt: its LayerNorm (and pre-logits MLP) then the classifier;
    ViT: `fc_norm` (when pooling by mean) then the head, on the patch tokens only (class and register tokens
    excluded). The official code applies the bare linear classifier (its torchvision/CIFAR models have nothing
    between pooling and the fc). That pass runs in eval mode, without gradient: no dropout on the votes, and a
    BatchNorm in a head (e.g. MobileNetV3's) reads its running statistics instead of updating them from
    per-position batches. `upsample` enlarges a spatial map x2 first (the official CIFAR recipes).

    Mixup/CutMix (`Needs(mixup='loader')`; the official code trains without mixing): the natural extension,
    linear in the label as timm's soft-target cross-entropy is: `sum_c w_c KL(q(c) || p~(c))` over the mixed
    image's labels c (weights lam, 1 - lam from `mixed_label_weights`, label smoothing removed), each label's
    Zipf label and non-target softmax built with c as the target, from the mixed image's own votes. An unmixed
    row gives the loss above exactly.

    `--bce-loss` replaces the hard-label term (the criterion); the Zipf term stays the paper's softmax KL over
    the non-target classes (it never involves the target's probability).
    """

    def __init__(self, model, hparams: ZipfLSHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        # timm's label smoothing, for mixed targets of 2 classes (which cannot tell it); None when not given
        self.label_smoothing = known_label_smoothing(self.criterion, kwargs.get('criterion_kwargs'))

    @classmethod
    def requirements(cls, hparams) -> Needs:
        return Needs(mixup='loader')  # a mixed image: its labels' Zipf terms, lambda-weighted

    def wrap_model(self, model):
        return DenseVotes(model, self.hparams.dense, self.hparams.upsample)

    def zipf_loss(self, output: torch.Tensor, scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The Zipf term for class labels (N,) or mixed soft targets (N, K), averaged over the batch."""
        if output.shape[-1] < 2:
            raise ValueError('zipfls needs at least 2 classes (its soft label is over the non-target classes)')
        power = self.hparams.power
        if target.ndim == 1:
            return zipf_nontarget_kl(output, zipf_distribution(scores, target, power), target).mean()
        weights, classes = mixed_label_weights(target, self.label_smoothing).topk(2, dim=-1)
        loss = 0.
        for weight, label in zip(weights.unbind(1), classes.unbind(1)):
            loss = loss + weight * zipf_nontarget_kl(output, zipf_distribution(scores, label, power), label)
        return loss.mean()

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        output, scores = self.trainable_module(input)
        loss_ce = self.cross_entropy(output, target)
        loss_zipf = self.zipf_loss(output, scores, target)
        return {
            'loss': loss_ce + self.hparams.weight * loss_zipf,
            'output': output,
            'loss_ce': loss_ce,
            'loss_zipf': loss_zipf,
        }
