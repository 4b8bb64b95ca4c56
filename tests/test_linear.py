import math

import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from pyengine import _backend
from utils import (BACKEND_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close, assert_raises_like,
                   grads, make, mkldnn_enabled, on, product_magnitudes)

# (x shape, out_features): batch dims of every rank, 1-D input, empty batch, K = 0, N = 1, vector tails
SHAPES = [((5, 3), 4), ((1, 1), 1), ((7,), 3), ((2, 3, 17), 9), ((2, 2, 2, 8), 5), ((0, 6), 4), ((4, 0), 3),
          ((33, 65), 1), ((130, 70), 257)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("x_shape,n", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_backward_match_torch(backend, device, dtype, x_shape, n, bias):
    check_against_torch(backend, device, dtype, x_shape, n, bias, activation=None)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("strided", ["", "x", "weight", "bias"])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_float32_products_through_onednn_and_blas(backend, device, onednn, strided, activation):
    # from 8M multiply-adds the CPU's float32 forward is oneDNN's linear while torch.backends.mkldnn is on, BLAS
    # otherwise (cpu/onednn_linear.h): both against torch, with strided operands
    x = make((257, 130), torch.float32, device, requires_grad=True, noncontiguous="x" == strided)
    w = make((260, 130), torch.float32, device, requires_grad=True, noncontiguous="weight" == strided)
    b = make((260,), torch.float32, device, requires_grad=True, noncontiguous="bias" == strided)
    with mkldnn_enabled(onednn), on(backend):
        y = PF.linear(x, w, b, activation=activation)
        ours, gy = grads(y, [x, w, b])
    y_ref = F.linear(x, w, b) if activation is None else torch_linear_act(x, w, b, activation)
    ref, _ = grads(y_ref, [x, w, b], gy)
    assert_close(y, y_ref)
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


def check_against_torch(backend, device, dtype, x_shape, n, bias, activation):
    """PF.linear(..., activation=activation) and its gradients against torch's F.linear (then the activation)."""
    k = x_shape[-1]
    x = make(x_shape, dtype, device, requires_grad=True)
    w = make((n, k), dtype, device, requires_grad=True)
    b = make((n,), dtype, device, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    with on(backend):
        y = PF.linear(x, w, b, activation=activation)
        ours, gy = grads(y, inputs)
    y_ref = F.linear(x, w, b) if activation is None else torch_linear_act(x, w, b, activation)
    ref, _ = grads(y_ref, inputs, gy)
    assert_close(y, y_ref)
    # each gradient is a sum over rows or features that can cancel far below its terms (the bias gradient of one
    # output summed 33 sigmoid terms to 0.007 in a CI run): atol scales with the largest sum of |terms|
    rows = math.prod(x_shape[:-1])
    _, ((m_w, m_b),), m_x = product_magnitudes(x.reshape(rows, k), [(w, b, activation)], gy.reshape(rows, n))
    for g, g_ref, m in zip(ours, ref, [m_x, m_w, m_b]):
        assert_close(g, g_ref, scale=float(m.max()) if m.numel() else 0.0)


# (K, N) at 37 rows: the CPU's small-layer path, one output feature (K past the small path), and the BLAS one.
# There PYENGINE_HALF_GEMM=on takes oneDNN's fused linear where the CPU multiplies the dtype natively, and the bias
# rows, a GEMM in the dtype and the activation pass elsewhere; off, the products in float32 on widened copies.
HALF_SHAPES = [(48, 19), (65, 130), (1030, 1)]
HALF_GEMM = ["on", "off"]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("k,n", HALF_SHAPES, ids=str)
@pytest.mark.parametrize("half_gemm", HALF_GEMM)
# strided views of the operands named (oneDNN's linear once read a strided bias beside a contiguous weight as if
# it were contiguous)
@pytest.mark.parametrize("strided", ["", "bias", "x,weight"], ids=["contiguous", "bias", "x,weight"])
def test_half_precision_error_within_twice_torch(backend, device, dtype, k, n, half_gemm, strided, monkeypatch):
    monkeypatch.setenv("PYENGINE_HALF_GEMM", half_gemm)
    x = make((37, k), dtype, device, requires_grad=True, low=-1, high=1, noncontiguous="x" in strided)
    w = make((n, k), dtype, device, requires_grad=True, low=-1, high=1, noncontiguous="weight" in strided)
    b = make((n,), dtype, device, requires_grad=True, low=-1, high=1, noncontiguous="bias" in strided)
    with on(backend):
        ours, gy = grads(PF.linear(x, w, b), [x, w, b])
        y = PF.linear(x, w, b)
    theirs, _ = grads(F.linear(x, w, b), [x, w, b], gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    ref, _ = grads(y64, [x64, w64, b64], gy.double())
    m_y, [(m_w, m_b)], m_x = product_magnitudes(x, [(w, b, None)], gy)
    assert_half_close(y, F.linear(x, w, b), y64, m_y)
    for g, g_torch, g64, m in zip(ours, theirs, ref, (m_x, m_w, m_b)):
        assert_half_close(g, g_torch, g64, m)


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


BAD_INPUTS = {  # (args, kwargs, torch's key phrase)
    "shapes": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 6, device=d)), {},
                         r"mat1 and mat2 shapes cannot be multiplied \(3x4 and 6x5\)"),
    "dtypes": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 4, dtype=torch.float64, device=d)), {},
                         "have the same dtype"),
    "0-dim input": lambda d: ((torch.tensor(1.0, device=d), torch.rand(3, 1, device=d)), {},
                              "both arguments to linear need to be at least 1D, but they are 0D and 2D"),
    "3-D weight": lambda d: ((torch.rand(3, 4, device=d), torch.rand(2, 5, 4, device=d)), {},
                             "expects a tensor with <= 2 dimensions, but self is 3D"),
    "bias length": lambda d: ((torch.rand(3, 4, device=d), torch.rand(5, 4, device=d), torch.rand(4, device=d)), {},
                              r"The expanded size of the tensor \(5\) must match the existing size \(4\)"),
    "1-D weight with bias": lambda d: ((torch.rand(3, 4, device=d), torch.rand(4, device=d), torch.rand(1, device=d)),
                                       {}, "mat2 must be a matrix, got 1-D tensor"),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_raises_like_torch(backend, device, case):
    args, kwargs, phrase = BAD_INPUTS[case](device)
    with on(backend):
        assert_raises_like(lambda: F.linear(*args, **kwargs), lambda: PF.linear(*args, **kwargs), phrase)


