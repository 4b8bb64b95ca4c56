import pytest
import torch
import torch.nn.functional as F

import pyengine.functional as PF
from utils import (BACKEND_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close, assert_raises_like,
                   grads, make, on)

# (x shape, out_features): batch dims of every rank, 1-D input, empty batch, K = 0, N = 1, vector tails
SHAPES = [((5, 3), 4), ((1, 1), 1), ((7,), 3), ((2, 3, 17), 9), ((2, 2, 2, 8), 5), ((0, 6), 4), ((4, 0), 3),
          ((33, 65), 1), ((130, 70), 257)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("x_shape,n", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_match_torch(backend, device, dtype, x_shape, n, bias):
    k = x_shape[-1]
    x = make(x_shape, dtype, device, requires_grad=True)
    w = make((n, k), dtype, device, requires_grad=True)
    b = make((n,), dtype, device, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    with on(backend):
        y = PF.linear(x, w, b)
        ours, gy = grads(y, inputs)
    y_ref = F.linear(x, w, b)
    ref, _ = grads(y_ref, inputs, gy)
    assert_close(y, y_ref)
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_error_within_twice_torch(backend, device, dtype):
    x = make((37, 48), dtype, device, requires_grad=True, low=-1, high=1)
    w = make((19, 48), dtype, device, requires_grad=True, low=-1, high=1)
    b = make((19,), dtype, device, requires_grad=True, low=-1, high=1)
    with on(backend):
        ours, gy = grads(PF.linear(x, w, b), [x, w, b])
        y = PF.linear(x, w, b)
    theirs, _ = grads(F.linear(x, w, b), [x, w, b], gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    ref, _ = grads(y64, [x64, w64, b64], gy.double())
    assert_half_close(y, F.linear(x, w, b), y64)
    for g, g_torch, g64 in zip(ours, theirs, ref):
        assert_half_close(g, g_torch, g64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(backend, device, bias):
    x = make((3, 2, 5), torch.float64, device, requires_grad=True)
    w = make((4, 5), torch.float64, device, requires_grad=True)
    b = make((4,), torch.float64, device, requires_grad=True) if bias else None
    with on(backend):
        assert torch.autograd.gradcheck(PF.linear, (x, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_operands(backend, device):
    x = make((9, 12), torch.float32, device, requires_grad=True)
    w = make((7, 12), torch.float32, device, requires_grad=True)
    b = make((14,), torch.float32, device, requires_grad=True)
    for xv, wv, bv in [(x.t().t()[:, ::2], w[:, ::2], b[::2]), (x.t().contiguous().t(), w.t().contiguous().t(), b[:7])]:
        with on(backend):
            y = PF.linear(xv, wv, bv)
            ours, gy = grads(y, [x, w, b])
        ref, _ = grads(F.linear(xv, wv, bv), [x, w, b], gy)
        assert_close(y, F.linear(xv, wv, bv))
        for g, g_ref in zip(ours, ref):
            assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_weight_1d_and_scalar_bias_like_torch(backend, device):
    x = make((3, 4), torch.float64, device, requires_grad=True)
    w1 = make((4,), torch.float64, device, requires_grad=True)
    w = make((5, 4), torch.float64, device, requires_grad=True)
    b1 = make((1,), torch.float64, device, requires_grad=True)
    with on(backend):
        assert_close(PF.linear(x, w1), F.linear(x, w1))
        assert_close(PF.linear(x[0], w1), F.linear(x[0], w1))
        y = PF.linear(x, w, b1)
        ours, gy = grads(y, [x, w, b1])
    ref, _ = grads(F.linear(x, w, b1), [x, w, b1], gy)
    assert_close(y, F.linear(x, w, b1))
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_integer_matmul_like_torch(backend, device):
    x = torch.randint(-3, 4, (3, 4), device=device)
    w = torch.randint(-3, 4, (5, 4), device=device)
    if device == "cuda":
        pytest.skip("torch has no integer matmul on CUDA")
    with on(backend):
        torch.testing.assert_close(PF.linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_accumulates_and_retain_graph(backend, device):
    x = make((6, 8), torch.float64, device)
    w = make((3, 8), torch.float64, device, requires_grad=True)
    b = make((3,), torch.float64, device, requires_grad=True)
    with on(backend):
        loss = PF.linear(x, w, b).pow(2).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x, w_ref, b_ref).pow(2).sum().backward()
    assert_close(w.grad, 2 * w_ref.grad)
    assert_close(b.grad, 2 * b_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_only_needed_gradients_are_computed(backend, device):
    x = make((4, 3), torch.float32, device)  # no grad for x
    w = make((2, 3), torch.float32, device, requires_grad=True)
    with on(backend):
        PF.linear(x, w, make((2,), torch.float32, device)).sum().backward()
    assert x.grad is None
    assert_close(w.grad, torch.ones(4, 2, device=device).t() @ x)


BAD_INPUTS = {
    "shapes": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 6, device=d)), {}),
    "dtypes": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 4, dtype=torch.float64, device=d)), {}),
    "0-dim input": lambda d: ((torch.tensor(1.0, device=d), torch.rand(3, 1, device=d)), {}),
    "3-D weight": lambda d: ((torch.rand(3, 4, device=d), torch.rand(2, 5, 4, device=d)), {}),
    "bias length": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 4, device=d), torch.rand(4, device=d)), {}),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_raises_like_torch(backend, device, case):
    args, kwargs = BAD_INPUTS[case](device)
    with on(backend):
        assert_raises_like(lambda: F.linear(*args, **kwargs), lambda: PF.linear(*args, **kwargs))
