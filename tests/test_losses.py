"""Tests of the float32 KD primitives in `timm_selfkd.components.losses`.

References are written from the definitions (METHODS.md notation, BAKE paper sec. 3.2, eq. 3-9) with plain
`math` or float64 torch ops, never by calling the function under test or `torch.kl_div`.
"""
import math

import pytest
import torch

from timm_selfkd.components.losses import bake_targets, kd_kl, kd_kl_from_logits


# ---------------------------------------------------------------------------------------------------------------------
# Hand references (plain python math)
# ---------------------------------------------------------------------------------------------------------------------

def softmax_row(row, temperature=1.0):
    """softmax(row / T) of a list of floats."""
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def hand_kd(teacher_prob_rows, student_logit_rows, temperature):
    """T^2 * mean_i sum_k q_ik log(q_ik / p_ik), with p = softmax(z / T) and 0 log 0 = 0."""
    total = 0.0
    for q, z in zip(teacher_prob_rows, student_logit_rows):
        p = softmax_row(z, temperature)
        total += sum(qk * math.log(qk / pk) for qk, pk in zip(q, p) if qk > 0)
    return temperature ** 2 * total / len(teacher_prob_rows)


def matmul_rows(a, b):
    """Matrix product of two list-of-rows matrices."""
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def reference_affinity(features):
    """Eq. 3-4 in float64: cosine affinities, diagonal removed, row softmax."""
    normed = features.double() / features.double().norm(dim=1, keepdim=True)
    affinity = normed @ normed.t()
    affinity.fill_diagonal_(float('-inf'))
    return torch.softmax(affinity, dim=1)


def reference_propagation(features, logits, omega, temperature, iterations=500):
    """Eq. 7 iterated to convergence in float64: Q_t = w A_hat Q_{t-1} + (1 - w) P, Q_0 = P."""
    a_hat = reference_affinity(features)
    probs = torch.softmax(logits.double() / temperature, dim=1)
    q = probs.clone()
    for _ in range(iterations):
        q = omega * a_hat @ q + (1 - omega) * probs
    return q


STUDENT = [[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]]
TEACHER_LOGITS = [[3.0, 1.0, -2.0], [0.0, 0.0, 1.5]]


# ---------------------------------------------------------------------------------------------------------------------
# kd_kl / kd_kl_from_logits
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_kd_kl_matches_hand_computed_value(temperature):
    """kd_kl = T^2 * sum_k q log(q / softmax(z/T)) averaged over the batch (2x3 example, a zero in q)."""
    teacher_probs = [[0.2, 0.3, 0.5], [0.0, 0.25, 0.75]]
    expected = hand_kd(teacher_probs, STUDENT, temperature)
    got = kd_kl(torch.tensor(STUDENT), torch.tensor(teacher_probs), temperature)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kd_kl_literal_value():
    """One fully written-out case: T=2, z=[0, ln 4] -> p=[1/3, 2/3]; q=[1/2, 1/2].

    KL = 1/2 ln(3/2) + 1/2 ln(3/4); times T^2 = 4; batch of one row.
    """
    z = torch.tensor([[0.0, math.log(4.0)]])
    q = torch.tensor([[0.5, 0.5]])
    expected = 4 * (0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    assert kd_kl(z, q, 2.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 3.0])