# linear with a fused activation, against torch's unfused composition
ACTS = {"relu": F.relu, "sigmoid": torch.sigmoid}
# leading dims, 1-D input, empty batch, K = 0 (z = b exactly: relu's kink at 0 when b is absent), vector tails,
# and more than one 128-row block and 512-column block of the fused CPU backward pass
ACT_SHAPES = [((5, 3), 4), ((7,), 3), ((2, 3, 17), 9), ((0, 6), 4), ((4, 0), 3), ((33, 65), 1), ((300, 20), 530)]


def torch_linear_act(x, w, b, activation):
    return ACTS[activation](F.linear(x, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("x_shape,n", ACT_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ACTS)
def test_activation_matches_torch_composition(backend, device, dtype, x_shape, n, bias, activation):
    check_against_torch(backend, device, dtype, x_shape, n, bias, activation)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("k,n", HALF_SHAPES, ids=str)
@pytest.mark.parametrize("half_gemm", HALF_GEMM)
def test_activation_half_precision_error_within_twice_torch(backend, device, dtype, activation, k, n, half_gemm,
                                                            monkeypatch):
    monkeypatch.setenv("PYENGINE_HALF_GEMM", half_gemm)
    x = make((37, k), dtype, device, low=-1, high=1)
    w = make((n, k), dtype, device, requires_grad=True, low=-1, high=1)
    b = make((n,), dtype, device, requires_grad=True, low=-1, high=1)
    # relu's derivative jumps at 0: where a rounding of z can flip its sign, the float64 reference says nothing
    # about a half result's error. Rows of x are redrawn until every |z| is well above those roundings.
    for _ in range(1000):
        near_kink = (F.linear(x.double(), w.detach().double(), b.detach().double()).abs() < 0.1).any(1)
        if not near_kink.any():
            break
        x[near_kink] = make((int(near_kink.sum()), k), dtype, device, low=-1, high=1)
    x.requires_grad_()
    with on(backend):
        y = PF.linear(x, w, b, activation=activation)
        ours, gy = grads(y, [x, w, b])
    y_torch = torch_linear_act(x, w, b, activation)
    theirs, _ = grads(y_torch, [x, w, b], gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = torch_linear_act(x64, w64, b64, activation)
    ref, _ = grads(y64, [x64, w64, b64], gy.double())
    m_y, [(m_w, m_b)], m_x = product_magnitudes(x, [(w, b, activation)], gy)
    assert_half_close(y, y_torch, y64, m_y)
    for g, g_torch, g64, m in zip(ours, theirs, ref, (m_x, m_w, m_b)):
        assert_half_close(g, g_torch, g64, m)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ACTS)
def test_activation_gradcheck(backend, device, bias, activation):
    # away from relu's kink: |z| stays well above gradcheck's step
    x = make((3, 2, 5), torch.float64, device, requires_grad=True)
    w = make((4, 5), torch.float64, device, requires_grad=True)
    b = make((4,), torch.float64, device, requires_grad=True) if bias else None
    with on(backend):
        assert torch.autograd.gradcheck(lambda *a: PF.linear(*a, activation=activation), (x, w, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("activation", ACTS)
def test_activation_noncontiguous_operands_and_grad(backend, device, activation):
    x = make((9, 12), torch.float32, device, requires_grad=True)
    w = make((7, 12), torch.float32, device, requires_grad=True)
    b = make((14,), torch.float32, device, requires_grad=True)
    xv, wv, bv = x.t().t()[:, ::2], w[:, ::2], b[::2]
    with on(backend):
        y = PF.linear(xv, wv, bv, activation=activation)
        gy = torch.randn(7, 9, device=device).t()  # a transposed incoming gradient
        ours = torch.autograd.grad(y, [x, w, b], gy)
    ref = torch.autograd.grad(torch_linear_act(xv, wv, bv, activation), [x, w, b], gy)
    assert_close(y, torch_linear_act(xv, wv, bv, activation))
    for g, g_ref in zip(ours, ref):
        assert_close(g, g_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_relu_nan_and_only_needed_gradients(backend, device):
    x = make((4, 3), torch.float32, device)
    x[1, 2] = float("nan")  # a NaN output row: relu keeps NaN and passes its gradient on, as torch
    w = make((5, 3), torch.float32, device, requires_grad=True)
    with on(backend):
        y = PF.linear(x, w, activation="relu")
        (gw,), gy = grads(y, [w])
    y_ref = F.relu(F.linear(x, w))
    (gw_ref,), _ = grads(y_ref, [w], gy)
    assert_close(y, y_ref)
    assert_close(gw, gw_ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_activation_none_is_plain_linear_and_1d_weight(backend, device):
    x = make((3, 4), torch.float64, device)
    w = make((5, 4), torch.float64, device)
    w1 = make((4,), torch.float64, device)
    with on(backend):
        assert_close(PF.linear(x, w, activation=None), F.linear(x, w))
        assert_close(PF.linear(x, w1, activation="sigmoid"), torch.sigmoid(F.linear(x, w1)))
    xi, wi = torch.randint(-3, 4, (3, 4)), torch.randint(-3, 4, (5, 4))
    torch.testing.assert_close(PF.linear(xi, wi, activation="relu"), F.relu(F.linear(xi, wi)))
    torch.testing.assert_close(PF.linear(xi, wi, activation="sigmoid"), torch.sigmoid(F.linear(xi, wi)))


@pytest.mark.parametrize("activation", ["tanh", "ReLU", "", 1, ["relu"]], ids=repr)
def test_bad_activation_raises_value_error_listing_choices(activation):
    x, w = torch.rand(3, 4), torch.rand(5, 4)
    with pytest.raises(ValueError, match="choose one of None, 'relu', 'sigmoid'"):
        PF.linear(x, w, activation=activation)
    with pytest.raises(ValueError, match="choose one of"):
        pnn.Linear(4, 5, activation=activation)


@pytest.mark.skipif("cpp" not in pyengine.available_backends(), reason="pyengine._C is not built")
def test_kernel_contract_checks_activation_and_saved_output():
    x, w, gy = torch.rand(3, 4), torch.rand(5, 4), torch.rand(3, 5)
    with pytest.raises(ValueError, match="activation must be"):
        _backend._C.linear_forward(x, w, None, 3)
    with pytest.raises(RuntimeError, match="needs the saved y"):
        _backend._C.linear_backward(gy, x, w, True, True, False, 1)
    with pytest.raises(RuntimeError, match="shape"):
        _backend._C.linear_backward(gy, x, w, True, True, False, 2, torch.rand(5, 3))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("activation", [None, *ACTS])
def test_nn_linear_activation(backend, device, activation):
    ours = pnn.Linear(6, 4, activation=activation, device=device, dtype=torch.float64)
    theirs = torch.nn.Linear(6, 4, device=device, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.activation == activation
    assert repr(ours).endswith("bias=True)" if activation is None else f"activation={activation!r})")
    x = make((3, 6), torch.float64, device)
    with on(backend):
        y = ours(x)
    assert_close(y, theirs(x) if activation is None else ACTS[activation](theirs(x)))
    converted = pnn.convert(torch.nn.Linear(6, 4))  # swapped in without our __init__: no activation
    assert converted.activation is None and repr(converted) == repr(torch.nn.Linear(6, 4))
