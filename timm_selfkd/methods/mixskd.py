"""MixSKD: self-knowledge distillation from mixup (Yang et al., MixSKD: Self-Knowledge Distillation from Mixup for
Image Recognition, ECCV 2022; official code: winycg/Self-KD-Lib, `main_mixskd_imagenet.py`,
`main_mixskd_cifar.py`, `models/resnet_mixskd.py`, `models/resnet_imagenet_mixskd.py`, `methods/adversarial.py`)."""
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.mixup import mixup_target

from timm_selfkd.components.deep_branch import DeepBranch, LevelCapture, branch_no_weight_decay, deep_branches
from timm_selfkd.components.feature_levels import choose_levels, default_levels, model_name, parse_levels
from timm_selfkd.components.losses import float32_region, kd_kl_from_logits
from timm_selfkd.components.replayed_mixup import RowMix, SharedMix, mix_block, mix_target
from timm_selfkd.components.training_parts import TrainingPart, like_model, training_only_parameters
from timm_selfkd.registry import hparam, register_method
from timm_selfkd.methods.base import ModelWrapper, Needs, RunInfo, SelfKDTask, has_pooled_features

__all__ = ['MixSKDHparams', 'MixSKDModule', 'MixSKDTask', 'SelfTeacher', 'Discriminator', 'mixskd_loss',
           'grad_reverse']

_logger = logging.getLogger(__name__)

DISCRIMINATOR_WIDTH = 128  # the official Discriminator: Linear(C, 128) - ReLU - Linear(128, 2)
DEFAULT_BRANCHES = 3  # the official ResNets' branches after layer1-3


@dataclass
class MixSKDHparams:
    alpha: float = hparam(0.4, 'alpha of the Beta(alpha, alpha) that draws lambda of the task\'s own mixup (official '
                               'CIFAR code 0.4; its ImageNet script 0.2); not read with --mixup/--cutmix, whose Mixup '
                               'replaces it', within='(0, inf)')
    temperature: float = hparam(3.0, 'temperature T of every KL term, scaled by T^2 (official code\'s kd_T 3)',
                                within='(0, inf)')
    kd_weight: float = hparam(1.0, 'weight of the logit distillation: backbone <- self-teacher across interpolated/'
                                   'mixed, branches mutually between interpolated and mixed logits (official code 1)',
                              within='[0, inf)')
    feature_weight: float = hparam(1.0, 'weight of the MSE between the interpolated final maps of the two images and '
                                        'the mixed image\'s final maps, every classifier (official code 1)',
                                   within='[0, inf)')
    adv_weight: float = hparam(1.0, 'weight of the discriminators\' BCE (official code 1); they learn to tell '
                                    'interpolated from mixed maps, the network (through a gradient reversal) to fool '
                                    'them', within='[0, inf)')
    mix_ce_weight: float = hparam(1.0, 'weight of the CE on the mixed images of every classifier and of the '
                                       'self-teacher (official ImageNet script 1; the CIFAR script computes it and '
                                       'never adds it, i.e. 0)', within='[0, inf)')
    indices: str = hparam('', 'forward_intermediates() levels that get an auxiliary branch (a fresh copy of the later '
                              'stages and the head), comma-separated; default: the three stage ends before the last '
                              '(ResNet: after layer1-3 as the official code; ViT-like models: blocks at 1/4, 1/2, 3/4 '
                              'depth)', check=parse_levels)


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg()


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward (Ganin & Lempitsky): one backward pass trains a discriminator
    to minimise its loss and what feeds it to maximise it."""
    return _GradReverse.apply(x)


class Discriminator(nn.Module):
    """The official discriminator on a pooled final map: Linear(C, 128) - ReLU - Linear(128, 2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(channels, DISCRIMINATOR_WIDTH), nn.ReLU(inplace=True),
                                        nn.Linear(DISCRIMINATOR_WIDTH, 2))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)


