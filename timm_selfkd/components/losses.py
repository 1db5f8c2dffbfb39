"""Float32 knowledge-distillation primitives shared by every method.

All functions run with autocast disabled and upcast their inputs, so they stay finite under fp16/bf16 AMP
(CPU autocast would otherwise keep softmax in bf16, and `torch.linalg.solve` refuses low precision).
"""
import math
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['float32_region', 'kd_kl', 'kd_kl_from_logits', 'soft_target_ce', 'default_tc_gamma', 'corrected_teacher',
           'class_teacher_kl', 'linear_mmd', 'bake_targets', 'teacher_correction', 'mixed_label_weights',
           'known_label_smoothing']


def float32_region(tensor: torch.Tensor):
    """A context that switches autocast off on the device of `tensor`."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def kd_kl(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(q || softmax(z / T))`, summed over classes and averaged over the batch.

    Args:
        student_logits: Student logits `z`, shape (N, K); gradients flow through them.
        teacher_probs: Teacher distribution `q` at temperature T, shape (N, K), rows summing to 1; detached here.
        temperature: Softening temperature T.
    """
    with float32_region(student_logits):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_p, teacher_probs.detach().float(), reduction='batchmean')
        return kl * temperature ** 2


def kd_kl_from_logits(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        temperature: float,
        detach_teacher: bool = True,
) -> torch.Tensor:
    """`T^2 * KL(softmax(t / T) || softmax(z / T))` for teacher logits `t`, computed between log-probabilities.

    The teacher side is detached unless `detach_teacher=False` lets the term's gradient reach it too.
    """
    with float32_region(student_logits):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        teacher_logits = teacher_logits.detach() if detach_teacher else teacher_logits
        log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_p, log_q, reduction='batchmean', log_target=True)
        return kl * temperature ** 2


def soft_target_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """`-sum_k q_k log softmax(z)_k`, averaged over the batch, for target distributions `q` (detached here)."""
    with float32_region(logits):
        log_p = F.log_softmax(logits.float(), dim=-1)
        return -(target_probs.detach().float() * log_p).sum(dim=-1).mean()


def default_tc_gamma(num_classes: int) -> float:
    """Teacher Correction's gamma for K classes when none is given: the LsrKD paper's rule 2.5 / K (sec. 4.4:
    0.025 for CIFAR-100's grid, "0.25 instead of 0.025, since there are only 10 classes"; its "[0.11, 0.25]" is
    the grid's 0.011-0.025). Where 2.5 / K is not below 1 (K = 2), the middle of (1/K, 1): 0.75."""
    return 2.5 / num_classes if num_classes > 2.5 else (1 + 1 / num_classes) / 2


def corrected_teacher(num_classes: int, gamma: float) -> Tuple[float, float]:
    """The teacher of Teacher Correction (LsrKD paper, eq. 11) as `(true_prob, other_prob)`: `gamma` on the true
    class and `(1 - gamma) / (K - 1)` on each other class. `gamma = 1 / K` is the uniform teacher of LSR/LsrKD.

    Raises:
        ValueError: if `gamma` is not in [1/K, 1), i.e. the teacher would favour a wrong class or be one-hot.
    """
    if num_classes < 2:
        raise ValueError(f'a class teacher needs at least 2 classes, got {num_classes}')
    if not 1 / num_classes - 1e-12 <= gamma < 1:
        raise ValueError(f'gamma must be >= 1/K = {1 / num_classes:.4g} (uniform) and < 1 for {num_classes} classes, '
                         f'got {gamma}')
    return gamma, (1 - gamma) / (num_classes - 1)


def known_label_smoothing(criterion: Any, criterion_kwargs: Optional[Mapping[str, Any]] = None) -> Optional[float]:
    """The label smoothing a task was built with: `criterion_kwargs['smoothing']` (what train.py and
    `create_task(criterion_kwargs=...)` pass, also when soft targets make timm's criterion ignore it), else the
    criterion's own `smoothing` (timm's `LabelSmoothingCrossEntropy`); None when neither says."""
    if criterion_kwargs and criterion_kwargs.get('smoothing') is not None:
        return float(criterion_kwargs['smoothing'])
    smoothing = getattr(criterion, 'smoothing', None)
    return float(smoothing) if smoothing is not None else None


