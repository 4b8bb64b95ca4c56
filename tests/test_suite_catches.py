"""The suite's own checks reject known-wrong results. Each test feeds one wrong result (or a wrong op) to the
helper that the op tests rely on and asserts that the helper fails: a check that cannot fail is a defect.
Every wrong result here once passed (see the history of tests/utils.py and tests/test_hypothesis.py)."""
import pytest
import torch
import torch.nn.functional as F

import test_hypothesis
from utils import (MAX_GROWTH_PER_CALL, assert_close, assert_half_close, assert_raises_like, memory_growth_per_call,
                   product_magnitudes, relu_kink_slack)


def _rejected(check, *args, **kwargs):
    with pytest.raises(AssertionError):
        check(*args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_close_rejects_an_infinity_where_the_result_is_finite(dtype):
    expected = torch.tensor([2.0, 1.0], dtype=torch.float64)
    torch_result = expected.to(dtype)
    _rejected(assert_half_close, torch.tensor([float("inf"), 1.0], dtype=dtype), torch_result, expected)
    _rejected(assert_half_close, torch.tensor([float("nan"), 1.0], dtype=dtype), torch_result, expected)


def test_half_close_rejects_a_finite_value_where_the_result_overflows():
    expected = torch.tensor([1e6, 1.0], dtype=torch.float64)  # past float16's largest, 65504
    torch_result = expected.to(torch.float16)
    assert torch_result[0].isinf()
    assert_half_close(torch_result.clone(), torch_result, expected)
    _rejected(assert_half_close, torch.tensor([65504.0, 1.0], dtype=torch.float16), torch_result, expected)


def test_half_close_bound_stays_finite_when_the_reference_holds_an_infinity():
    expected = torch.tensor([float("inf"), 2.0, 1.0], dtype=torch.float64)
    torch_result = expected.to(torch.bfloat16)
    _rejected(assert_half_close, torch.tensor([float("inf"), 7.0, 1.0], dtype=torch.bfloat16), torch_result, expected)
    _rejected(assert_half_close, torch.tensor([float("-inf"), 2.0, 1.0], dtype=torch.bfloat16), torch_result,
              expected)


def test_half_close_rejects_small_sigmoid_outputs_set_to_zero():
    """bfloat16 sigmoid with every output below 0.011 (x < -4.5, about a fifth of the inputs) zeroed: far below the
    largest output, but each element's own error is 100%."""
    x = torch.empty(4001, dtype=torch.bfloat16).uniform_(-8, 8)
    exact = torch.sigmoid(x.double())
    wrong = torch.sigmoid(x)
    wrong[wrong < 0.011] = 0
    assert_half_close(torch.sigmoid(x), torch.sigmoid(x), exact)
    _rejected(assert_half_close, wrong, torch.sigmoid(x), exact)


def test_half_close_with_magnitudes_still_rejects_a_wrong_product():
    """The magnitudes a matrix product's rounding scales with (|x| @ |W|^T) loosen nothing that is wrong: a product
    off by one term is caught."""
    x = torch.empty(37, 48, dtype=torch.bfloat16).uniform_(-1, 1)
    w = torch.empty(19, 48, dtype=torch.bfloat16).uniform_(-1, 1)
    exact = x.double() @ w.double().T
    m_y, _, _ = product_magnitudes(x, [(w, None, None)], torch.ones(37, 19))
    right = F.linear(x, w)
    assert_half_close(right, right, exact, m_y)
    wrong = (x[:, 1:].float() @ w[:, 1:].float().T).to(torch.bfloat16)  # one of 48 terms left out
    _rejected(assert_half_close, wrong, right, exact, m_y)


def _relu_gradient(x, w0, b0, w1, gy, flip):
    """x's gradient through relu(x @ w0^T + b0) @ w1^T in float64, relu's derivative flipped at the (row, unit)
    pairs in `flip`."""
    z = x.double() @ w0.double().T + b0.double()
    mask = (z > 0).double()
    for i, j in flip:
        mask[i, j] = 1 - mask[i, j]
    return ((gy.double() @ w1.double()) * mask) @ w0.double()


def test_half_close_relu_kink_slack_forgives_only_a_unit_at_its_kink():
    """A float16 input gradient with relu's derivative flipped at one hidden unit: where the unit's float64 input
    is 6e-5 of its terms from 0 (within rounding of the kink), relu_kink_slack lets it pass, and without the slack
    it is rejected; the same flip at a unit clear of its kink is rejected with the slack too."""
    x = torch.tensor([[1.0, -1.0], [0.75, 0.25]], dtype=torch.float16)
    w0 = torch.tensor([[0.5, 0.5], [0.25, -0.5], [-0.5, 1.0]], dtype=torch.float16)
    b0 = torch.tensor([2.0**-14, 0.125, 0.25], dtype=torch.float16)  # unit 0 of row 0: z = 2^-14, terms of 1
    w1, gy = torch.tensor([[1.0, -0.5, 0.75]], dtype=torch.float16), torch.ones(2, 1, dtype=torch.float16)
    layers = [(w0, b0, "relu"), (w1, None, None)]
    exact = _relu_gradient(x, w0, b0, w1, gy, [])
    right = exact.to(torch.float16)
    _, _, m_x = product_magnitudes(x, layers, gy)
    _, s_x = relu_kink_slack(x, layers, gy)
    at_kink, clear = _relu_gradient(x, w0, b0, w1, gy, [(0, 0)]), _relu_gradient(x, w0, b0, w1, gy, [(1, 1)])
    assert_half_close(at_kink.to(torch.float16), right, exact, m_x, s_x)
    _rejected(assert_half_close, at_kink.to(torch.float16), right, exact, m_x)
    _rejected(assert_half_close, clear.to(torch.float16), right, exact, m_x, s_x)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_close_rejects_a_wrong_mean_reduced_float32_gradient(loss):
    """A mean over 50,001 elements makes every gradient element about 1e-5 to 1e-4: an absolute atol of 1e-5
    passed an all-zero, a halved and a 10%-off gradient. The scaled atol rejects each."""
    x = torch.empty(50001).uniform_(-3, 3).requires_grad_()
    y = torch.empty(50001).uniform_(0, 1)
    fn = F.mse_loss if loss == "mse" else F.binary_cross_entropy_with_logits
    (grad,) = torch.autograd.grad(fn(x, y), x)
    assert_close(grad.clone(), grad)
    for wrong in (torch.zeros_like(grad), grad / 2, grad * 1.1):
        _rejected(assert_close, wrong, grad)


def test_raises_like_rejects_an_unrelated_error_of_the_same_type():
    """torch raises RuntimeError for shapes that do not broadcast; a RuntimeError about something else (the
    wrong device for a backend, say) is not the same error."""
    x, y = torch.rand(2, 3), torch.rand(4)

    def unrelated():
        raise RuntimeError("pyengine backend 'cuda' runs on cuda tensors")

    phrase = r"size of tensor a \(3\) must match the size of tensor b \(4\)"
    assert_raises_like(lambda: torch.add(x, y), lambda: torch.add(x, y), phrase)
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        assert_raises_like(lambda: torch.add(x, y), unrelated, phrase)
    with pytest.raises(AssertionError, match="no longer says"):  # a phrase torch's own message lacks
        assert_raises_like(lambda: torch.add(x, y), unrelated, "runs on cuda tensors")


def test_memory_growth_catches_one_kept_output_per_call():
    kept = []
    x = torch.randn(16, 8)

    def leaking():
        kept.append(torch.sigmoid(x))

    def clean():
        torch.sigmoid(x)

    assert memory_growth_per_call(clean) < MAX_GROWTH_PER_CALL
    assert memory_growth_per_call(leaking) >= MAX_GROWTH_PER_CALL


@pytest.mark.parametrize("layout", ["strided", "expanded", "transposed"])
def test_hypothesis_views_reach_the_op_and_a_stride_blind_op_fails(layout):
    """The property tests hand the op the view itself (strides (2,) of a slice, 0 of an expand), not a contiguous
    copy, so an op that reads memory as if it were contiguous gives wrong values and fails the comparison."""
    shape = (5, 6)
    base = torch.rand(5, 12 if layout == "strided" else 6, dtype=torch.float64)
    views = {"strided": lambda t: t[..., ::2], "expanded": lambda t: t[:1].expand(shape),
             "transposed": lambda t: t.reshape(6, 5).transpose(0, 1)}
    drawn = test_hypothesis.Drawn(base, views[layout], layout)
    seen = []

    def stride_blind(t):
        seen.append(t.stride())
        return torch.sigmoid(t.as_strided(t.shape, (t.shape[1], 1)))  # the first numel elements of its memory

    with pytest.raises(AssertionError):
        test_hypothesis._compare("python", "cpu", stride_blind, torch.sigmoid, [drawn], torch.float64)
    assert seen and seen[0] != (6, 1), f"the op saw a contiguous tensor, strides {seen[0]}"
    test_hypothesis._compare("python", "cpu", torch.sigmoid, torch.sigmoid, [drawn], torch.float64)
