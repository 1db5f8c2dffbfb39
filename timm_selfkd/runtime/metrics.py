"""Calibration and selective-prediction metrics next to timm's top-1/top-5: NLL, ECE and AURC.

The functions take a whole evaluation set's predictions; `CalibrationEvaluator` accumulates them batch by
batch (on the device, no host sync per batch) and reduces them over all ranks in `compute`, as timm's
`ClassificationEvaluator` does for the loss and the accuracies. Units follow the self-KD papers' tables
(e.g. PS-KD + BYOT + DMFL, table 1): NLL in nats per image, ECE in percent, AURC x 10^3.

Example:
    >>> evaluator = CalibrationEvaluator(device='cpu')
    >>> evaluator.update(logits, target)   # per batch
    >>> evaluator.compute(distributed=False)
    OrderedDict([('loss', ...), ('top1', ...), ('top5', ...), ('nll', ...), ('ece', ...), ('aurc', ...)])
"""
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.task.evaluator import ClassificationEvaluator

__all__ = ['ECE_BINS', 'LOWER_IS_BETTER', 'confidence_and_correct', 'nll', 'expected_calibration_error', 'aurc',
           'all_gather_rows', 'CalibrationEvaluator']

ECE_BINS = 15
LOWER_IS_BETTER = ('loss', 'nll', 'ece', 'aurc')  # --eval-metric values whose best checkpoint is the lowest


def confidence_and_correct(logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability (float32) of each row and whether the arg-max class is the target."""
    probs = logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)
    return confidence, predicted.eq(target)


def nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood `-log softmax(z)[y]` (nats), computed in float64."""
    return F.cross_entropy(logits.double(), target)


def _bin_index(confidence: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence; bin m holds (m / num_bins, (m + 1) / num_bins]."""
    inner = torch.linspace(0, 1, num_bins + 1, dtype=confidence.dtype, device=confidence.device)[1:-1]
    return torch.bucketize(confidence, inner, right=False)


def _bin_sums(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Float64 (3, num_bins): images, summed confidence and correct predictions per bin."""
    index = _bin_index(confidence, num_bins)
    sums = torch.zeros(3, num_bins, dtype=torch.float64, device=confidence.device)
    sums[0].index_add_(0, index, torch.ones_like(confidence, dtype=torch.float64))
    sums[1].index_add_(0, index, confidence.double())
    sums[2].index_add_(0, index, correct.double())
    return sums


def _ece_from_bins(sums: torch.Tensor) -> torch.Tensor:
    """`sum_m |B_m| / n * |acc(B_m) - conf(B_m)|` = `sum_m |correct_m - confidence_m| / n`."""
    return (sums[2] - sums[1]).abs().sum() / sums[0].sum().clamp(min=1)


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE (Guo et al., 2017) over `num_bins` equal-width confidence bins, as a fraction in [0, 1].

    Args:
        confidence: Max softmax probability of each image, shape (N,).
        correct: Whether each image's arg-max prediction is right, shape (N,).
        num_bins: Number of bins; bin m holds confidences in (m / num_bins, (m + 1) / num_bins].
    """
    return float(_ece_from_bins(_bin_sums(confidence, correct, num_bins)))


def aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the risk-coverage curve (Geifman et al., 2019), as a fraction in [0, 1].

    Images are accepted in order of decreasing confidence; after accepting k of N, the risk is the error rate
    among the accepted ones, and AURC is the mean of that risk over k = 1..N. Images of equal confidence are
    accepted together in an unknown order, so within a tie group the errors are counted as spread evenly
    (the expected risk over the group's orderings); without ties this is the usual definition.

    Args:
        confidence: Max softmax probability of each image, shape (N,).
        correct: Whether each image's arg-max prediction is right, shape (N,).
    """
    if not confidence.numel():
        return 0.
    order = confidence.argsort(descending=True)
    errors = (~correct[order].bool()).double()
    _, group, group_size = torch.unique_consecutive(confidence[order], return_inverse=True, return_counts=True)
    group_errors = torch.zeros(group_size.numel(), dtype=torch.float64, device=errors.device).index_add_(
        0, group, errors)
    group_start = torch.cumsum(group_size, 0) - group_size
    errors_before = torch.cumsum(group_errors, 0) - group_errors
    position = torch.arange(1, errors.numel() + 1, dtype=torch.float64, device=errors.device)
    within = position - group_start[group]
    expected_errors = errors_before[group] + within * group_errors[group] / group_size[group]
    return float((expected_errors / position).mean())


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors from every rank along dim 0, in rank order; row counts may differ (also zero)."""
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


class CalibrationEvaluator(ClassificationEvaluator):
    """timm's loss, top-1 and top-5, plus NLL, ECE (15 bins, percent) and AURC (x 10^3) of the whole set.

    NLL and the ECE bin totals accumulate in float64 on the device; AURC needs every image's confidence and
    correctness (5 bytes per image), kept on the device and gathered from all ranks once in `compute`.
    Distributed sampler padding is dropped by `max_samples` as in timm.

    To extend it (e.g. per-exit accuracies), subclass and override `update_extra` (called with the float
    logits and targets of the images that count) and `compute_extra` (returns more metrics), or call
    `update`/`compute` of an instance from another evaluator.

    Args:
        device: Device of the running totals (the model output's).
        max_samples: Ignore predictions beyond this many images (distributed sampler padding).
        criterion: Loss reported as `loss` (timm's default: cross-entropy).
        num_bins: ECE bins.
    """

    metric_names = ClassificationEvaluator.metric_names + ('nll', 'ece', 'aurc')

    def __init__(self, device=None, *, max_samples: Optional[int] = None, criterion=None, num_bins: int = ECE_BINS):
        self.num_bins = num_bins
        super().__init__(device, max_samples=max_samples, criterion=criterion)

    def reset(self):
        super().reset()
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.bin_sums = torch.zeros(3, self.num_bins, dtype=torch.float64, device=self.device)
        self.confidences = []
        self.corrects = []

    @torch.no_grad()
    def update(self, output, target):
        seen = self.num_samples
        super().update(output, target)
        kept = self.num_samples - seen  # rows beyond max_samples are padding
        if kept:
            self.update_extra(output[:kept].detach().float(), target[:kept].detach())

    def update_extra(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate the calibration statistics of one batch (float logits of the images that count)."""
        confidence, correct = confidence_and_correct(output, target)
        self.nll_sum += nll(output, target) * output.shape[0]
        self.bin_sums += _bin_sums(confidence, correct, self.num_bins)
        self.confidences.append(confidence)
        self.corrects.append(correct)

    def compute(self, distributed: bool = False):
        metrics = super().compute(distributed=distributed)
        metrics.update(self.compute_extra(distributed))
        return metrics

    def compute_extra(self, distributed: bool) -> 'OrderedDict[str, float]':
        """NLL, ECE (percent) and AURC (x 10^3) over every rank's images."""
        totals = torch.cat([self.nll_sum[None], self.bin_sums.flatten()])
        confidence = torch.cat(self.confidences) if self.confidences else torch.zeros(0, device=self.device)
        correct = torch.cat(self.corrects) if self.corrects else torch.zeros(0, dtype=torch.bool, device=self.device)
        if distributed:
            dist.all_reduce(totals)
            confidence = all_gather_rows(confidence)
            correct = all_gather_rows(correct.to(torch.uint8)).bool()
        bins = totals[1:].view(3, self.num_bins)
        count = max(float(bins[0].sum()), 1.)
        return OrderedDict(
            nll=float(totals[0]) / count,
            ece=100 * float(_ece_from_bins(bins)),
            aurc=1000 * aurc(confidence, correct),
        )