def mixed_label_weights(target: torch.Tensor, smoothing: Optional[float] = None) -> torch.Tensor:
    """The class weights `w` of timm's mixed soft targets, shape (N, K), each row summing to 1.

    `timm.data.mixup_target` (all of mixup, CutMix, modes batch/pair/elem) gives `t = lam y_a + (1 - lam) y_b`
    with label-smoothed one-hots (`off = s / K`, `on = 1 - s + off`), so `w = (t - off) / (on - off)` is exactly
    `lam` on class a and `1 - lam` on class b (1 when a == b), 0 elsewhere. With K >= 3 classes some class is
    neither a nor b, so `off` is the row's minimum and the smoothing s need not be known (`on - off = 1 - K off`);
    with K = 2 the rows cannot tell smoothing from mix, and `smoothing` must be given.

    Args:
        target: Soft targets from timm's mixup, shape (N, K).
        smoothing: Label smoothing of the targets; read only for K = 2.
    """
    num_classes = target.shape[-1]
    target = target.float()
    if num_classes >= 3:
        off = target.min(dim=-1, keepdim=True).values
    elif smoothing is None:
        raise ValueError('with 2 classes the label smoothing of mixed targets cannot be read from them: create the '
                         'task with criterion_kwargs=dict(smoothing=...) (the mixup\'s label_smoothing)')
    else:
        off = torch.full_like(target[:, :1], smoothing / num_classes)
    return (target - off) / (1 - num_classes * off)


def class_teacher_kl(
        student_logits: torch.Tensor,
        target: torch.Tensor,
        true_prob: float,
        other_prob: float,
        temperature: float,
        smoothing: Optional[float] = None,
) -> torch.Tensor:
    """`KL(q || softmax(z / T))` for a teacher `q` that is `true_prob` on the label and `other_prob` elsewhere.

    Summed over classes and averaged over the batch, without the `T` or `T^2` factor (methods scale it their
    way). For class labels the teacher is never materialised: with `log p = log_softmax(z / T)`,
    `KL = sum_k q_k log q_k - other_prob * sum_k log p_k - (true_prob - other_prob) * log p_y`, whose first
    term is a constant of the class count.

    For mixed soft targets (timm's mixup/CutMix, shape (N, K)) the teacher is built from the mixed label,
    lambda-weighted: `q = sum_c w_c q(c) = other_prob + (true_prob - other_prob) w` with the class weights `w`
    of `mixed_label_weights` (lam on one label, 1 - lam on the other, label smoothing removed).

    Args:
        student_logits: Student logits `z`, shape (N, K).
        target: Class indices, shape (N,), or mixed soft targets, shape (N, K); not read when the teacher is
            uniform (`true_prob == other_prob`).
        true_prob: Teacher probability of the labelled class.
        other_prob: Teacher probability of every other class (`(1 - true_prob) / (K - 1)`).
        temperature: Softening temperature T of the student.
        smoothing: Label smoothing of soft targets, needed only with 2 classes (`mixed_label_weights`).
    """
    num_classes = student_logits.shape[-1]
    if target.ndim == 2 and true_prob != other_prob:
        with float32_region(student_logits):
            log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
            teacher = other_prob + (true_prob - other_prob) * mixed_label_weights(target, smoothing)
            return (teacher * (teacher.log() - log_p)).sum(dim=-1).mean()
    neg_entropy = sum(count * p * math.log(p) for count, p in ((1, true_prob), (num_classes - 1, other_prob)) if p > 0)
    with float32_region(student_logits):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        cross = other_prob * log_p.sum(dim=-1)
        if true_prob != other_prob:
            cross = cross + (true_prob - other_prob) * log_p.gather(-1, target[:, None]).squeeze(-1)
        return neg_entropy - cross.mean()


