"""Memory format: relu, sigmoid, tanh, leaky_relu and add lay out their outputs, and the gradients their backward
returns, as torch does (TensorIterator's rules, csrc/common/layout.h): a channels_last input gives a channels_last
output and a channels_last gradient, a dense permutation keeps its strides, a non-dense view gives a dense tensor
in its dim order, and where operands disagree the one torch lists first wins. Every case compares the values with
torch's and the strides exactly, on every backend, through pyengine.functional (the C++ autograd Functions on the
compiled backends), through the Python Functions' apply, and with create_graph=True (the backward then runs the
python reference formulas)."""
import pytest
import torch
import torch.nn.functional as F

import pyengine.autograd as PA
import pyengine.functional as PF
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close,
                   on, output_gradient_magnitude)

CL, CL3D = torch.channels_last, torch.channels_last_3d


def _rand(shape, dtype, device):
    return torch.empty(shape, dtype=dtype, device=device).uniform_(-3, 3)


# name -> (dtype, device) -> a tensor of that layout; the views are taken of a fresh tensor
LAYOUTS = {
    "contiguous": lambda dt, dev: _rand((2, 3, 4, 5), dt, dev),
    "channels_last": lambda dt, dev: _rand((2, 3, 4, 5), dt, dev).contiguous(memory_format=CL),
    "channels_last_3d": lambda dt, dev: _rand((2, 3, 2, 4, 5), dt, dev).contiguous(memory_format=CL3D),
    # channels_last strides that are contiguous too (torch: contiguous wins) and one that is contiguous only
    "channels_last_1x1": lambda dt, dev: _rand((2, 3, 1, 1), dt, dev).contiguous(memory_format=CL),
    "channels_last_c1": lambda dt, dev: _rand((2, 1, 4, 5), dt, dev).contiguous(memory_format=CL),
    "channels_last_n1": lambda dt, dev: _rand((1, 3, 4, 5), dt, dev).contiguous(memory_format=CL),
    "transposed": lambda dt, dev: _rand((7, 5), dt, dev).t(),
    "permuted": lambda dt, dev: _rand((4, 5, 3), dt, dev).permute(2, 0, 1),
    "strided_slice": lambda dt, dev: _rand((2, 3, 8, 5), dt, dev)[:, :, ::2],
    "permuted_slice": lambda dt, dev: _rand((5, 4, 12), dt, dev).permute(2, 0, 1)[::2],
    "channels_last_slice": lambda dt, dev: _rand((2, 3, 4, 10), dt, dev).contiguous(memory_format=CL)[..., ::2],
    "expanded": lambda dt, dev: _rand((1, 3, 1, 5), dt, dev).expand(2, 3, 4, 5),
}


def _reversed_dense(shape, dtype, device):
    """Dense with the dims in reverse order: a layout that disagrees with every one above."""
    n = len(shape)
    return torch.randn(shape[::-1], dtype=dtype, device=device).permute(*range(n - 1, -1, -1))


# the incoming gradient: laid out as the output, contiguous, reversed, or a sum's (one value expanded)
GRAD_LAYOUTS = {
    "like_output": lambda y: torch.randn_like(y),
    "contiguous": lambda y: torch.randn(y.shape, dtype=y.dtype, device=y.device),
    "reversed": lambda y: _reversed_dense(tuple(y.shape), y.dtype, y.device),
    "summed": lambda y: torch.ones((), dtype=y.dtype, device=y.device).expand(y.shape),
}

ACTIVATIONS = {
    "relu": (PF.relu, PA.ReLUFunction.apply, torch.relu),
    "sigmoid": (PF.sigmoid, PA.SigmoidFunction.apply, torch.sigmoid),
    "tanh": (PF.tanh, PA.TanhFunction.apply, torch.tanh),
    "leaky_relu": (lambda x: PF.leaky_relu(x, 0.1), lambda x: PA.LeakyReLUFunction.apply(x, 0.1),
                   lambda x: F.leaky_relu(x, 0.1)),
}
PATHS = ["functional", "function", "create_graph"]


