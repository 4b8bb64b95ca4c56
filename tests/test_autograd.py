"""The C++ autograd Functions (csrc/autograd.cpp) that pyengine.functional builds on the compiled backends: the same
values and gradients, bit for bit, as the Python Functions of pyengine/ops (which the python backend,
torch.compile and <Op>Function.apply run), and the autograd behaviour users rely on: .grad accumulating over
backward calls, freed graphs, in-place checks, double backward, backward from several threads."""
import threading

import pytest
import torch

import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
from pyengine import _backend
from pyengine.ops import (BinaryCrossEntropyWithLogitsFunction, BroadcastAddFunction, FusedMLPFunction,
                          LeakyReLUFunction, LinearFunction, MSELossFunction, ReLUFunction, SigmoidFunction,
                          SoftmaxCrossEntropyFunction, TanhFunction)
from pyengine.ops.fused_mlp import fused_mlp_packed, unpack
from pyengine.ops.linear import ACTIVATIONS
from utils import BACKEND_DEVICES, COMPILED_DEVICES, assert_close, make, on

REDUCTIONS = ["none", "mean", "sum"]


def _linear(shape, n, bias, activation):
    def inputs(dtype, device):
        k = shape[-1]
        return [make(shape, dtype, device, requires_grad=True), make((n, k), dtype, device, requires_grad=True)] + (
            [make((n,), dtype, device, requires_grad=True)] if bias else [])

    def compiled(x, w, b=None):
        return PF.linear(x, w, b, activation=activation)

    def python(x, w, b=None):
        return LinearFunction.apply(x, w, b, ACTIVATIONS[activation])

    return inputs, compiled, python


def _unary(fn, function, shape=(6, 35)):
    return (lambda dtype, device: [make(shape, dtype, device, requires_grad=True)]), fn, function.apply


def _loss(name, reduction, weights=False):
    def inputs(dtype, device):
        made = [make((9, 5), dtype, device, requires_grad=True), make((9, 5), dtype, device, requires_grad=True,
                                                                      low=0, high=1)]
        if weights:
            made += [make((5,), dtype, device, low=0.1, high=2), make((5,), dtype, device, low=0.1, high=2)]
        return made

    if name == "mse_loss":
        return inputs, (lambda x, t: PF.mse_loss(x, t, reduction=reduction)), (
            lambda x, t: MSELossFunction.apply(x, t, reduction))

    def compiled(x, t, w=None, pw=None):
        return PF.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw, reduction=reduction)

    def python(x, t, w=None, pw=None):
        w, pw = (None if v is None else v.broadcast_to(x.shape) for v in (w, pw))
        return BinaryCrossEntropyWithLogitsFunction.apply(x, t, w, pw, reduction)

    return inputs, compiled, python


def _fused_mlp(packed, sizes=(7, 5, 9, 3)):
    """x (2, 11, 7) through 7 -> 5 -> 9 -> 3 with relu between and a sigmoid on top; packed: the parameters as
    nn.FusedMLP holds them, against the Python Function over views of them."""
    def inputs(dtype, device):
        if packed:
            count = sum(n_out * (n_in + 1) for n_in, n_out in zip(sizes, sizes[1:]))
            return [make((2, 11, 7), dtype, device, requires_grad=True), make((count,), dtype, device,
                                                                                 requires_grad=True)]
        return [make((2, 11, 7), dtype, device, requires_grad=True)] + [
            make(shape, dtype, device, requires_grad=True) for shape in
            [(n_out, n_in) for n_in, n_out in zip(sizes, sizes[1:])] + [(n,) for n in sizes[1:]]]

    def split(params):
        return unpack(params[0], sizes) if packed else (params[:3], params[3:])

    def compiled(x, *params):
        return (fused_mlp_packed(x, params[0], sizes, 1, 2) if packed
                else PF.fused_mlp(x, params[:3], params[3:], "relu", "sigmoid"))

    def python(x, *params):
        weights, biases = split(params)
        return FusedMLPFunction.apply(x, 1, 2, *weights, *biases)[0]  # (y, *hidden)

    return inputs, compiled, python


def _cross_entropy(reduction, weight=False, smoothing=0.0):
    """(N, C) logits and class indices, a tenth of them ignored. 'mean' and 'sum' in float32/float64 take the
    fused path (the gradient computed with the loss), 'none' and bfloat16 the unfused one."""
    def inputs(dtype, device):
        target = torch.randint(0, 11, (37,), device=device)
        target[::10] = -100
        made = [make((37, 11), dtype, device, requires_grad=True), target]
        if weight:
            made.append(make((11,), dtype, device, low=0.2, high=2))
        return made

    def compiled(x, t, w=None):
        return PF.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing)

    def python(x, t, w=None):
        return SoftmaxCrossEntropyFunction.apply(x, t, w, -100, reduction, smoothing)[0]  # (loss, lse, denom, grad)

    return inputs, compiled, python


