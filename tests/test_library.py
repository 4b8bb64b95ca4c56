"""torch.ops.pyengine: every kernel as a torch.library operator. torch.library.opcheck on a range of samples for
every registered operator (schema, autograd registration, fake functions, AOT dispatch), torch.compile of a
pyengine.nn model with fullgraph=True against eager mode, and autocast dtypes against torch's."""
import math

import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from utils import COMPILED_DEVICES, TOL

pytestmark = pytest.mark.skipif("cpp" not in pyengine.built_backends(), reason="pyengine._C is not built")


def _registered():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pyengine::"))


def _r(*shape, dtype, device, grad=False, low=-2.0, high=2.0):
    return torch.empty(shape, dtype=dtype, device=device).uniform_(low, high).requires_grad_(grad)


def _samples(name, dtype, device):
    """(args) tuples for one operator: odd and empty shapes, views with strides, every flag and reduction."""
    r = lambda *s, **kw: _r(*s, dtype=dtype, device=device, **kw)  # noqa: E731
    if name in ("relu_forward", "sigmoid_forward", "tanh_forward", "leaky_relu_forward"):
        extra = (0.1,) if name.startswith("leaky") else ()
        for x in (r(7, 5, grad=True), r(grad=True), r(0, 3, grad=True), r(5, 7).t().requires_grad_(), r(33)):
            yield (x, *extra)
        if extra:
            yield r(4, 4, grad=True), -0.5
    elif name in ("relu_backward", "sigmoid_backward", "tanh_backward", "leaky_relu_backward"):
        extra = (0.1,) if name.startswith("leaky") else ()
        yield (r(7, 5), r(7, 5), *extra)
        yield (r(0, 2), r(0, 2), *extra)
        yield (r(5, 7).t(), r(7, 5), *extra)
    elif name == "linear_forward":
        for m, k, n in ((5, 3, 4), (0, 3, 2), (1, 1, 1), (9, 17, 6)):
            yield r(m, k, grad=True), r(n, k, grad=True), r(n, grad=True)
            yield r(m, k), r(n, k, grad=True), None
            yield r(m, k, grad=True), r(n, k, grad=True), r(n, grad=True), 1
            yield r(m, k, grad=True), r(n, k, grad=True), None, 2
        yield r(3, 5).t(), r(2, 3, grad=True), None
    elif name == "linear_backward":
        for flags in ((True, True, True), (True, False, False), (False, True, True), (False, False, True)):
            yield (r(5, 4), r(5, 3), r(4, 3), *flags)
        yield r(0, 2), r(0, 3), r(2, 3), True, True, True
        yield r(5, 4), r(5, 3), r(4, 3), True, True, True, 1, r(5, 4, low=0.0)
        yield r(5, 4), r(5, 3), r(4, 3), True, False, True, 2, r(5, 4, low=0.0, high=1.0)
    elif name == "add_forward":
        for a, b in (((3, 4), (4,)), ((3, 1), (1, 4)), ((), (2, 3)), ((0, 2), (2,)), ((2, 3, 4), (3, 1))):
            yield r(*a, grad=True), r(*b, grad=True), 1
            yield r(*a, grad=True), r(*b, grad=True), 2.5
    elif name == "add_backward":
        for shape in ([4], [3, 1], [1, 4], [3, 4], []):
            yield r(3, 4), shape, 1
            yield r(3, 4), shape, -0.5
    elif name in ("cross_entropy_forward", "cross_entropy_backward"):
        for n, c, d in ((6, 5, 1), (3, 4, 3), (0, 3, 1)):
            index = torch.randint(0, c, (n, d), device=device)
            index.view(-1)[:1] = -100
            probs = torch.softmax(r(n, c, d), dim=1)
            weight = torch.rand(c, dtype=dtype, device=device) + 0.5
            for target, w, reduction, smoothing in ((index, None, 1, 0.0), (index, weight, 0, 0.1),
                                                    (index, weight, 1, 0.2), (probs, None, 2, 0.0),
                                                    (probs, weight, 1, 0.1)):
                if n == 0 and reduction == 1:
                    continue  # the mean of nothing is NaN, which opcheck compares as unequal
                args = (r(n, c, d, grad=True), target, w, -100, reduction, smoothing)
                if name == "cross_entropy_forward":
                    yield args
                    continue
                loss, lse, denom = torch.ops.pyengine.cross_entropy_forward(args[0].detach(), *args[1:])
                yield (torch.randn_like(loss), args[0].detach(), target, w, lse, denom, *args[3:])
    elif name in ("mse_loss_forward", "binary_cross_entropy_with_logits_forward"):
        bce = name.startswith("binary")
        for shape in ((5, 3), (0,), (), (17,)):
            target = r(*shape, grad=not bce, low=0.0, high=1.0)
            weights = (r(*shape, low=0.5), r(*shape, low=0.5)) if bce else ()
            for reduction in (0, 1, 2) if math.prod(shape) else (0, 2):  # opcheck compares NaN (0/0) as unequal
                yield (r(*shape, grad=True), target, *weights, reduction)
    elif name in ("mse_loss_backward", "binary_cross_entropy_with_logits_backward"):
        bce = name.startswith("binary")
        for reduction, flags in ((0, (True, True)), (1, (True, False)), (2, (False, True))):
            g = r(5, 3) if reduction == 0 else r()
            weights = (r(5, 3, low=0.5), None) if bce else ()
            yield (g, r(5, 3), r(5, 3, low=0.0, high=1.0), *weights, reduction, *flags)
    elif name == "mse_loss_forward_with_grad":
        for shape in ((5, 3), (17,), (), (0,)):
            for reduction in (1, 2) if math.prod(shape) else (2,):  # opcheck compares NaN (0/0) as unequal
                yield r(*shape), r(*shape), reduction
    elif name == "binary_cross_entropy_with_logits_forward_with_grad":
        for shape, weighted in (((5, 3), False), ((17,), True), ((), True), ((0,), False)):
            weights = (r(*shape, low=0.5), r(*shape, low=0.5)) if weighted else (None, None)
            for reduction in (1, 2) if math.prod(shape) else (2,):  # opcheck compares NaN (0/0) as unequal
                yield r(*shape), r(*shape, low=0.0, high=1.0), *weights, reduction
    elif name == "cross_entropy_forward_with_grad":
        for c, d, w in ((5, 1, None), (4, 3, torch.rand(4, dtype=dtype, device=device) + 0.5)):
            target = torch.randint(0, c, (6, d), device=device)
            target[0] = -100
            for reduction in (1, 2):
                yield r(6, c, d), target, w, -100, reduction, 0.1
    elif name in ("linear_cross_entropy_forward", "linear_cross_entropy_backward"):
        for n, h, v, bias in ((7, 5, 6, True), (9, 3, 11, False), (0, 2, 3, True)):
            target = torch.randint(0, v, (n,), device=device)
            if n:
                target[0] = -100
            b = r(v, grad=True) if bias else None
            for reduction, smoothing, flags in ((1, 0.0, (True, True, bias)), (2, 0.2, (False, True, bias)),
                                                (0, 0.1, (True, False, False))):
                if n == 0 and reduction == 1:
                    continue  # NaN mean, unequal to itself in opcheck
                x, w = r(n, h, grad=True), r(v, h, grad=True)
                args = (x, w, b, target, -100, reduction, smoothing, *flags, 64 * v)  # a few rows per chunk
                if name == "linear_cross_entropy_forward":
                    yield args
                elif reduction == 0:
                    lse = torch.ops.pyengine.linear_cross_entropy_forward(x.detach(), w.detach(), b, *args[3:])[1]
                    yield (torch.randn_like(lse), x.detach(), w.detach(), None if b is None else b.detach(), target,
                           lse, -100, smoothing, *flags, 64 * v)
    elif name in ("fused_mlp_forward", "fused_mlp_backward"):
        for sizes, act, out_act in (([3, 5, 2], 1, 0), ([4, 7, 6, 1], 2, 2), ([2, 1], 0, 1)):
            for rows in (9, 0):
                ws = [r(o, i, grad=True) for i, o in zip(sizes, sizes[1:])]
                bs = [r(o, grad=True) for o in sizes[1:]]
                x = r(rows, sizes[0], grad=True)
                if name == "fused_mlp_forward":
                    yield x, ws, bs, act, out_act
                    continue
                y, *hidden = torch.ops.pyengine.fused_mlp_forward(x.detach(), [w.detach() for w in ws],
                                                                 [b.detach() for b in bs], act, out_act)
                for flags in ((True, True, True), (False, True, False)):
                    yield (torch.randn_like(y), x.detach(), [w.detach() for w in ws], hidden, y, act, out_act,
                           *flags)
    else:
        raise KeyError(f"no opcheck samples for torch.ops.pyengine.{name}: add them to tests/test_library.py")


