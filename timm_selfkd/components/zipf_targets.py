"""Dense votes and Zipf soft labels (Zipf's label smoothing, Liang et al., ECCV 2022, sec. 3).

- `position_logits`: the model's own head applied at every position of the unpooled final feature map.
- `vote_counts`: each class's number of positions whose prediction (argmax) it is.
- `min_rank`: 1-based ranks, ties sharing the smallest rank (SciPy's `rankdata(method='min')`).
- `zipf_nontarget_kl`: `KL(zipf || softmax(z) restricted to the non-target classes)`, per image.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_selfkd.components.losses import float32_region

__all__ = ['UPSAMPLE_MODES', 'position_features', 'position_logits', 'vote_counts', 'min_rank', 'zipf_distribution',
           'zipf_nontarget_kl']

UPSAMPLE_MODES = ('none', 'bilinear', 'bicubic')


def _layout(model: nn.Module, feature_map: torch.Tensor) -> str:
    """'NCHW', 'NHWC' or 'NLC' (tokens) for the output of `model.forward_features`."""
    if feature_map.ndim == 3:
        return 'NLC'
    if feature_map.ndim != 4:
        raise ValueError(f'forward_features of {type(model).__name__} gives a {feature_map.ndim}-d tensor; dense '
                         'votes need a (B, C, H, W) or (B, H, W, C) map or (B, N, C) tokens')
    fmt = getattr(model, 'output_fmt', None)  # Swin and other NHWC models say so
    if isinstance(fmt, str) and fmt.upper() in ('NCHW', 'NHWC'):
        return fmt.upper()
    channels = getattr(model, 'num_features', None)
    if channels is not None and feature_map.shape[1] != channels and feature_map.shape[-1] == channels:
        return 'NHWC'
    return 'NCHW'


def position_features(model: nn.Module, feature_map: torch.Tensor, upsample: str = 'none') -> torch.Tensor:
    """Every position of `feature_map` as its own one-position input of `model.forward_head`.

    A (B, C, H, W) map becomes (B*H'*W', C, 1, 1), an NHWC map (B*H'*W', 1, 1, C) (H' = 2H with `upsample`,
    as the official code's `F.upsample(scale_factor=2)`), and (B, N, C) tokens become (B*P, n+1, C) for the P
    tokens after the n prefix (class, register) tokens, each repeated n+1 times: whatever the head pools (the
    class token, the mean of the patch tokens, an attention pool), it pools that one token.
    """
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f'upsample must be one of {", ".join(UPSAMPLE_MODES)}, got {upsample!r}')
    layout = _layout(model, feature_map)
    if layout == 'NLC':
        if upsample != 'none':
            raise ValueError(f'{type(model).__name__} gives a token sequence, not a spatial map: dense votes '
                             'cannot be upsampled (use upsample none)')
        prefix = int(getattr(model, 'num_prefix_tokens', 0) or 0)
        tokens = feature_map[:, prefix:]
        return tokens.reshape(-1, 1, tokens.shape[-1]).expand(-1, prefix + 1, -1)
    if layout == 'NHWC':
        feature_map = feature_map.permute(0, 3, 1, 2)
    if upsample != 'none':
        feature_map = F.interpolate(feature_map, scale_factor=2., mode=upsample, align_corners=False)
    channels = feature_map.shape[1]
    positions = feature_map.permute(0, 2, 3, 1).reshape(-1, channels)
    return positions[:, None, None, :] if layout == 'NHWC' else positions[:, :, None, None]


def position_logits(model: nn.Module, feature_map: torch.Tensor, upsample: str = 'none') -> torch.Tensor:
    """The model's head at every position of the unpooled final features: (B, P, K) logits.

    Runs `model.forward_head` on each position alone (`position_features`), so every layer the head applies after
    pooling applies per position too: ConvNeXt's LayerNorm and pre-logits MLP, ViT's `fc_norm`, MobileNetV3's
    head convolution, and the classifier, with their bias. A head layer that works before pooling (e.g. a 3x3
    convolution) sees each position alone. The caller picks the mode (the Zipf task runs it in eval mode).
    """
    positions = position_features(model, feature_map, upsample)
    logits = model.forward_head(positions)
    if isinstance(logits, (tuple, list)):  # e.g. distilled DeiT in training mode: the two heads' mean
        logits = sum(logits) / len(logits)
    logits = logits.reshape(positions.shape[0], -1)  # conv classifiers without a flatten give (B*P, K, 1, 1)
    return logits.reshape(feature_map.shape[0], -1, logits.shape[-1])


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """Each class's votes, (B, K) float32: how many of the P positions of (B, P, K) `logits` predict it."""
    batch, _, classes = logits.shape
    winners = logits.argmax(dim=-1) + classes * torch.arange(batch, device=logits.device)[:, None]
    # bincount without weights is deterministic on every device, and counts are exact in float32 (P < 2^24)
    return torch.bincount(winners.flatten(), minlength=batch * classes).view(batch, classes).float()


def min_rank(scores: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's scores, largest first, ties sharing the smallest rank: `1 + #{j: s_j > s_i}`
    (SciPy's `rankdata(-scores, method='min')`, which the official code uses). Long tensor of the shape of
    `scores` (N, K)."""
    ascending = scores.sort(dim=-1).values.contiguous()
    at_most = torch.searchsorted(ascending, scores.contiguous(), right=True)  # #{j: s_j <= s_i}
    return scores.shape[-1] - at_most + 1


def zipf_distribution(scores: torch.Tensor, target: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Zipf's soft label of the non-target classes, float32 (N, K): `r_k^-power / sum_{j != y} r_j^-power` for
    each class k != y, 0 on the target y, where r are the `min_rank`s of `scores` among all K classes (the target
    included, as in the official code: a target ranked first leaves the other classes ranks 2..K)."""
    with float32_region(scores):
        weights = min_rank(scores.float()).float().pow(-power)
        weights = weights.scatter(1, target[:, None], 0.)
        return weights / weights.sum(dim=1, keepdim=True)


def zipf_nontarget_kl(logits: torch.Tensor, zipf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image `KL(zipf || p~)`, float32 (N,), where `p~` is the softmax of the logits of the K - 1 non-target
    classes (the target's logit removed, not just masked) and `zipf` a `zipf_distribution` (0 on the target).

    Computed as a log-softmax with the target's logit at -inf, then 0 in its column, so no gradient reaches it.
    """
    with float32_region(logits):
        is_target = torch.zeros_like(logits, dtype=torch.bool).scatter(1, target[:, None], True)
        log_p = F.log_softmax(logits.float().masked_fill(is_target, float('-inf')), dim=1).masked_fill(is_target, 0.)
        zipf = zipf.detach().float()
        return (torch.xlogy(zipf, zipf) - zipf * log_p).sum(dim=1)