CASES = {
    "linear": _linear((5, 7), 4, True, None),
    "linear_nobias_3d": _linear((2, 3, 7), 4, False, None),
    "linear_relu": _linear((5, 7), 4, True, "relu"),
    "linear_sigmoid_3d": _linear((2, 3, 7), 4, True, "sigmoid"),
    "linear_blas": _linear((3, 65), 2, True, None),  # in_features past the CPU's small-layer width: BLAS
    "relu": _unary(PF.relu, ReLUFunction),
    "sigmoid": _unary(PF.sigmoid, SigmoidFunction),
    "tanh": _unary(PF.tanh, TanhFunction),
    "leaky_relu": ((lambda dtype, device: [make((6, 35), dtype, device, requires_grad=True)]),
                   lambda x: PF.leaky_relu(x, 0.2), lambda x: LeakyReLUFunction.apply(x, 0.2)),
    **{f"add_{name}": ((lambda dtype, device, a=a, b=b: [make(a, dtype, device, requires_grad=True),
                                                          make(b, dtype, device, requires_grad=True)]),
                       lambda x, y: PF.add(x, y, alpha=1.5), lambda x, y: BroadcastAddFunction.apply(x, y, 1.5))
       for name, a, b in [("same", (6, 35), (6, 35)), ("row", (6, 35), (35,)), ("column_both_ways", (6, 1), (1, 35)),
                          ("0dim", (6, 35), ())]},
    **{f"mse_loss_{r}": _loss("mse_loss", r) for r in REDUCTIONS},
    **{f"bce_{r}": _loss("bce", r) for r in REDUCTIONS},
    "bce_weights": _loss("bce", "mean", weights=True),
    **{f"cross_entropy_{r}": _cross_entropy(r) for r in REDUCTIONS},
    "cross_entropy_weight_smoothing_ignored": _cross_entropy("mean", weight=True, smoothing=0.2),
    "fused_mlp": _fused_mlp(packed=False),
    "fused_mlp_packed": _fused_mlp(packed=True),
}
FIRST_ORDER_ONLY = {"fused_mlp", "fused_mlp_packed", *(name for name in CASES if name.startswith("cross_entropy"))}