def test_kd_kl_from_logits_matches_hand_computed_value(temperature):
    """kd_kl_from_logits = T^2 * KL(softmax(t/T) || softmax(z/T)), batch mean (2x3 example)."""
    teacher_probs = [softmax_row(row, temperature) for row in TEACHER_LOGITS]
    expected = hand_kd(teacher_probs, STUDENT, temperature)
    got = kd_kl_from_logits(torch.tensor(STUDENT), torch.tensor(TEACHER_LOGITS), temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_kd_kl_is_zero_for_identical_distributions():
    """KL(p || p) = 0 for both entry points."""
    z = torch.tensor(STUDENT)
    assert kd_kl_from_logits(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_kl(z, torch.softmax(z / 3.0, dim=1), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_kl_temperature_squared_scaling():
    """Scaling both logit sets by T leaves the distributions unchanged, so the loss grows by exactly T^2."""
    torch.manual_seed(0)
    z, t = torch.randn(4, 6), torch.randn(4, 6)
    base = kd_kl_from_logits(z, t, 1.0)
    assert base.item() > 0
    for temperature in (2.0, 5.0):
        scaled = kd_kl_from_logits(z * temperature, t * temperature, temperature)
        assert scaled.item() == pytest.approx(temperature ** 2 * base.item(), rel=1e-4)
        probs = torch.softmax(t, dim=1)
        assert kd_kl(z * temperature, probs, temperature).item() == pytest.approx(
            temperature ** 2 * kd_kl(z, probs, 1.0).item(), rel=1e-4)


def test_kd_kl_gradient_flows_to_student_only_with_analytic_value():
    """d/dz [T^2 KL(q || softmax(z/T))] / batch = T (p - q) / N; the teacher (probs or logits) gets no gradient."""
    torch.manual_seed(0)
    temperature, n = 2.0, 3
    z = torch.randn(n, 4, requires_grad=True)
    t = torch.randn(n, 4, requires_grad=True)
    teacher_probs = torch.softmax(t / temperature, dim=1)
    kd_kl(z, teacher_probs, temperature).backward()
    assert t.grad is None
    expected = temperature * (torch.softmax(z.detach() / temperature, dim=1) - teacher_probs.detach()) / n
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-6)

    z.grad = None
    kd_kl_from_logits(z, t, temperature).backward()
    assert t.grad is None
    torch.testing.assert_close(z.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('teacher', [TEACHER_LOGITS, [[50.0, -50.0, 0.0], [-50.0, 0.0, 50.0]]],
                         ids=['moderate', 'peaked'])
def test_kd_kl_bf16_autocast_is_finite_float32(teacher):
    """bf16 inputs under CPU bf16 autocast: float32, finite result and gradient, equal to float32 math on the same values."""
    student = torch.tensor(STUDENT, dtype=torch.bfloat16, requires_grad=True)
    teacher_logits = torch.tensor(teacher, dtype=torch.bfloat16)
    teacher_probs = torch.softmax(teacher_logits.float() / 2.0, dim=1).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        from_logits = kd_kl_from_logits(student * 1, teacher_logits, 2.0)
        from_probs = kd_kl(student * 1, teacher_probs, 2.0)
    for value in (from_logits, from_probs):
        assert value.dtype == torch.float32
        assert torch.isfinite(value)

    # The same bf16-representable values in plain float32: must agree tightly (only the inputs were rounded).
    ref_logits = kd_kl_from_logits(student.detach().float(), teacher_logits.float(), 2.0)
    ref_probs = kd_kl(student.detach().float(), teacher_probs.float(), 2.0)
    assert from_logits.item() == pytest.approx(ref_logits.item(), rel=1e-5, abs=1e-5)
    assert from_probs.item() == pytest.approx(ref_probs.item(), rel=1e-5, abs=1e-5)
    # ... and against the hand-computed value on the original float32 numbers (bf16 rounding only).
    hand = hand_kd([softmax_row(r, 2.0) for r in teacher], STUDENT, 2.0)
    assert from_logits.item() == pytest.approx(hand, rel=2e-2, abs=1e-2)

    (from_logits + from_probs).backward()
    assert torch.isfinite(student.grad.float()).all()


# ---------------------------------------------------------------------------------------------------------------------
# bake_targets
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('omega', [0.1, 0.5, 0.9])
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_bake_targets_equal_converged_propagation(omega, temperature):
    """Eq. 9 equals the limit of eq. 7 (500 float64 iterations of Q_t = w A_hat Q_{t-1} + (1-w) P)."""
    torch.manual_seed(0)
    features, logits = torch.randn(7, 5), 3 * torch.randn(7, 6)
    got = bake_targets(features, logits, omega, temperature)
    expected = reference_propagation(features, logits, omega, temperature)
    assert got.dtype == torch.float32 and got.shape == (7, 6)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('omega', [0.3, 0.5, 0.9])
def test_bake_targets_two_images_closed_form(omega):
    """N=2: A_hat = [[0,1],[1,0]] whatever the features, so Q = (1-w)/(1-w^2) (P + w swap(P)) = (P + w swap(P))/(1+w)."""
    temperature = 2.0
    logits = [[1.0, 2.0, 3.0], [0.0, 0.0, 1.0]]
    p1, p2 = (softmax_row(row, temperature) for row in logits)
    scale = (1 - omega) / (1 - omega ** 2)
    expected = [[scale * (a + omega * b) for a, b in zip(p1, p2)],
                [scale * (b + omega * a) for a, b in zip(p1, p2)]]
    features = torch.tensor([[0.3, -1.0, 2.0], [5.0, 0.1, 0.0]])
    got = bake_targets(features, torch.tensor(logits), omega, temperature)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


def hand_affinity_three():
    """A_hat for f1=(1,0), f2=(0,1), f3=(2,0): cosines A12=0, A13=1, A23=0, diagonal excluded (eq. 3-4)."""
    e = math.e
    return [[0.0, 1 / (1 + e), e / (1 + e)],
            [0.5, 0.0, 0.5],
            [e / (1 + e), 1 / (1 + e), 0.0]]


THREE_FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
THREE_LOGITS = [[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, -2.0], [-1.0, -1.0, 3.0, 0.0]]


def test_bake_targets_omega_one_is_single_propagation_by_hand():
    """omega=1: a single propagation A_hat P (paper's choice), with A_hat written out by hand for N=3.

    f3 is f1 scaled by 2: their cosine is 1, so features must be L2-normalised, and a self-affinity of 1 would
    dominate every row if the diagonal were not excluded.
    """
    probs = [softmax_row(row) for row in THREE_LOGITS]
    expected = matmul_rows(hand_affinity_three(), probs)
    got = bake_targets(THREE_FEATURES, torch.tensor(THREE_LOGITS), 1.0, 1.0)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('omega', [0.2, 0.5, 0.8])
def test_bake_targets_fixed_point_of_eq7_by_hand(omega):
    """For N=3 with the hand A_hat, Q satisfies Q = w A_hat Q + (1-w) P (the fixed point of eq. 7)."""
    temperature = 2.0
    probs = [softmax_row(row, temperature) for row in THREE_LOGITS]
    got = bake_targets(THREE_FEATURES, torch.tensor(THREE_LOGITS), omega, temperature)
    q = got.tolist()
    propagated = matmul_rows(hand_affinity_three(), q)
    rhs = [[omega * a + (1 - omega) * p for a, p in zip(ra, rp)] for ra, rp in zip(propagated, probs)]
    torch.testing.assert_close(got, torch.tensor(rhs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('omega', [0.0, 0.5, 0.9, 1.0])
def test_bake_targets_rows_are_distributions(omega):
    """Rows of Q are non-negative and sum to 1 (eq. 9 needs no renormalisation), also for peaked logits."""
    torch.manual_seed(1)
    features = torch.randn(16, 8)
    logits = torch.randn(16, 10) * 20
    got = bake_targets(features, logits, omega, 1.0)
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(16), rtol=0, atol=1e-5)


def test_bake_targets_exclude_self_knowledge():
    """Diagonal excluded: with omega=1, row i of Q does not depend on image i's own prediction at all."""
    torch.manual_seed(2)
    features, logits = torch.randn(5, 4), torch.randn(5, 6)
    base = bake_targets(features, logits, 1.0, 1.0)
    changed_logits = logits.clone()
    changed_logits[2] = torch.tensor([20.0, -5.0, 0.0, 3.0, -1.0, 7.0])
    changed = bake_targets(features, changed_logits, 1.0, 1.0)
    torch.testing.assert_close(changed[2], base[2])
    assert not torch.allclose(changed[0], base[0])  # the others do receive image 2's knowledge


def test_bake_targets_omega_one_and_zero_limits():
    """omega=1 gives A_hat P (eq. 5), omega=0 gives P unchanged (raw predictions, table 11)."""
    torch.manual_seed(3)
    features, logits = torch.randn(6, 3), torch.randn(6, 4)
    probs = torch.softmax(logits.double() / 3.0, dim=1)
    torch.testing.assert_close(bake_targets(features, logits, 1.0, 3.0).double(),
                               reference_affinity(features) @ probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bake_targets(features, logits, 0.0, 3.0).double(), probs, rtol=1e-5, atol=1e-6)


def test_bake_targets_carry_no_gradient():
    """The targets are constants: no autograd graph even when features and logits require grad."""
    features = torch.randn(4, 3, requires_grad=True)
    logits = torch.randn(4, 5, requires_grad=True)
    got = bake_targets(features * 2, logits * 2, 0.5, 4.0)
    assert not got.requires_grad
    assert got.grad_fn is None


@pytest.mark.parametrize('scale', [1.0, 30.0], ids=['moderate', 'peaked'])
def test_bake_targets_bf16_autocast(scale):
    """bf16 inputs under CPU bf16 autocast: float32 result, finite, equal to float32 on the same values."""
    torch.manual_seed(4)
    features = torch.randn(8, 16).bfloat16()
    logits = (scale * torch.randn(8, 5)).bfloat16()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = bake_targets(features, logits, 0.5, 4.0)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    expected = bake_targets(features.float(), logits.float(), 0.5, 4.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(8), rtol=0, atol=1e-5)


@pytest.mark.parametrize('n', [0, 1])
def test_bake_targets_need_two_images(n):
    """Fewer than two images cannot ensemble anything: ValueError."""
    with pytest.raises(ValueError):
        bake_targets(torch.randn(n, 4), torch.randn(n, 3), 0.5, 4.0)