def test_every_kernel_is_registered_with_samples():
    names = _registered()
    kernels = {n for n in dir(pyengine._backend._C) if n.endswith(("_forward", "_backward", "_with_grad"))}
    assert kernels and kernels == set(names), kernels ^ set(names)
    for name in names:
        next(iter(_samples(name, torch.float64, "cpu")))


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", _registered())
def test_opcheck(name, dtype, device, backend):
    op = getattr(torch.ops.pyengine, name)
    samples = list(_samples(name, dtype, device))
    assert samples
    for args in samples:
        torch.library.opcheck(op, args, atol=TOL[dtype]["atol"], rtol=TOL[dtype]["rtol"])


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(pnn.Linear(8, 16), pnn.ReLU(), pnn.Linear(16, 16), pnn.Sigmoid(), pnn.Linear(16, 12),
                               pnn.Tanh(), pnn.LeakyReLU(0.2), pnn.Linear(12, 5))


def _step(model, x, target, shift):
    out = PF.add(model(x), shift)
    return (pnn.CrossEntropyLoss(label_smoothing=0.1)(out, target) + PF.mse_loss(out, torch.zeros_like(out))
            + PF.binary_cross_entropy_with_logits(out, torch.sigmoid(out.detach())))


def _record_graphs():
    """An AOTAutograd backend that keeps the forward and backward graphs' code for inspection."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    codes = []

    def record(gm, example_inputs):
        codes.append(gm.code)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record), codes


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager_with_pyengine_kernels_in_both_graphs(dynamic):
    backend, codes = _record_graphs()
    model = _model(0)
    x, target, shift = torch.randn(32, 8), torch.randint(0, 5, (32,)), torch.randn(5, requires_grad=True)
    eager = _step(model, x, target, shift)
    eager_grads = torch.autograd.grad(eager, [*model.parameters(), shift])
    compiled = torch.compile(lambda *a: _step(model, *a), fullgraph=True, backend=backend, dynamic=dynamic)
    for rows in (32, 19) if dynamic else (32,):  # a second batch size reuses the graph when dynamic
        xs, ts = x[:rows], target[:rows]
        out = compiled(xs, ts, shift)
        grads = torch.autograd.grad(out, [*model.parameters(), shift])
        ref = _step(model, xs, ts, shift)
        ref_grads = torch.autograd.grad(ref, [*model.parameters(), shift])
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    torch.testing.assert_close(out if not dynamic else compiled(x, target, shift), eager, **TOL[torch.float32])
    assert len(eager_grads) == len(grads)
    forward, backward = codes[0], codes[1]
    for op in ("linear", "relu", "sigmoid", "tanh", "leaky_relu", "add", "cross_entropy", "mse_loss",
               "binary_cross_entropy_with_logits"):
        assert f"torch.ops.pyengine.{op}_forward" in forward, op
        assert f"torch.ops.pyengine.{op}_backward" in backward, op


def test_compile_with_inductor_trains_like_eager():
    """The default backend (inductor, which generates C++ around our operators) over three SGD steps."""
    eager_model, compiled_model = _model(1), _model(1)
    x, target = torch.randn(64, 8), torch.randint(0, 5, (64,))
    shift = torch.zeros(5)

    def train(model, step):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = step(x, target, shift)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    eager = train(eager_model, lambda *a: _step(eager_model, *a))
    compiled = train(compiled_model, torch.compile(lambda *a: _step(compiled_model, *a), fullgraph=True))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _mlp_params(x):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(5, 4, generator=g).to(x.dtype), torch.randn(2, 5, generator=g).to(x.dtype)], [
        torch.randn(5, generator=g).to(x.dtype), torch.randn(2, generator=g).to(x.dtype)]


def _torch_mlp(x):
    (w1, w2), (b1, b2) = _mlp_params(x)
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


_T = torch.tensor([0, 1, 3])
# op: (pyengine's call, torch's) on a (3, 4) input
AUTOCAST_CASES = {
    "linear": (lambda x: PF.linear(x, x.new_ones(3, 4), x.new_ones(3)),
               lambda x: F.linear(x, x.new_ones(3, 4), x.new_ones(3))),
    "relu": (PF.relu, torch.relu),
    "sigmoid": (PF.sigmoid, torch.sigmoid),
    "tanh": (PF.tanh, torch.tanh),
    "leaky_relu": (lambda x: PF.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    "add": (lambda x: PF.add(x, x.float()), lambda x: torch.add(x, x.float())),
    "cross_entropy": (lambda x: PF.cross_entropy(x, _T), lambda x: F.cross_entropy(x, _T)),
    # a target of the input's dtype: torch 2.11's own mse_loss backward fails on float64 with a float32 target
    "mse_loss": (lambda x: PF.mse_loss(x, x.detach() * 0.5), lambda x: F.mse_loss(x, x.detach() * 0.5)),
    "binary_cross_entropy_with_logits": (lambda x: PF.binary_cross_entropy_with_logits(x, x.sigmoid()),
                                         lambda x: F.binary_cross_entropy_with_logits(x, x.sigmoid())),
    "linear_cross_entropy": (lambda x: PF.linear_cross_entropy(x, x.new_ones(5, 4), _T, linear_bias=x.new_ones(5)),
                             lambda x: F.cross_entropy(F.linear(x, x.new_ones(5, 4), x.new_ones(5)), _T)),
    "fused_mlp": (lambda x: PF.fused_mlp(x, *_mlp_params(x), "relu"), _torch_mlp),
}


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", sorted(AUTOCAST_CASES))
def test_autocast_gives_torchs_dtypes(op, input_dtype, autocast_dtype):
    ours, theirs = AUTOCAST_CASES[op]
    x = torch.randn(3, 4, dtype=input_dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected = theirs(x)
        actual = ours(x)
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2e-2, atol=2e-2)
    (gx,) = torch.autograd.grad(actual.float().sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.float().sum(), x)
    assert gx.dtype == gx_ref.dtype == x.dtype
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=2e-2, atol=2e-2)


def test_compile_fused_mlp_fullgraph_matches_eager():
    backend, codes = _record_graphs()
    torch.manual_seed(2)
    model = pnn.FusedMLP([8, 6, 4, 1], activation="sigmoid")
    x = torch.randn(77, 8)
    eager = torch.autograd.grad(model(x).sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    ours = torch.autograd.grad(compiled(x).sum(), list(model.parameters()))
    for a, b in zip(ours, eager):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert "torch.ops.pyengine.fused_mlp_forward" in codes[0]
    assert "torch.ops.pyengine.fused_mlp_backward" in codes[1]