def _run(fn, inputs, grad_out=None):
    out = fn(*inputs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    wanted = [t for t in inputs if t.requires_grad]
    return out, torch.autograd.grad(out, wanted, grad_out), grad_out


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_cpp_node_matches_python_function_bit_for_bit(backend, device, dtype, case):
    make_inputs, compiled, python = CASES[case]
    inputs = make_inputs(dtype, device)
    with on(backend):
        out, grads, gy = _run(compiled, inputs)
        assert "pyengine::autograd::" in out.grad_fn.name(), "the compiled backend should build a C++ node"
        out_py, grads_py, _ = _run(python, inputs, gy)
    # named as the Python Function's node, and printed so (not torch's "CrossEntropyFunction>>" of a CppNode<T>)
    name = type(out_py.grad_fn).__name__
    assert name.endswith("FunctionBackward") and type(out.grad_fn).__name__ == name
    assert f"grad_fn=<{name}>)" in repr(out)
    assert torch.equal(out, out_py)
    for g, g_py in zip(grads, grads_py):
        assert torch.equal(g, g_py)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_and_gradgradcheck(backend, device, case):
    make_inputs, compiled, _ = CASES[case]
    inputs = make_inputs(torch.float64, device)
    with on(backend):
        assert torch.autograd.gradcheck(compiled, inputs)
        if case in FIRST_ORDER_ONLY:  # as the Python Function: the gradients are there, their derivatives raise
            wanted = [t for t in inputs if t.requires_grad]
            grads = torch.autograd.grad(compiled(*inputs).sum(), wanted, create_graph=True)
            assert all(g.requires_grad for g in grads)
            for grad in grads:
                op = "fused_mlp" if case.startswith("fused_mlp") else "cross_entropy"
                with pytest.raises(RuntimeError, match=f"pyengine.{op} has no double backward"):
                    torch.autograd.grad(grad.sum(), wanted, allow_unused=True)  # the saved inputs are linked to it
            return
        # the second derivative runs the python reference inside the C++ node's backward
        assert torch.autograd.gradgradcheck(compiled, inputs)


def test_python_backend_and_torch_func_keep_the_python_functions():
    x = torch.randn(4, 3, requires_grad=True)
    with on("python"):
        assert _backend.compiled_autograd(x) is None
        assert type(PF.sigmoid(x).grad_fn).__name__ == "SigmoidFunctionBackward"
    # torch.func and forward-mode AD take only Python Functions (tests/test_func.py checks their results)
    seen = []
    torch.func.grad(lambda t: seen.append(_backend.compiled_autograd(t)) or PF.sigmoid(t).sum())(x.detach())
    with torch.autograd.forward_ad.dual_level():
        seen.append(_backend.compiled_autograd(x))
    assert seen == [None, None]


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_grad_accumulates_over_backward_calls_and_graph_is_freed(backend, device):
    x = make((8, 5), torch.float32, device)
    w = make((3, 5), torch.float32, device, requires_grad=True)
    b = make((3,), torch.float32, device, requires_grad=True)
    with on(backend):
        loss = PF.sigmoid(PF.linear(x, w, b)).sum()
        loss.backward(retain_graph=True)
        first = w.grad.clone()
        loss.backward()
        torch.testing.assert_close(w.grad, 2 * first)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_saved_tensor_modified_in_place_raises(backend, device):
    x = make((4, 6), torch.float32, device, requires_grad=True)
    with on(backend):
        y = PF.sigmoid(x)
        y.mul_(2)  # sigmoid's backward reads its output
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_backward_from_several_threads(backend, device):
    torch.manual_seed(0)
    x = make((300, 8), torch.float32, device)
    t = (torch.rand(300, 1, device=device) > 0.5).float()
    w1, b1 = make((6, 8), torch.float32, device), make((6,), torch.float32, device)
    w2, b2 = make((1, 6), torch.float32, device), make((1,), torch.float32, device)

    def gradients():
        params = [p.clone().requires_grad_() for p in (w1, b1, w2, b2)]
        with on(backend):
            h = PF.tanh(PF.linear(x, params[0], params[1]))
            loss = PF.binary_cross_entropy_with_logits(PF.linear(h, params[2], params[3]), t)
            return torch.autograd.grad(loss, params)

    expected = gradients()
    results, errors = [], []

    def worker():
        try:
            for _ in range(20):
                results.append(gradients())
        except Exception as exc:  # surfaced below: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    assert len(results) == 80
    for got in results:
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


# Every Function applied with only its required arguments, as a user of pyengine.autograd would: the same values
# and gradients as the functional form with the defaults (and linear's activation by name).
MINIMAL_CALLS = {
    "LinearFunction": (lambda x, w: LinearFunction.apply(x, w), lambda x, w: F.linear(x, w), (5, 3)),
    "LinearFunction relu by name": (lambda x, w: LinearFunction.apply(x, w, None, "relu"),
                                    lambda x, w: F.relu(F.linear(x, w)), (5, 3)),
    "MSELossFunction": (lambda x, y: pyengine.autograd.MSELossFunction.apply(x, y), F.mse_loss, (4, 3)),
    "BinaryCrossEntropyWithLogitsFunction": (
        lambda x, y: pyengine.autograd.BinaryCrossEntropyWithLogitsFunction.apply(x, y.sigmoid()),
        lambda x, y: F.binary_cross_entropy_with_logits(x, y.sigmoid()), (4, 3)),
    "SoftmaxCrossEntropyFunction": (
        lambda x, y: SoftmaxCrossEntropyFunction.apply(x, y.softmax(1))[0],
        lambda x, y: F.cross_entropy(x, y.softmax(1)), (4, 3)),
    "LeakyReLUFunction": (lambda x, y: pyengine.autograd.LeakyReLUFunction.apply(x) + 0 * y.sum(),
                          lambda x, y: F.leaky_relu(x) + 0 * y.sum(), (4, 3)),
    "BroadcastAddFunction": (lambda x, y: pyengine.autograd.BroadcastAddFunction.apply(x, y),
                             torch.add, (3,)),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", MINIMAL_CALLS)
def test_functions_with_optional_arguments_left_out(backend, device, case):
    ours, theirs, other_shape = MINIMAL_CALLS[case]
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    other = torch.randn(other_shape, dtype=torch.float64, device=device, requires_grad=True)
    with on(backend):
        out = ours(x, other)
        grads = torch.autograd.grad(out.sum(), [x, other])
    ref = theirs(x, other)
    ref_grads = torch.autograd.grad(ref.sum(), [x, other])
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)