def _leaf(make, dtype, device):
    """A tensor of the layout that requires grad: a leaf when dense, a view of a leaf otherwise (its gradient is
    then the one the backward returns for the view, before any view backward)."""
    t = make(dtype, device)
    if t._base is None:
        return t.requires_grad_()
    base = t._base.detach().requires_grad_()
    return base.as_strided(t.shape, t.stride(), t.storage_offset())


def _assert_same(ours, theirs, ref64=None, magnitude=None):
    assert ours.stride() == theirs.stride(), f"strides {ours.stride()}, torch {theirs.stride()}"
    if ours.dtype in HALF_DTYPES:
        assert_half_close(ours, theirs, ref64, magnitude)
    else:
        assert_close(ours, theirs, scale=None if magnitude is None else magnitude.max().item())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", list(ACTIVATIONS))
def test_activation_keeps_layout(op, path, layout, backend, device, dtype):
    functional, apply, torch_fn = ACTIVATIONS[op]
    ours_fn = apply if path == "function" else functional
    x = _leaf(LAYOUTS[layout], dtype, device)
    x64 = x.detach().double().requires_grad_()
    with on(backend):
        y = ours_fn(x)
    y_ref, y64 = torch_fn(x), torch_fn(x64)
    _assert_same(y, y_ref, y64)
    for grad_layout, make_grad in GRAD_LAYOUTS.items():
        gy = make_grad(y_ref)
        with on(backend):
            (gx,) = torch.autograd.grad(y, x, gy, retain_graph=True, create_graph=path == "create_graph")
        (gx_ref,) = torch.autograd.grad(y_ref, x, gy, retain_graph=True)
        (gx64,) = torch.autograd.grad(y64, x64, gy.double(), retain_graph=True)
        try:
            _assert_same(gx, gx_ref, gx64, output_gradient_magnitude(op, y64, gy))
        except AssertionError as e:
            raise AssertionError(f"gradient {grad_layout}: {e}") from e


def _bias(shape):
    return lambda dt, dev: _rand(shape, dt, dev)


# (input, other): the layouts above, mixed, and broadcast against biases and scalars
ADD_CASES = {
    "cl+cl": ("channels_last", "channels_last"),
    "cl+contiguous": ("channels_last", "contiguous"),
    "contiguous+cl": ("contiguous", "channels_last"),
    "cl+bias": ("channels_last", _bias((3, 1, 1))),
    "bias+cl": (_bias((3, 1, 1)), "channels_last"),
    "cl+row": ("channels_last", _bias((5,))),
    "cl+spatial": ("channels_last", _bias((1, 3, 4, 1))),
    "cl+scalar": ("channels_last", _bias(())),
    "cl3d+cl3d": ("channels_last_3d", "channels_last_3d"),
    "cl3d+bias": ("channels_last_3d", _bias((3, 1, 1, 1))),
    "cl_1x1+contiguous": ("channels_last_1x1", lambda dt, dev: _rand((2, 3, 1, 1), dt, dev)),
    "cl_c1+cl": ("channels_last_c1", lambda dt, dev: _rand((2, 1, 4, 5), dt, dev).contiguous(memory_format=CL)),
    "permuted+permuted": ("permuted", "permuted"),
    "permuted+contiguous": ("permuted", lambda dt, dev: _rand((3, 4, 5), dt, dev)),
    "contiguous+permuted": (lambda dt, dev: _rand((3, 4, 5), dt, dev), "permuted"),
    "transposed+row": ("transposed", _bias((7,))),
    "strided_slice+cl": ("strided_slice", lambda dt, dev: _rand((2, 3, 4, 5), dt, dev).contiguous(memory_format=CL)),
    "cl_slice+cl_slice": ("channels_last_slice", "channels_last_slice"),
    "expanded+cl": ("expanded", "channels_last"),
    "cl+expanded": ("channels_last", "expanded"),
}
ADD_FUNCTIONS = {
    "functional": lambda a, b, alpha: PF.add(a, b, alpha=alpha),
    "function": lambda a, b, alpha: PA.BroadcastAddFunction.apply(a, b, alpha),
    "create_graph": lambda a, b, alpha: PF.add(a, b, alpha=alpha),
}