class SelfTeacher(nn.Module):
    """The self-teacher over the final maps of all classifiers (branches and backbone): concatenated, a 1x1
    convolution without bias back to C channels, global average pooling, a linear classifier (the official
    `ResNet_Final_Auxiliary_Classifer`). The 1x1 convolution and the pooling are both linear with nothing between
    them, so they commute: this pools first and applies the convolution as a linear map of the pooled
    features (the same function, any map format, H x W times cheaper)."""

    def __init__(self, channels: int, num_maps: int, num_classes: int):
        super().__init__()
        self.fuse = nn.Linear(channels * num_maps, channels, bias=False)  # conv1x1(C * M, C)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, pooled: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(self.fuse(torch.cat([p.float() for p in pooled], dim=1)))


def _pool(feature_map: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Global average of a final map: (B, C, H, W) -> (B, C), (B, H, W, C) with `channels_last` -> (B, C),
    tokens (B, N, C) -> (B, C) (class and other prefix tokens included), (B, C) as is."""
    if feature_map.ndim == 4:
        return feature_map.mean(dim=(1, 2) if channels_last else (2, 3))
    if feature_map.ndim == 3:
        return feature_map.mean(dim=1)
    return feature_map


class MixSKDModule(ModelWrapper):
    """A timm model with MixSKD's training-only parts; one forward pass over `[originals; mixed images]`.

    `aux` holds them: `branches` (`DeepBranch`es, fresh copies of the stages after their levels and of the head,
    the auxiliary classifiers), `teacher` (the `SelfTeacher`), `discriminators` (one `Discriminator` per
    classifier). The deployed model (`model`) stays the plain timm model.

    `forward(input, lam, partner)` takes 2n rows (n originals, then their n mixed images, image i mixed with
    image `partner[i]` under `lam[i]`) and returns a dict of: `logits` (per classifier, branches first, the
    backbone's own classifier last; (2n, K) each), `maps` (their final maps, `forward_features`' output, 2n rows),
    `teacher_interp` and `teacher_mixed` (the self-teacher on the interpolated pooled maps
    `lam F_i + (1 - lam) F_partner(i)` of the originals, and on the mixed images' maps; (n, K)), `disc_interp` and
    `disc_mixed` (each discriminator's logits on the same pooled maps, behind a gradient reversal, in float32;
    (n, 2) each).
    """

    def __init__(self, model: nn.Module, branches: Sequence[DeepBranch], num_classes: int):
        super().__init__(model)
        self.indices = [branch.level for branch in branches]
        self.channels_last = getattr(model, 'output_fmt', 'NCHW') == 'NHWC'  # e.g. Swin's maps
        channels = model.num_features
        classifiers = len(branches) + 1
        self.aux = nn.ModuleDict(dict(
            branches=nn.ModuleList(branches),
            teacher=SelfTeacher(channels, classifiers, num_classes),
            discriminators=nn.ModuleList([Discriminator(channels) for _ in range(classifiers)])))

    def no_weight_decay(self):
        return super().no_weight_decay() | branch_no_weight_decay(self)

    def training_parts(self) -> Dict[str, TrainingPart]:
        return {'aux': TrainingPart(self.aux, {'branch_indices': self.indices}, set_by=('indices',))}

    def forward(self, input: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> Dict[str, Any]:
        n = partner.shape[0]
        with LevelCapture(self.model, [branch.module_name for branch in self.aux.branches]) as capture:
            final = self.model.forward_features(input)
            levels = capture.outputs
        branch_outputs = [branch(x) for branch, x in zip(self.aux.branches, levels)]
        logits = [z for z, _ in branch_outputs] + [self.model.forward_head(final)]
        maps = [m for _, m in branch_outputs] + [final]
        pooled = [_pool(m, self.channels_last) for m in maps]
        with float32_region(input):
            weight = lam.float()[:, None]
            interp = [weight * p[:n].float() + (1 - weight) * p[partner].float() for p in pooled]
        mixed = [p[n:] for p in pooled]
        out = dict(logits=logits, maps=maps, teacher_interp=self.aux.teacher(interp),
                   teacher_mixed=self.aux.teacher(mixed))
        with float32_region(input):
            out['disc_interp'] = [d(grad_reverse(p)) for d, p in zip(self.aux.discriminators, interp)]
            out['disc_mixed'] = [d(grad_reverse(p.float())) for d, p in zip(self.aux.discriminators, mixed)]
        return out


def _interpolate(x: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """`lam x[:n] + (1 - lam) x[partner]` of the first n rows, in float32, lam per row."""
    n = partner.shape[0]
    weight = lam.float().view(n, *([1] * (x.ndim - 1)))
    return weight * x[:n].float() + (1 - weight) * x[partner].float()


def mixskd_loss(
        out: Dict[str, Any],
        lam: torch.Tensor,
        partner: torch.Tensor,
        ce_original: Callable[[torch.Tensor], torch.Tensor],
        ce_mixed: Callable[[torch.Tensor], torch.Tensor],
        hparams: MixSKDHparams,
) -> Dict[str, torch.Tensor]:
    """MixSKD's loss on the outputs of `MixSKDModule.forward` (every term in float32).

    With classifiers c = 1..M (the branches, then the backbone's own, M), z_c their logits, F_c their final maps,
    rows :n the originals x_i and n: their mixed images x~_i = lam x_i + (1 - lam) x_j (j = partner(i)):

    - `loss_ce = CE(z_M(x_i), y_i)`, `loss_branch_ce = sum_(c<M) CE(z_c(x_i), y_i)` (`ce_original`).
    - `loss_mix_ce = sum_c CE(z_c(x~_i), y~_i) + CE(T(F~), y~_i) + CE(T(F(x~)), y~_i)` (`ce_mixed`), the
      self-teacher T on the interpolated maps `F~ = lam F(x_i) + (1 - lam) F(x_j)` and on the mixed image's.
    - `loss_kd = KL(T(F(x~)) || z~_M) + KL(T(F~) || z_M(x~)) + sum_(c<M) KL(z_c(x~) || z~_c) + KL(z~_c || z_c(x~))`,
      `z~_c = lam z_c(x_i) + (1 - lam) z_c(x_j)` the interpolated logits, each KL `T^2 KL(p_t/T || p_s/T)` with
      the teacher (first argument) detached: the backbone learns from the self-teacher across the two views
      (interpolated and mixed), each branch mutually between its own two.
    - `loss_feature = sum_c MSE(lam F_c(x_i) + (1 - lam) F_c(x_j), F_c(x~_i))` (mean over elements, both sides
      trained).
    - `loss_adv = sum_c BCE(D_c([pool F~_c; pool F_c(x~)]), [(1, 0) x n; (0, 1) x n])`: each discriminator
      learns to tell them apart; its input arrives through a gradient reversal, so the network learns to make
      them indistinguishable.

    `loss = loss_ce + loss_branch_ce + w_mix loss_mix_ce + w_kd loss_kd + w_feat loss_feature + w_adv loss_adv`
    (the official ImageNet script's sum: every weight 1).
    """
    logits, maps = out['logits'], out['maps']
    n = partner.shape[0]
    t = hparams.temperature
    loss_ce = ce_original(logits[-1][:n])
    branch_ce = [ce_original(z[:n]) for z in logits[:-1]]
    mix_ce = [ce_mixed(z[n:]) for z in logits] + [ce_mixed(out['teacher_interp']), ce_mixed(out['teacher_mixed'])]
    with float32_region(logits[-1]):
        interp = [_interpolate(z, lam, partner) for z in logits]
        mixed = [z[n:] for z in logits]
        kd = [kd_kl_from_logits(interp[-1], out['teacher_mixed'], t),
              kd_kl_from_logits(mixed[-1], out['teacher_interp'], t)]
        for a, b in zip(interp[:-1], mixed[:-1]):
            kd += [kd_kl_from_logits(a, b, t), kd_kl_from_logits(b, a, t)]
        feature = [F.mse_loss(_interpolate(m, lam, partner), m[n:].float()) for m in maps]
        adv = []
        for d_interp, d_mixed in zip(out['disc_interp'], out['disc_mixed']):
            scores = torch.cat([d_interp, d_mixed]).float()
            labels = torch.zeros_like(scores)
            labels[:d_interp.shape[0], 0] = 1.
            labels[d_interp.shape[0]:, 1] = 1.
            adv.append(F.binary_cross_entropy_with_logits(scores, labels))
    terms = dict(loss_ce=loss_ce, loss_branch_ce=torch.stack(branch_ce).sum() if branch_ce else loss_ce * 0,
                 loss_mix_ce=torch.stack(mix_ce).sum(), loss_kd=torch.stack(kd).sum(),
                 loss_feature=torch.stack(feature).sum(), loss_adv=torch.stack(adv).sum())
    terms['loss'] = (terms['loss_ce'] + terms['loss_branch_ce'] + hparams.mix_ce_weight * terms['loss_mix_ce']
                     + hparams.kd_weight * terms['loss_kd'] + hparams.feature_weight * terms['loss_feature']
                     + hparams.adv_weight * terms['loss_adv'])
    return terms


@register_method('mixskd', hparams=MixSKDHparams, paper='Yang et al., MixSKD: Self-Knowledge Distillation from Mixup '
                                                        'for Image Recognition, ECCV 2022')
class MixSKDTask(SelfKDTask):
    """Distil between pairs of images and their mixup: feature maps, logits, a self-teacher and discriminators.

    Every step trains on `[x; x~]`, the n originals and their mixed images `x~_i = lam x_i + (1 - lam) x_j`, in one
    forward pass (BatchNorm sees both, as in the official code), through the backbone, auxiliary branches on
    three stage outputs (fresh copies of the remaining stages and the head, as the official ResNets' separately
    initialised `block_extractor`s and `fc1-3`) and a self-teacher over all classifiers' final maps. The terms
    (`mixskd_loss`): CE of every classifier on the originals; CE on the mixed images (every classifier and the
    self-teacher); KL from the self-teacher to the backbone and, per branch, mutually between the interpolated
    logits `lam z(x_i) + (1 - lam) z(x_j)` and the mixed image's logits; MSE between interpolated and mixed
    final maps; discriminators on the pooled final maps. The paper gives these losses (feature-map and logit
    distillation between the pair's interpolation and their mixup image, the self-teacher's soft labels to the
    backbone, adversarial feature learning); no paper text was at hand, so terms and weights follow the official
    code line by line, except for its two defects, fixed here:

    - The CIFAR script computes the mixed images' CE and never adds it to the loss (so its self-teacher, whose
      only gradient is that CE, is never trained); the ImageNet script adds it. Here it is added
      (`mix_ce_weight` 1; 0 reproduces the CIFAR script).
    - Its discriminators sit in a plain Python list: never optimised (not registered parameters), and the network
      minimises their BCE, i.e. it learns to make interpolated and mixed maps *distinguishable* to fixed random
      discriminators, against the feature MSE and the paper's adversarial intent. Here they are registered
      modules (trained, saved, resumed), minimise their BCE, and the network receives its negated gradient
      (gradient reversal): the min-max game in one backward pass.

    Other choices (the official code is ResNet-only): branches on any timm model whose forward from the level is a
    chain of modules (`components.deep_branch`, the deep branches DKS uses; the branch's classifier is the copied
    head, the official `avg_pool` and `fc1-3` on ResNets); the final maps are `forward_features`' output
    (EfficientNet after `conv_head`, ViT/Swin after `norm`; the self-teacher and the discriminators pool them by
    their mean, tokens included); the self-teacher pools before its 1x1 convolution (the same function).

    Mixup/CutMix: without --mixup/--cutmix the task mixes with its own mixup, as the official `mixup_data`: one
    `lam ~ Beta(alpha, alpha)` per step, then image i's partner `partner[i]` from a uniformly random permutation
    of the batch (the code's `torch.randperm`; both drawn here from NumPy's global generator, which the loop seeds
    every step, so a resumed run is bit-identical). timm's pairing, image i with n-1-i, is not the same even on
    shuffled batches: there it is a uniformly random perfect matching (even n), each image mixed with another one,
    mutually (a with b and b with a, in complementary proportions); the permutation gives each image a partner
    drawn uniformly from all n, itself included (probability 1/n: the mixed image is the original, its feature
    and logit distillation terms are 0), and pairs are mutual only in its 2-cycles. The expected loss of a step
    under the permutation is (1 - 1/n) that of the matching plus 1/n that of self-mixes; the within-step
    correlation of the mixes differs too. With --mixup/--cutmix, timm's batch-form `Mixup` (`run.mixup`) replaces
    that draw, with timm's pairing (image i with n-1-i) and its parameters:
    its alphas, probability, switch probability, --mixup-mode (a lambda per image/pair in 'elem'/'pair') and
    --mixup-off-epoch (lambda 1: the mixed images equal the originals); a CutMix draw pastes the partner's box
    into the image, and the maps and logits are still interpolated lambda-weighted with lambda the kept area (the
    paper defines only mixup; this is the natural extension, and needs no spatial correspondence). The mixed
    images' targets are timm's mixed (smoothed) targets; the originals' are their labels (smoothed one-hots under
    --mixup, whose criterion takes soft targets). `output` is the backbone's logits of the originals.
    """

    def __init__(self, model: nn.Module, hparams: MixSKDHparams, **kwargs):
        super().__init__(model, hparams, **kwargs)
        self.mixer: Optional[SharedMix] = None

    @classmethod
    def requirements(cls, hparams: MixSKDHparams) -> Needs:
        return Needs(mixup='task')

    def bind_run(self, run: RunInfo) -> None:
        super().bind_run(run)
        self.mixer = SharedMix(run.mixup, 'MixSKD\'s mixed images') if run.mixup is not None else None

    def wrap_model(self, model: nn.Module) -> MixSKDModule:
        name = model_name(model)
        indices = choose_levels(model, 'mixskd', parse_levels(self.hparams.indices),
                                lambda: default_levels(model, DEFAULT_BRANCHES), noun='branch index')
        if not has_pooled_features(model):
            raise ValueError(f'mixskd needs forward_features/forward_head, and model {name} has none')
        if not getattr(model, 'num_classes', 0):
            raise ValueError(f'mixskd needs a model with a classifier, and {name} has none')
        module = MixSKDModule(model, deep_branches(model, indices, 'mixskd'), model.num_classes)
        module.aux = like_model(module.aux, model)
        _logger.info(f'mixskd: branches on forward_intermediates() levels {indices} of {name} '
                     f'({training_only_parameters(module.aux)})')
        return module

    def _mix(self, input: torch.Tensor, target: torch.Tensor):
        """The mixed images (a new tensor), each one's partner, lambda per row, and the mixed images' targets
        (None: mix the hard labels' losses lambda-weighted)."""
        n = input.shape[0]
        if self.mixer is not None:
            mix = self.mixer.draw(input.shape)
            lams = mix.lams if isinstance(mix, RowMix) else (mix.lam,) * n
            partner = torch.arange(n - 1, -1, -1, device=input.device)
            return mix_block(input.clone(), mix), partner, lams, mix_target(target, self.mixer.mixup, mix)
        lam = float(np.random.beta(self.hparams.alpha, self.hparams.alpha))
        partner = torch.from_numpy(np.random.permutation(n)).to(input.device)
        return lam * input + (1 - lam) * input[partner], partner, (lam,) * n, None

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        if not self.training:
            output = self.get_eval_model()(input)
            loss = self.cross_entropy(output, target)
            return {'loss': loss, 'output': output, 'loss_ce': loss}
        n = input.shape[0]
        mixed, partner, lams, mixed_target = self._mix(input, target)
        lam = torch.tensor(lams, dtype=torch.float32, device=input.device)
        out = self.trainable_module(torch.cat([input, mixed]), lam, partner)
        if self.mixer is not None:  # the criterion takes soft targets: the originals' smoothed one-hots
            original = mixup_target(target, self.mixer.mixup.num_classes, 1., self.mixer.mixup.label_smoothing)

            def ce_original(z):
                return self.cross_entropy(z, original)

            def ce_mixed(z):
                return self.cross_entropy(z, mixed_target)
        else:  # the official mixup_criterion: lam CE(z, y_i) + (1 - lam) CE(z, y_j)
            def ce_original(z):
                return self.cross_entropy(z, target)

            def ce_mixed(z):
                return lams[0] * self.cross_entropy(z, target) + (1 - lams[0]) * self.cross_entropy(z, target[partner])
        terms = mixskd_loss(out, lam, partner, ce_original, ce_mixed, self.hparams)
        terms['output'] = out['logits'][-1][:n]
        return terms