def linear_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared maximum mean discrepancy with a linear kernel, `||mean_i x_i - mean_i y_i||^2`, in float32.

    Args:
        x: Samples of one distribution, shape (N, D); gradients flow through both arguments.
        y: Samples of the other, shape (M, D).
    """
    with float32_region(x):
        return (x.float().mean(dim=0) - y.float().mean(dim=0)).square().sum()


@torch.no_grad()
def bake_targets(
        features: torch.Tensor,
        logits: torch.Tensor,
        omega: float,
        temperature: float,
) -> torch.Tensor:
    """BAKE soft targets, eq. 9: `Q = (1 - w) (I - w A_hat)^-1 softmax(z / T)`.

    `A_hat` is the row-softmax of the cosine affinities of the L2-normalised features (eq. 3) with the
    diagonal removed (eq. 4). The linear system is solved in float32 (never inverted) and without gradient.
    For `omega == 1` the series of eq. 7 does not converge, so a single propagation `A_hat P` is used, as the
    paper does.

    Args:
        features: Pooled pre-logit features, shape (N, D).
        logits: Logits of the same images, shape (N, K).
        omega: Ensembling weight w in [0, 1].
        temperature: Softening temperature T.

    Returns:
        Float32 tensor (N, K) whose rows are probability distributions.
    """
    if features.shape[0] < 2:
        raise ValueError('BAKE needs at least two images in a batch to ensemble their knowledge')
    with float32_region(features):
        normed = F.normalize(features.float(), dim=1)
        affinity = normed @ normed.t()
        affinity.fill_diagonal_(float('-inf'))
        affinity_hat = affinity.softmax(dim=1)
        probs = (logits.float() / temperature).softmax(dim=1)
        if omega >= 1:
            return affinity_hat @ probs
        system = torch.eye(probs.shape[0], device=probs.device, dtype=probs.dtype) - omega * affinity_hat
        # solve_ex skips the error check that would synchronise the host with the device on every step
        targets = torch.linalg.solve_ex(system, probs, check_errors=False).result
        return targets.mul_(1 - omega).clamp_(min=0)


def _corrected(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 16 for logits already divided by T, true class `target` (N,) of each row."""
    true_class = F.one_hot(target, logits.shape[-1]).bool().expand_as(logits)
    others = logits.masked_fill(true_class, float('-inf')).softmax(dim=-1)
    return torch.where(true_class, torch.full_like(others, gamma), (1 - gamma) * others)


@torch.no_grad()
def teacher_correction(teacher_logits: torch.Tensor, target: torch.Tensor, gamma: float,
                       temperature: float, smoothing: Optional[float] = None) -> torch.Tensor:
    """Teacher Correction of a teacher's distribution at temperature T (MrKD-TC, eq. 16).

    The true class c gets `gamma`; every other class m keeps its share of the rest in proportion to the
    teacher's own probabilities: `(1 - gamma) q_m / (1 - q_c)`, which is the softmax over the classes other
    than c (computed that way, so it stays exact when the teacher is nearly certain of c). With constant
    (e.g. zero) teacher logits this is the uniform-teacher correction of eq. 11.

    For mixed soft targets (timm's mixup/CutMix) the distribution is corrected to each of the (at most two)
    mixed labels and the two mixed lambda-weighted: `sum_c w_c corrected(q, c)`, `w` from `mixed_label_weights`
    (the two largest weights; the others are 0).

    Args:
        teacher_logits: Teacher logits, shape (..., N, K).
        target: True class of each row, shape (N,), or mixed soft targets, shape (N, K).
        gamma: Probability given to the true class.
        temperature: Softening temperature T.
        smoothing: Label smoothing of soft targets, needed only with 2 classes (`mixed_label_weights`).

    Returns:
        Float32 tensor of the logits' shape whose rows are probability distributions.
    """
    with float32_region(teacher_logits):
        logits = teacher_logits.float() / temperature
        if target.ndim == 1:
            return _corrected(logits, target, gamma)
        weights, classes = mixed_label_weights(target, smoothing).topk(2, dim=-1)
        return (weights[:, :1] * _corrected(logits, classes[:, 0], gamma)
                + weights[:, 1:] * _corrected(logits, classes[:, 1], gamma))
