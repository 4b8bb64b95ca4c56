"""linear through every GEMM path of the compiled kernels: operand layouts read in place (row-major,
transposed, unaligned), tile edges, split-K (long K with small outputs), the CPU's small-layer path and its
limits, TF32, the fused activation epilogue and its dz/db pass, deterministic gradients.
Errors are measured against a float64 reference and may be at most twice torch's own, plus a floor of a few
roundings of each element's sum of |terms|."""
import pytest
import torch
import torch.nn.functional as F

import pyengine.functional as PF
from utils import COMPILED_DEVICES, TORCH_ACTIVATIONS, grads, make, on

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Floor of the error bound, relative to the sum of |terms| of each output element (its condition): a few
# roundings, far below what a wrong index or fragment gives (errors of the order of the condition itself).
FLOOR = {torch.float64: 1e-13, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# With TF32 allowed the products round both operands to 10 mantissa bits (2^-11 each): a few of those, whatever
# torch's own error (cuBLAS may pick an exact float32 kernel for small shapes, making torch's error float32-sized).
TF32_FLOOR = 8 * 2.0**-11

# (M, K, N): single elements, tile edges, K not a multiple of the vector width, long K (split-K for dW and
# for the bias-free forward), N = 1
SHAPES = [(1, 1, 1), (3, 5, 1), (129, 33, 130), (257, 40, 7), (2, 1030, 3), (1100, 24, 5)]
# The CPU's small-layer path (csrc/cpu/linear_small.h: widths <= 64, M * N * K <= 64K) and its edges: the notes'
# layer, widths around the float and double vector widths (16, 8), the work limit exactly and one row past it,
# a width one past 64
SHAPES += [(759, 8, 6), (40, 17, 33), (50, 31, 16), (3, 64, 1), (16, 64, 64), (17, 64, 64), (1000, 8, 8),
           (1001, 8, 8), (9, 65, 3), (7, 3, 65)]
# One output feature past the small path (csrc/cpu/linear_single_output.h): K a whole number of vectors and not,
# rows in several chunks of 256 and a part one, a long K
SHAPES += [(4100, 37, 1), (1100, 64, 1), (300, 1030, 1)]


def layout(t, kind):
    """The same values as t in another memory layout: contiguous, transposed storage, or 2 bytes off 16B."""
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "unaligned":
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        return buf[1:].view(t.shape).copy_(t)
    return t


def assert_error_like_torch(ours, theirs, ref64, cond64, floor=None):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    if ref64.numel() == 0:
        return
    err = (ours.double() - ref64).abs()
    torch_err = (theirs.double() - ref64).abs().max().item()
    bound = 2 * torch_err + (FLOOR[ours.dtype] if floor is None else floor) * cond64
    assert (err <= bound).all(), (err.max().item(), torch_err, (err - bound).max().item())


# Relative error of z from the inputs' rounding inside the GEMM (TF32 rounds them to 10 mantissa bits; the
# other paths multiply exactly and accumulate in float32 or better), times a margin.
KINK_MARGIN = {"tf32": 8 * 2.0**-11, "exact": 1e-5}


def away_from_relu_kink(x0, w0, b, margin):
    """Redraws rows of x0 until no z = x0 w0^T + b is within margin * (sum of |terms|) of 0: there relu's
    derivative jumps and a rounding of z may flip it, which no float64 reference can judge."""
    for _ in range(2000):
        b64 = b.detach().double() if b is not None else None
        z = F.linear(x0.double(), w0.double(), b64)
        cond = F.linear(x0.double().abs(), w0.double().abs(), b64.abs() if b64 is not None else None)
        near = (z.abs() <= margin * cond).any(1)
        if not near.any():
            return x0
        x0[near] = make((int(near.sum()), x0.shape[1]), x0.dtype, x0.device, low=-1, high=1)
    raise AssertionError("could not draw inputs away from relu's kink")


def check_linear(backend, device, dtype, m, k, n, x_kind, w_kind, bias, activation=None, kink_margin="exact"):
    x0 = make((m, k), dtype, device, low=-1, high=1)
    w0 = make((n, k), dtype, device, low=-1, high=1)
    b = make((n,), dtype, device, requires_grad=True, low=-1, high=1) if bias else None
    if activation == "relu":
        x0 = away_from_relu_kink(x0, w0, b, KINK_MARGIN[kink_margin])
    x = layout(x0, x_kind).requires_grad_()
    w = layout(w0, w_kind).requires_grad_()
    inputs = [x, w] + ([b] if bias else [])
    act = TORCH_ACTIVATIONS[activation]
    with on(backend):
        y = PF.linear(x, w, b, activation=activation)
        ours, gy = grads(y, inputs)
    y_torch = act(F.linear(x, w, b))
    theirs, _ = grads(y_torch, inputs, gy)
    ref, cond = [], []
    for absolute in (False, True):  # the float64 result, and the same sums over |terms| (condition numbers)
        f = (lambda t: t.detach().double().abs()) if absolute else (lambda t: t.detach().double())
        x64, w64 = f(x).requires_grad_(), f(w).requires_grad_()
        b64 = f(b).requires_grad_() if bias else None
        # the |terms| sums leave the activation out: |act'| <= 1 bounds its share, and y's own rounding is
        # covered by adding |y| to the output's condition
        y64 = F.linear(x64, w64, b64) if absolute else act(F.linear(x64, w64, b64))
        g64, _ = grads(y64, [x64, w64] + ([b64] if bias else []), f(gy))
        y_cond = y64.detach() + (ref[0].abs() if absolute and activation else 0)
        (cond if absolute else ref).extend([y_cond, *g64])
    floor = TF32_FLOOR if kink_margin == "tf32" and dtype == torch.float32 and device == "cuda" else None
    for t, t_torch, r, c in zip([y, *ours], [y_torch, *theirs], ref, cond):
        assert_error_like_torch(t, t_torch, r, c, floor)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
@pytest.mark.parametrize("x_kind,w_kind", [("contiguous", "contiguous"), ("transposed", "transposed"),
                                           ("unaligned", "transposed"), ("transposed", "unaligned")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])  # no bias: the forward may split K too
def test_layouts_and_sizes(backend, device, dtype, m, k, n, x_kind, w_kind, bias):
    check_linear(backend, device, dtype, m, k, n, x_kind, w_kind, bias)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES, ids=str)
@pytest.mark.parametrize("x_kind,w_kind", [("contiguous", "contiguous"), ("unaligned", "transposed")])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])  # no bias and an activation: no split-K
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_activation_epilogue(backend, device, dtype, m, k, n, x_kind, w_kind, bias, activation):
    check_linear(backend, device, dtype, m, k, n, x_kind, w_kind, bias, activation)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("m,k,n", [(129, 33, 130), (1100, 24, 5), (2, 1030, 3)], ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_tf32_when_allowed(backend, device, m, k, n, activation):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_linear(backend, device, torch.float32, m, k, n, "contiguous", "contiguous", bias=True,
                     activation=activation, kink_margin="tf32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_gradients_are_deterministic(backend, device, dtype, activation):
    x = make((3000, 20), dtype, device, requires_grad=True)
    w = make((6, 20), dtype, device, requires_grad=True)
    b = make((6,), dtype, device, requires_grad=True)
    gy = torch.randn(3000, 6, dtype=dtype, device=device)
    with on(backend):
        first = torch.autograd.grad(PF.linear(x, w, b, activation=activation), [x, w, b], gy)
        second = torch.autograd.grad(PF.linear(x, w, b, activation=activation), [x, w, b], gy)
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)
