"""NLL, ECE and AURC on fixed predictions, computed by hand; the evaluator on one process and on two."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_selfkd.runtime.metrics import CalibrationEvaluator, aurc, confidence_and_correct, expected_calibration_error

# Five images, three classes: softmax probabilities (logits are their logs) and targets.
PROBS = torch.tensor([
    [0.70, 0.20, 0.10],  # confidence 0.70, class 0: right   bin 10 = (10/15, 11/15]
    [0.50, 0.30, 0.20],  # confidence 0.50, class 1: wrong   bin 7
    [0.10, 0.85, 0.05],  # confidence 0.85, class 1: right   bin 12
    [0.45, 0.30, 0.25],  # confidence 0.45, class 2: wrong   bin 6
    [0.72, 0.18, 0.10],  # confidence 0.72, class 1: wrong   bin 10, with the first image
], dtype=torch.float64)
TARGET = torch.tensor([0, 1, 1, 2, 1])
LOGITS = PROBS.log().float()

# By hand. NLL: mean of -log p[y]. ECE: bin 10 holds 1 right of confidence 0.70 + 0.72 -> |1 - 1.42| = 0.42;
# the single-image bins give 0.50, 0.15, 0.45; (0.42 + 0.50 + 0.15 + 0.45) / 5 = 0.304.
# AURC: by decreasing confidence 0.85 (right), 0.72 (wrong), 0.70 (right), 0.50 (wrong), 0.45 (wrong):
# risks 0/1, 1/2, 1/3, 2/4, 3/5, mean (0 + 0.5 + 1/3 + 0.5 + 0.6) / 5.
NLL = -(math.log(0.70) + math.log(0.30) + math.log(0.85) + math.log(0.25) + math.log(0.18)) / 5
ECE = 0.304
AURC = (0 + 0.5 + 1 / 3 + 0.5 + 0.6) / 5


def test_confidence_and_correct():
    confidence, correct = confidence_and_correct(LOGITS, TARGET)
    assert torch.allclose(confidence, torch.tensor([0.70, 0.50, 0.85, 0.45, 0.72]), atol=1e-6)
    assert correct.tolist() == [True, False, True, False, False]


def test_ece_by_hand():
    confidence, correct = confidence_and_correct(LOGITS, TARGET)
    assert expected_calibration_error(confidence, correct) == pytest.approx(ECE, abs=1e-6)
    # one bin for everything: |2 right - 3.22 summed confidence| / 5
    assert expected_calibration_error(confidence, correct, num_bins=1) == pytest.approx(1.22 / 5, abs=1e-6)


def test_ece_bins_are_closed_on_the_right():
    # 0.5 lies on the edge between bins (6/15, 7/15] and (7/15, 8/15] only with 2 bins: (0, 0.5] and (0.5, 1]
    confidence = torch.tensor([0.5, 0.75])
    correct = torch.tensor([True, False])
    # (0, 0.5]: |1 - 0.5| ; (0.5, 1]: |0 - 0.75|  -> (0.5 + 0.75) / 2
    assert expected_calibration_error(confidence, correct, num_bins=2) == pytest.approx(0.625)


def test_aurc_by_hand():
    confidence, correct = confidence_and_correct(LOGITS, TARGET)
    assert aurc(confidence, correct) == pytest.approx(AURC, abs=1e-9)
    assert aurc(torch.tensor([0.9, 0.8]), torch.tensor([True, True])) == 0
    assert aurc(torch.tensor([0.9, 0.8]), torch.tensor([False, False])) == 1


def test_aurc_ties_count_the_expected_risk():
    # 0.6 twice, one right and one wrong: the two orders give risks (0, 0, 1/3) and (0, 1/2, 1/3)
    confidence = torch.tensor([0.6, 0.9, 0.6])
    correct = torch.tensor([False, True, True])
    expected = ((0 + 0 + 1 / 3) / 3 + (0 + 1 / 2 + 1 / 3) / 3) / 2
    assert aurc(confidence, correct) == pytest.approx(expected)


def test_evaluator_reports_every_metric_by_hand():
    evaluator = CalibrationEvaluator()
    evaluator.update(LOGITS[:2], TARGET[:2])
    evaluator.update(LOGITS[2:], TARGET[2:])
    metrics = evaluator.compute()
    assert list(metrics) == list(CalibrationEvaluator.metric_names)
    assert metrics['top1'] == pytest.approx(40.)
    assert metrics['top5'] == pytest.approx(100.)
    assert metrics['nll'] == pytest.approx(NLL, abs=1e-6)
    assert metrics['loss'] == pytest.approx(NLL, abs=1e-5)  # timm's cross-entropy is the NLL
    assert metrics['ece'] == pytest.approx(100 * ECE, abs=1e-4)
    assert metrics['aurc'] == pytest.approx(1000 * AURC, abs=1e-6)


def test_evaluator_drops_sampler_padding():
    """Rows beyond `max_samples` (DistributedSampler padding) count in no metric."""
    evaluator = CalibrationEvaluator(max_samples=3)
    evaluator.update(LOGITS[:2], TARGET[:2])
    evaluator.update(LOGITS[2:], TARGET[2:])
    reference = CalibrationEvaluator()
    reference.update(LOGITS[:3], TARGET[:3])
    assert evaluator.compute() == pytest.approx(reference.compute())


def _worker(rank, init_file, out_file):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    # rank 0 has images 0, 1, 2; rank 1 has 3, 4 and one padded duplicate of image 0 that must not count
    rows = [[0, 1, 2], [3, 4, 0]][rank]
    evaluator = CalibrationEvaluator(max_samples=[3, 2][rank])
    evaluator.update(LOGITS[rows], TARGET[rows])
    metrics = evaluator.compute(distributed=True)
    if rank == 0:
        torch.save(dict(metrics), out_file)
    dist.destroy_process_group()


def test_evaluator_over_two_ranks_equals_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / 'init'), str(tmp_path / 'metrics.pt')), nprocs=2)
    metrics = torch.load(tmp_path / 'metrics.pt')
    single = CalibrationEvaluator()
    single.update(LOGITS, TARGET)
    assert metrics == pytest.approx(single.compute())
    assert metrics['aurc'] == pytest.approx(1000 * AURC)
