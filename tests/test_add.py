import pytest
import torch

import pyengine.functional as PF
from utils import (BACKEND_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close, assert_raises_like,
                   grads, magnitude, make, on)

# (input shape, other shape): same shape, row bias, column, 0-dim, missing leading dims, both sides broadcast,
# 0-size dims, 9 dims, vector tails and multi-chunk sizes
SHAPES = [((4, 5), (4, 5)), ((37,), (37,)), ((70001,), (70001,)), ((33, 65), (65,)), ((300, 257), (257,)),
          ((33, 65), (33, 1)), ((), (7, 3)), ((7, 3), ()), ((), ()), ((2, 3, 17), (17,)), ((3, 1, 5), (4, 1)),
          ((1, 6), (5, 1)), ((0, 3), (3,)), ((4, 0), (1,)), ((2, 0, 3), (1, 3)),
          ((2, 1, 3, 1, 2, 1, 3, 1, 2), (1, 3, 1, 2, 1, 3, 1, 2, 1)), ((5, 1, 70), (5, 40, 1)),
          ((2, 3, 4, 5), (3, 1, 1)), ((40000, 3), (1, 3))]
INT_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.int8, torch.bool]
IDS = [f"{a}+{b}" for a, b in SHAPES]


def make_values(shape, dtype, device, requires_grad=False):
    if dtype == torch.bool:
        return torch.rand(shape, device=device) < 0.5
    if not dtype.is_floating_point:
        low = 0 if dtype == torch.uint8 else -100
        return torch.randint(low, 100, shape, dtype=dtype, device=device)
    return make(shape, dtype, device, requires_grad=requires_grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shapes", SHAPES, ids=IDS)
@pytest.mark.parametrize("alpha", [1, 2.5, -1])
def test_forward_backward_match_torch(backend, device, dtype, shapes, alpha):
    a = make(shapes[0], dtype, device, requires_grad=True)
    b = make(shapes[1], dtype, device, requires_grad=True)
    # float32: a gradient of multiples of 1/16 sums exactly in any order, so the sums compare at 1e-5 too
    out_shape = torch.broadcast_shapes(shapes[0], shapes[1])
    g = torch.randn(out_shape, dtype=dtype, device=device)
    if dtype == torch.float32:
        g = torch.randint(-64, 64, out_shape, device=device).to(dtype) / 16
    with on(backend):
        out = PF.add(a, b, alpha=alpha)
        ours, _ = grads(out, [a, b], g)
    ref = torch.add(a, b, alpha=alpha)
    theirs, _ = grads(ref, [a, b], g)
    assert_close(out, ref)
    assert out.is_contiguous()
    for x, y in zip(ours, theirs):
        assert_close(x, y)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("shapes", SHAPES, ids=IDS)
def test_integer_and_bool_exact(backend, device, dtype, shapes):
    a, b = make_values(shapes[0], dtype, device), make_values(shapes[1], dtype, device)
    for alpha in ([True, False, 1, 0] if dtype == torch.bool else [1, 3, -1]):
        with on(backend):
            out = PF.add(a, b, alpha=alpha)
        ref = torch.add(a, b, alpha=alpha)
        assert out.dtype == ref.dtype and torch.equal(out, ref), alpha


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shapes", [((257, 33), (33,)), ((5, 70), (5, 1)), ((300,), ()), ((4, 1, 9), (3, 1))], ids=str)
@pytest.mark.parametrize("alpha", [1, 2.5])
def test_half_precision_error_within_twice_torch(backend, device, dtype, shapes, alpha):
    a = make(shapes[0], dtype, device, requires_grad=True, low=-1, high=1)
    b = make(shapes[1], dtype, device, requires_grad=True, low=-1, high=1)
    with on(backend):
        out = PF.add(a, b, alpha=alpha)
        ours, g = grads(out, [a, b])
    ref = torch.add(a, b, alpha=alpha)
    theirs, _ = grads(ref, [a, b], g)
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    ref64 = torch.add(a64, b64, alpha=alpha)
    exact, _ = grads(ref64, [a64, b64], g.double())
    assert_half_close(out, ref, ref64)
    for x, y, z in zip(ours, theirs, exact):
        assert_half_close(x, y, z)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_transposed_expanded(backend, device):
    base = make((9, 12), torch.float64, device, requires_grad=True)
    col = make((9, 1), torch.float64, device, requires_grad=True)
    row = make((12,), torch.float64, device, requires_grad=True)
    cases = [(base.t(), row[:9]), (base[:, ::2], col), (base.t(), col.t()), (col.expand(9, 12), base),
             (base[::3, 1:], row[1:].expand(3, 11)), (base.t()[2:7], col.expand(9, 5).t())]
    for x, y in cases:
        with on(backend):
            out = PF.add(x, y, alpha=2)
            ours, g = grads(out, [base, col, row])
        ref = torch.add(x, y, alpha=2)
        theirs, _ = grads(ref, [base, col, row], g)
        assert_close(out, ref)
        for p, q in zip(ours, theirs):
            assert (p is None) == (q is None)
            if p is not None:
                assert_close(p, q)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_noncontiguous_incoming_gradient(backend, device):
    a = make((6, 1, 5), torch.float32, device, requires_grad=True)
    b = make((4, 5), torch.float32, device, requires_grad=True)
    for g in [torch.randn(5, 4, 6, device=device).permute(2, 1, 0), torch.randn((), device=device).expand(6, 4, 5)]:
        with on(backend):
            ours, _ = grads(PF.add(a, b, alpha=3), [a, b], g)
        theirs, _ = grads(torch.add(a, b, alpha=3), [a, b], g)
        for p, q in zip(ours, theirs):
            assert_close(p, q)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("pair", [(torch.float32, torch.float64), (torch.int64, torch.float32),
                                  (torch.float16, torch.float32), (torch.int32, torch.uint8),
                                  (torch.bool, torch.int64), (torch.bfloat16, torch.float16)], ids=str)
def test_mixed_dtypes_promote_like_torch(backend, device, pair):
    a, b = make_values((4, 6), pair[0], device), make_values((6,), pair[1], device)
    with on(backend):
        out = PF.add(a, b)
    ref = torch.add(a, b)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_mixed_dtype_gradients_and_zero_dim(backend, device):
    a = make((5, 3), torch.float32, device, requires_grad=True)
    b = make((3,), torch.float64, device, requires_grad=True)
    s = make((), torch.float64, device, requires_grad=True)  # a 0-dim float64 does not promote a float32 tensor
    for x, y in [(a, b), (s, a), (a, s)]:
        with on(backend):
            out = PF.add(x, y, alpha=2.5)
            ours, g = grads(out, [x, y])
        ref = torch.add(x, y, alpha=2.5)
        theirs, _ = grads(ref, [x, y], g)
        assert out.dtype == ref.dtype
        assert_close(out, ref)
        for p, q in zip(ours, theirs):
            assert p.dtype == q.dtype
            # a broadcast operand's gradient sums out.numel() / p.numel() terms of |2.5 g| that can cancel far
            # below them: its rounding is set by their size (torch sums them in float32, the python backend not)
            terms = out.numel() // max(p.numel(), 1)
            assert_close(p, q, dtype=torch.float32, scale=2.5 * magnitude(g) * terms)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool], ids=str)