def _operand(spec, dtype, device):
    return _leaf(LAYOUTS[spec] if isinstance(spec, str) else spec, dtype, device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES, ids=str)
@pytest.mark.parametrize("alpha", [1, 2.5])
@pytest.mark.parametrize("case", list(ADD_CASES))
@pytest.mark.parametrize("path", PATHS)
def test_add_keeps_layout(path, case, alpha, backend, device, dtype):
    a, b = (_operand(spec, dtype, device) for spec in ADD_CASES[case])
    a64, b64 = (t.detach().double().requires_grad_() for t in (a, b))
    with on(backend):
        out = ADD_FUNCTIONS[path](a, b, alpha)
    ref, ref64 = torch.add(a, b, alpha=alpha), torch.add(a64, b64, alpha=alpha)
    _assert_same(out, ref, ref64)
    # The sum's gradient (one value expanded) is left out: torch hands it on as it is, stride 0 and all, for any
    # operand of out's shape, and pyengine copies it for other.
    for grad_layout in ("like_output", "contiguous", "reversed"):
        gy = GRAD_LAYOUTS[grad_layout](ref)
        with on(backend):
            ours = torch.autograd.grad(out, (a, b), gy, retain_graph=True, create_graph=path == "create_graph")
        theirs = torch.autograd.grad(ref, (a, b), gy, retain_graph=True)
        theirs64 = torch.autograd.grad(ref64, (a64, b64), gy.double(), retain_graph=True)
        for name, g, g_ref, g64, operand in zip(("input", "other"), ours, theirs, theirs64, (a, b)):
            # a gradient summed over broadcast dims can cancel far below its terms: its error is measured against
            # the sum of their sizes (torch's and ours add them in different orders)
            terms = (gy.detach().double().abs() * (1 if name == "input" else abs(alpha))).expand(out.shape)
            summed = terms.sum_to_size(operand.shape) if g.numel() < out.numel() else None
            try:
                _assert_same(g, g_ref, g64, summed)
            except AssertionError as e:
                raise AssertionError(f"gradient {grad_layout}, d {name}: {e}") from e


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("case", ["cl+cl", "cl+contiguous", "contiguous+cl", "cl+bias", "permuted+contiguous"])
def test_add_integer_keeps_layout(case, backend, device, dtype):
    def operand(spec):
        t = (LAYOUTS[spec] if isinstance(spec, str) else spec)(torch.float32, device)
        return t > 0 if dtype == torch.bool else (t.abs() * 10).to(dtype)

    a, b = (operand(spec) for spec in ADD_CASES[case])
    with on(backend):
        out = PF.add(a, b)
    ref = torch.add(a, b)
    assert out.stride() == ref.stride() and torch.equal(out, ref)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d", "permuted", "permuted_slice", "expanded"])
def test_registered_operators_fake_the_layout(layout, backend, device):
    """torch.ops.pyengine's fake implementations (pyengine/ops/_library.py) give the kernels' strides, which
    torch.compile and torch.export trace with: opcheck compares them on real and fake tensors."""
    ops = torch.ops.pyengine
    x = LAYOUTS[layout](torch.float32, device)
    gy = _reversed_dense(tuple(x.shape), x.dtype, device)
    y = ops.sigmoid_forward(x)
    samples = [(ops.relu_forward, (x,)), (ops.leaky_relu_forward, (x, 0.1)), (ops.relu_backward, (gy, y)),
               (ops.sigmoid_backward, (gy, y)), (ops.tanh_backward, (gy.expand_as(y), y)),
               (ops.leaky_relu_backward, (gy, x, 0.1)), (ops.add_forward, (x, gy, 1.0)),
               (ops.add_forward, (x, torch.rand(x.shape[-1], device=device), 1.0)),
               (ops.add_backward, (gy, list(x.shape), 2.0)), (ops.add_backward, (gy, [x.shape[-1]], 2.0))]
    for op, args in samples:
        torch.library.opcheck(op, args, test_utils="test_faketensor")
