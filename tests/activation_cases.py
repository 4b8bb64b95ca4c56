"""The tests every elementwise activation shares. test_relu.py and test_sigmoid.py import them and define
the `activation` fixture: (pyengine function, torch function)."""
import pytest
import torch

from utils import (BACKEND_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close, grads, magnitude,
                   make, on, output_gradient_magnitude)

SLOPE_BOUND = 1.5  # the largest |derivative| of relu, sigmoid, tanh and of the leaky_relu slopes tested
SHAPES = [(), (0,), (1,), (7,), (17,), (3, 33), (2, 0, 5), (5, 4, 3, 2), (70001,)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_torch(activation, backend, device, dtype, shape):
    ours_fn, torch_fn = activation
    x = make(shape, dtype, device, requires_grad=True, low=-6, high=6)
    with on(backend):
        y = ours_fn(x)
        (gx,), gy = grads(y, [x])
    y_ref = torch_fn(x)
    (gx_ref,), _ = grads(y_ref, [x], gy)
    assert_close(y, y_ref)
    # the derivatives are at most 1 (leaky_relu: its slope) and computed from the output: tanh's 1 - y^2
    # cancels near saturation, where it is 0 up to the rounding of terms of size 1
    assert_close(gx, gx_ref, scale=magnitude(gy) * SLOPE_BOUND)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(7,), (129,), (40001,)], ids=str)
def test_half_precision_error_within_twice_torch(activation, backend, device, dtype, shape):
    ours_fn, torch_fn = activation
    x = make(shape, dtype, device, requires_grad=True, low=-8, high=8)
    x64 = x.detach().double().requires_grad_()
    with on(backend):
        y = ours_fn(x)
        (gx,), gy = grads(y, [x])
    y_torch = torch_fn(x)
    (gx_torch,), _ = grads(y_torch, [x], gy)
    y64 = torch_fn(x64)
    (gx64,), _ = grads(y64, [x64], gy.double())
    assert_half_close(y, y_torch, y64)
    assert_half_close(gx, gx_torch, gx64, output_gradient_magnitude(getattr(torch_fn, "__name__", None), y64, gy))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck(activation, backend, device):
    ours_fn, _ = activation
    x = make((4, 9), torch.float64, device, requires_grad=True)
    x = x + (x.detach().abs() < 1e-3) * 0.1  # keep clear of relu's kink at 0, where no derivative exists
    with on(backend):
        assert torch.autograd.gradcheck(ours_fn, (x.detach().requires_grad_(),))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
def test_special_values_match_torch(activation, backend, device, dtype):
    ours_fn, torch_fn = activation
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30, 88.7, -88.7, 1e-30, -1e-30]
    x = torch.tensor(vals * 3, dtype=dtype, device=device).requires_grad_()  # 33 values: vector body and tail
    with on(backend):
        y = ours_fn(x)
        (gx,), gy = grads(y, [x], torch.ones_like(x))
    y_ref = torch_fn(x)
    (gx_ref,), _ = grads(y_ref, [x], gy)
    torch.testing.assert_close(y, y_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_input(activation, backend, device):
    ours_fn, torch_fn = activation
    base = make((33, 20), torch.float32, device, requires_grad=True)
    for view in (base.t(), base[::2, 1::3], base.unsqueeze(0).expand(3, 33, 20)):
        with on(backend):
            y = ours_fn(view)
            (g,), gy = grads(y, [base])
        (g_ref,), _ = grads(torch_fn(view), [base], gy)
        assert_close(y, torch_fn(view))
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_accumulates_and_retain_graph(activation, backend, device):
    """The origin notes: .grad sums over backward calls until zeroed; retain_graph keeps the saved output."""
    ours_fn, torch_fn = activation
    x = make((5, 6), torch.float64, device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with on(backend):
        y = ours_fn(x).sum()
    y.backward(retain_graph=True)
    y.backward()
    torch_fn(x_ref).sum().backward()
    assert_close(x.grad, 2 * x_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_integer_input_like_torch(activation, backend, device):
    ours_fn, torch_fn = activation
    x = torch.randint(-5, 6, (4, 7), device=device)
    with on(backend):
        y = ours_fn(x)
    expected = torch_fn(x)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected)