def test_python_scalar_on_either_side(backend, device, dtype):
    t = make_values((3, 4), dtype, device)
    numbers = [True, 2] if dtype == torch.bool else [3, 2.5, -1, True]
    for n in numbers:
        with on(backend):
            left, right = PF.add(n, t), PF.add(t, n)
        for ours, ref in [(left, torch.add(n, t)), (right, torch.add(t, n))]:
            assert ours.dtype == ref.dtype and ours.shape == ref.shape
            torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shapes", [((3, 4), (4,)), ((3, 1, 5), (4, 1)), ((), (2, 3)), ((2, 3), (2, 1)),
                                    ((2, 3), (2, 3))], ids=str)
def test_gradcheck(backend, device, shapes):
    a = make(shapes[0], torch.float64, device, requires_grad=True)
    b = make(shapes[1], torch.float64, device, requires_grad=True)
    with on(backend):
        assert torch.autograd.gradcheck(lambda x, y: PF.add(x, y, alpha=-1.5), (a, b))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_accumulates_and_retain_graph(backend, device):
    a = make((8, 5), torch.float32, device, requires_grad=True)
    b = make((5,), torch.float32, device, requires_grad=True)
    a_ref, b_ref = (t.detach().clone().requires_grad_() for t in (a, b))
    g = torch.randn(8, 5, device=device)
    with on(backend):
        out = PF.add(a, b, alpha=2)
        out.backward(g, retain_graph=True)
        out.backward(g)
    ref = torch.add(a_ref, b_ref, alpha=2)
    ref.backward(g, retain_graph=True)
    ref.backward(g)
    assert_close(a.grad, a_ref.grad)
    assert_close(b.grad, b_ref.grad)
    assert a.grad.data_ptr() != g.data_ptr()  # the gradient is never the caller's own tensor


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_same_shape_gradients_do_not_alias(backend, device):
    a = make((4, 5), torch.float32, device, requires_grad=True)
    b = make((4, 5), torch.float32, device, requires_grad=True)
    g = torch.randn(4, 5, device=device)
    with on(backend):
        PF.add(a, b).backward(g)
    assert len({a.grad.data_ptr(), b.grad.data_ptr(), g.data_ptr()}) == 3
    a.grad.add_(1)
    assert_close(b.grad, g)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_nan_and_inf_propagate(backend, device):
    a = torch.tensor([[float("nan"), 1.0, float("inf")], [2.0, float("-inf"), 0.0]], device=device,
                     requires_grad=True)
    b = torch.tensor([float("inf"), float("nan"), float("inf")], device=device, requires_grad=True)
    with on(backend):
        out = PF.add(a, b)
        ours, g = grads(out, [a, b], torch.tensor([[1.0, float("nan"), 2.0], [3.0, 4.0, 5.0]], device=device))
    ref = torch.add(a, b)
    theirs, _ = grads(ref, [a, b], g)
    assert_close(out, ref)
    for p, q in zip(ours, theirs):
        assert_close(p, q)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_is_deterministic(backend, device):
    a = make((3000, 40), torch.float32, device, requires_grad=True)
    b = make((40,), torch.float32, device, requires_grad=True)
    c = make((3000, 1), torch.float32, device, requires_grad=True)
    g = torch.randn(3000, 40, device=device)
    with on(backend):  # b's gradient sums over rows, c's over columns: both reductions, each checked
        first = torch.autograd.grad([PF.add(a, b), PF.add(a, c)], [b, c], [g, g])
        for _ in range(3):
            again = torch.autograd.grad([PF.add(a, b), PF.add(a, c)], [b, c], [g, g])
            assert all(torch.equal(x, y) for x, y in zip(first, again))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_input_raises_like_torch(backend, device):
    x, y = torch.rand(2, 3, device=device), torch.rand(4, device=device)
    p, q = torch.rand(3, 1, 2, device=device), torch.rand(4, 3, device=device)
    i = torch.ones(3, dtype=torch.int64, device=device)
    i8, h = i.to(torch.int8), torch.ones(3, dtype=torch.float16, device=device)
    cases = [  # (a, b, alpha, torch's key phrase)
        (x, y, 1, r"size of tensor a \(3\) must match the size of tensor b \(4\) at non-singleton dimension 1"),
        (p, q, 1, r"size of tensor a \(2\) must match the size of tensor b \(3\) at non-singleton dimension 2"),
        (i, i, 2.5, "alpha must not be a floating point number"),
        (x, x, True, "Boolean alpha only supported for Boolean results"),
        (i8, i8, 300, "value cannot be converted to type int8_t without overflow"),
        (h, h, 70000, r"value cannot be converted to type c10::Half without overflow"),
    ]
    with on(backend):
        for a, b, alpha, phrase in cases:
            assert_raises_like(lambda a=a, b=b, alpha=alpha: torch.add(a, b, alpha=alpha),
                               lambda a=a, b=b, alpha=alpha: PF.add(a, b, alpha=alpha), phrase)
