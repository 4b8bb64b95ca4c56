"""The C++ first stop of the elementwise ops, add, mse_loss and binary_cross_entropy_with_logits (csrc/eager.cpp,
pyengine._C.eager): for the calls it takes,
the same values, layout, dtype, gradients and graph node as the Python route it short-cuts; every other call it
hands back (None) to the Python function, which then does the whole work."""
import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
from pyengine import _backend

pytestmark = pytest.mark.skipif(_backend._EAGER is None, reason="needs the compiled extension and no "
                                "PYENGINE_BACKEND=python (the C++ first stop is off then)")

OPS = {
    "relu": (lambda x, y: PF.relu(x), lambda x, y: torch.relu(x)),
    "sigmoid": (lambda x, y: PF.sigmoid(x), lambda x, y: torch.sigmoid(x)),
    "tanh": (lambda x, y: PF.tanh(x), lambda x, y: torch.tanh(x)),
    "leaky_relu": (lambda x, y: PF.leaky_relu(x, 0.2), lambda x, y: F.leaky_relu(x, 0.2)),
    "add": (lambda x, y: PF.add(x, y, alpha=-3), lambda x, y: torch.add(x, y, alpha=-3)),
    "add_row_first": (lambda x, y: PF.add(y, x, alpha=0.5), lambda x, y: torch.add(y, x, alpha=0.5)),
    # the losses take a target of x's shape: y broadcast (a strided view) and, for BCE, squashed into [0, 1]
    "mse_loss": (lambda x, y: PF.mse_loss(x, y.expand_as(x)), lambda x, y: F.mse_loss(x, y.expand_as(x))),
    "mse_loss_none": (lambda x, y: PF.mse_loss(x, y.expand_as(x), reduction="none"),
                      lambda x, y: F.mse_loss(x, y.expand_as(x), reduction="none")),
    "bce_with_logits": (lambda x, y: PF.binary_cross_entropy_with_logits(x, torch.sigmoid(y).expand_as(x)),
                        lambda x, y: F.binary_cross_entropy_with_logits(x, torch.sigmoid(y).expand_as(x))),
    "bce_with_logits_sum": (
        lambda x, y: PF.binary_cross_entropy_with_logits(x, torch.sigmoid(y.detach()).expand_as(x), reduction="sum"),
        lambda x, y: F.binary_cross_entropy_with_logits(x, torch.sigmoid(y.detach()).expand_as(x), reduction="sum")),
}


def _operands(layout, dtype):
    """x of some layout and y, a row that broadcasts against it (a bias)."""
    if layout == "contiguous":
        x = torch.randn(759, 6, dtype=dtype)
    elif layout == "transposed":
        x = torch.randn(6, 759, dtype=dtype).t()
    elif layout == "channels_last":
        x = torch.randn(3, 5, 4, 7, dtype=dtype).to(memory_format=torch.channels_last)
    elif layout == "zero_dim":
        x = torch.randn((), dtype=dtype)
    elif layout == "empty":
        x = torch.randn(0, 6, dtype=dtype)
    else:  # a long narrow matrix whose row count is no multiple of the tiled rows (csrc/cpu/add.cpp)
        x = torch.randn(1001, 3, dtype=dtype)
    y = torch.randn(x.shape[-1:] if x.dim() else (), dtype=dtype)
    return x, y


def _run(op, x, y, requires_grad, *, eager):
    x, y = x.clone().requires_grad_(requires_grad), y.clone().requires_grad_(requires_grad)
    saved = _backend._EAGER
    _backend._EAGER = saved if eager else None
    try:
        out = OPS[op][0](x, y)
        grads = (torch.autograd.grad(out, (x, y), torch.ones_like(out), allow_unused=True) if requires_grad
                 else (None, None))
    finally:
        _backend._EAGER = saved
    return out, grads


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last", "zero_dim", "empty", "narrow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_same_as_the_python_route(op, layout, dtype, requires_grad):
    x, y = _operands(layout, dtype)
    fast, fast_grads = _run(op, x, y, requires_grad, eager=True)
    slow, slow_grads = _run(op, x, y, requires_grad, eager=False)
    torch.testing.assert_close(fast, slow, rtol=0, atol=0, equal_nan=True)  # NaN: a mean over no elements
    assert fast.dtype == slow.dtype and fast.stride() == slow.stride()
    assert type(fast.grad_fn) is type(slow.grad_fn)
    for a, b in zip(fast_grads, slow_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    expected = OPS[op][1](x, y)
    torch.testing.assert_close(fast, expected, equal_nan=True,
                               **({"rtol": 1.6e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_the_usual_call_is_taken(requires_grad):
    x = torch.randn(759, 6, requires_grad=requires_grad)
    eager = _backend.eager_entries()
    assert eager is not None
    out = eager.relu(x)
    assert out is not None
    assert (out.grad_fn is not None) == requires_grad
    assert eager.add(x, torch.randn(6), 1) is not None
    assert eager.leaky_relu(x, 0.1) is not None
    for reduction in ("mean", "sum", "none"):
        assert eager.mse_loss(x, torch.randn(759, 6), reduction) is not None
        assert eager.binary_cross_entropy_with_logits(x, torch.rand(759, 6), reduction) is not None


def test_unusual_calls_are_handed_back():
    eager = _backend.eager_entries()
    x = torch.randn(4, 3)
    handed_back = {
        "integer tensor": lambda: eager.relu(torch.arange(3)),
        "bool tensor": lambda: eager.sigmoid(torch.ones(3, dtype=torch.bool)),
        "a list": lambda: eager.tanh([1.0, 2.0]),
        "bool slope": lambda: eager.leaky_relu(x, True),
        "tensor slope": lambda: eager.leaky_relu(x, torch.tensor(0.1)),
        "number operand": lambda: eager.add(x, 2.0, 1),
        "two dtypes": lambda: eager.add(x, torch.randn(3, dtype=torch.float64), 1),
        "shapes that do not broadcast": lambda: eager.add(x, torch.randn(4), 1),
        "bool alpha": lambda: eager.add(x, x, True),
        "alpha past float16": lambda: eager.add(x.half(), x.half(), 1e6),
        "a target of another shape": lambda: eager.mse_loss(x, torch.randn(3), "mean"),
        "a target of another dtype": lambda: eager.binary_cross_entropy_with_logits(x, x.double(), "mean"),
        "an integer target": lambda: eager.mse_loss(x, torch.ones(4, 3, dtype=torch.long), "mean"),
        "an unknown reduction": lambda: eager.mse_loss(x, x, "avg"),
        "a reduction that is no string": lambda: eager.binary_cross_entropy_with_logits(x, x, 1),
    }
    for why, call in handed_back.items():
        assert call() is None, why
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a loss's bfloat16 operands become float32 there
        assert eager.mse_loss(x.bfloat16(), x.bfloat16(), "mean") is None
        assert PF.mse_loss(x.bfloat16(), x.bfloat16()).dtype == torch.float32


def test_transforms_and_tracers_are_handed_back():
    eager = _backend.eager_entries()
    x = torch.randn(5, 3)
    seen = []
    torch.func.vmap(lambda row: seen.append(eager.relu(row)) or row)(x)
    with torch.autograd.forward_ad.dual_level():
        seen.append(eager.relu(torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))))
    torch.jit.trace(lambda t: seen.append(eager.relu(t)) or t.clone(), (x,), check_trace=False)
    assert seen == [None, None, None]


def test_a_forced_backend_takes_its_own_devices_calls():
    x = torch.randn(3, requires_grad=True)
    with pyengine.use_backend("cpp"):
        eager = _backend.eager_entries()
        assert eager is not None and eager.relu(x) is not None
        out = PF.relu(x)
    assert "pyengine::autograd" in out.grad_fn.name()
    assert pyengine._C.eager_cuda.relu(x) is None  # a CPU tensor never runs the CUDA backend's entries
    if torch.cuda.is_available():
        assert pyengine._C.eager_cpp.relu(x.detach().cuda()) is None
    with pyengine.use_backend("python"):
        assert _backend.eager_entries() is None
        out = PF.relu(x)
    assert "pyengine::autograd" not in out.grad_fn.name()


def test_compile_skips_it():
    compiled = torch.compile(lambda t: PF.relu(t) + 1, backend="eager", fullgraph=True)
    x = torch.randn(8)
    torch.testing.assert_close(compiled(x), torch.relu(x) + 1)


def test_errors_are_torchs_through_the_fallback():
    with pytest.raises(RuntimeError, match="must match the size of tensor b"):
        PF.add(torch.randn(4, 3), torch.randn(4))
    with pytest.raises(NotImplementedError, match="Boolean inputs not supported for relu"):
        PF.relu(torch.ones(2, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="Boolean alpha only supported"):
        PF.add(torch.randn(3), torch.randn(3), alpha=True)
    with pytest.raises(ValueError, match="avg is not a valid value for reduction"):
        PF.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3), reduction="avg")
    with pytest.raises(ValueError, match="must be the same as input size"):
        PF.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(2))
