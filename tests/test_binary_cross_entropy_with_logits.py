import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
import pyengine.nn as pnn
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close,
                   assert_raises_like, backward_aten_calls, grads, magnitude, make, on)

SHAPES = [(), (0,), (1,), (17,), (4, 33), (3, 5, 7), (50001,)]
REDUCTIONS = ["mean", "sum", "none"]
WEIGHTS = ["none", "weight", "pos_weight", "both"]


def _weights(kind, shape, dtype, device):
    last = shape[-1:] if shape else ()
    weight = make(last, dtype, device, low=0.1, high=2) if kind in ("weight", "both") else None
    pos_weight = make(last, dtype, device, low=0.1, high=3) if kind in ("pos_weight", "both") else None
    return weight, pos_weight


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
# a fixed target (the usual training call) takes the compiled node's forward that computes the input's gradient
@pytest.mark.parametrize("target_grad", [True, False], ids=["target_grad", "fixed_target"])
def test_forward_backward_match_torch(backend, device, dtype, shape, reduction, weights, target_grad):
    x = make(shape, dtype, device, requires_grad=True, low=-8, high=8)
    y = make(shape, dtype, device, requires_grad=target_grad, low=0, high=1)
    w, pw = _weights(weights, shape, dtype, device)
    inputs = [x, y] if target_grad else [x]
    with on(backend):
        loss = PF.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)
        ours, g = grads(loss, inputs)
    ref_loss = F.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw)
    ref, _ = grads(ref_loss, inputs, g)
    assert_close(loss, ref_loss)
    for a, b, scale in zip(ours, ref, gradient_terms(x, y, w, pw, g, reduction)):
        assert_close(a, b, scale=scale)


def gradient_terms(x, y, w, pw, g, reduction):
    """The sizes of the terms of dloss/dx = ((1 + (pw - 1) y) sigmoid(x) - pw y) w g and dloss/dy =
    ((pw - 1) softplus(-x) - x) w g (over n for 'mean'), which cancel where the label fits the logit."""
    x64, y64 = x.detach().double(), y.detach().double()
    pw64 = torch.ones_like(x64) if pw is None else pw.detach().double().expand_as(x64)
    scale = g.detach().double().abs() * (1.0 if w is None else w.detach().double().abs())
    if reduction == "mean":
        scale = scale / max(x.numel(), 1)
    dx = ((1 + (pw64 - 1) * y64).abs() * torch.sigmoid(x64) + (pw64 * y64).abs()) * scale
    dy = ((pw64 - 1).abs() * F.softplus(-x64) + x64.abs()) * scale
    return magnitude(dx), magnitude(dy)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("n", [0, 1, 17, 70001])  # below a vector, a vector and a tail, several parallel chunks
def test_forward_with_grad_is_the_forward_and_the_backward_for_one(backend, device, dtype, reduction, weights, n):
    """The kernels' contract: the training forward's loss is the forward's bit for bit (the same sums in the same
    order), and its gradient the backward's for an incoming 1 to a rounding or two (the compiler fuses multiply-adds
    differently in the two loops), so taking it changes no result beyond that."""
    x, y = make((n,), dtype, device, low=-20, high=20), make((n,), dtype, device, low=0, high=1)
    w, pw = (None if t is None else t.expand(n).contiguous() for t in _weights(weights, (n,), dtype, device))
    with on(backend):
        kernels = pyengine._backend.kernels(torch.device(device))
        loss, gx = kernels.binary_cross_entropy_with_logits_forward_with_grad(x, y, w, pw, reduction)
        one = torch.ones((), dtype=dtype, device=device)
        loss_forward = kernels.binary_cross_entropy_with_logits_forward(x, y, w, pw, reduction)
        gx_backward, none = kernels.binary_cross_entropy_with_logits_backward(one, x, y, w, pw, reduction, True, False)
    torch.testing.assert_close(loss, loss_forward, rtol=0, atol=0, equal_nan=True)  # NaN: the mean of nothing
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(gx, gx_backward, rtol=2 * eps, atol=2 * eps * magnitude(gx_backward))
    assert none is None
    if dtype in FLOAT_DTYPES:  # (the half dtypes' values: test_half_precision_error_within_twice_torch)
        (gx_torch,), _ = grads(F.binary_cross_entropy_with_logits(x.requires_grad_(), y, w, pos_weight=pw,
                                                                  reduction=REDUCTIONS[reduction - 1]), [x], one)
        assert_close(gx, gx_torch, scale=gradient_terms(x, y, w, pw, one, REDUCTIONS[reduction - 1])[0])


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_backward_of_a_fixed_target_makes_no_input_sized_tensor(backend, device, dtype):
    """The usual training call (a mean over logits that alone want a gradient): the backward returns the gradient
    the forward computed (scales it, for an incoming gradient other than 1) instead of reading the operands again."""
    x = make((33, 7), dtype, device, requires_grad=True)
    y = make((33, 7), dtype, device, low=0, high=1)
    for incoming in (1.0, 2.5):
        x.grad = None
        with on(backend):
            calls = backward_aten_calls(PF.binary_cross_entropy_with_logits(x, y) * incoming)
        assert not [c for c in calls if c[0].startswith("empty") and c[1] == x.shape], calls
        ref = x.detach().requires_grad_()
        (F.binary_cross_entropy_with_logits(ref, y) * incoming).backward()
        assert_close(x.grad, ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_error_within_twice_torch(backend, device, dtype, reduction):
    x = make((257, 3), dtype, device, requires_grad=True, low=-6, high=6)
    y = make((257, 3), dtype, device, low=0, high=1)
    with on(backend):
        loss = PF.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        (gx,), g = grads(loss, [x])
    torch_loss = F.binary_cross_entropy_with_logits(x, y, reduction=reduction)
    (gx_torch,), _ = grads(torch_loss, [x], g)
    x64 = x.detach().double().requires_grad_()
    loss64 = F.binary_cross_entropy_with_logits(x64, y.double(), reduction=reduction)
    (gx64,), _ = grads(loss64, [x64], g.double())
    assert_half_close(loss, torch_loss, loss64)
    assert_half_close(gx, gx_torch, gx64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_gradcheck(backend, device, reduction, weights):
    x = make((3, 4), torch.float64, device, requires_grad=True)
    y = make((3, 4), torch.float64, device, requires_grad=True, low=0, high=1)
    w, pw = _weights(weights, (3, 4), torch.float64, device)
    with on(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: PF.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw), (x, y))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + HALF_DTYPES)
def test_huge_logits_stay_finite_like_torch(backend, device, dtype):
    """Fused sigmoid + BCE never takes log(0): saturated logits give finite losses and gradients."""
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4] * 3, dtype=dtype, device=device, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.0] * 3, dtype=dtype, device=device)
    with on(backend):
        loss = PF.binary_cross_entropy_with_logits(x, y, reduction="none")
        (gx,), g = grads(loss, [x], torch.ones_like(loss))
    ref = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    (gx_ref,), _ = grads(ref, [x], g)
    assert torch.isfinite(loss).all() and torch.isfinite(gx).all()
    torch.testing.assert_close(loss.double(), ref.double(), rtol=2e-2 if dtype in HALF_DTYPES else 1e-5, atol=1e-6)
    torch.testing.assert_close(gx.double(), gx_ref.double(), rtol=2e-2 if dtype in HALF_DTYPES else 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_module_matches_torch(backend, device):
    x = make((16, 5), torch.float32, device, requires_grad=True)
    y = (make((16, 5), torch.float32, device) > 0).float()
    pw = make((5,), torch.float32, device, low=0.5, high=2)
    with on(backend):
        loss = pnn.BCEWithLogitsLoss(pos_weight=pw)(x, y)
    assert_close(loss, torch.nn.BCEWithLogitsLoss(pos_weight=pw)(x, y))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_input_raises_like_torch(backend, device):
    x = torch.rand(3, device=device)
    with on(backend):
        long = torch.ones(3, dtype=torch.long, device=device)
        for a, b, phrase in [(x, torch.rand(2, 3, device=device), r"Target size \(torch.Size\(\[2, 3\]\)\) must be"),
                             (x, long, "result type Float can't be cast to the desired output type Long"),
                             (long, long, "not implemented for 'Long'")]:
            assert_raises_like(lambda a=a, b=b: F.binary_cross_entropy_with_logits(a, b),
                               lambda a=a, b=b: PF.binary_cross_entropy_with_logits(a, b), phrase)
        assert_raises_like(lambda: F.binary_cross_entropy_with_logits(x, x, reduction="x"),
                           lambda: PF.binary_cross_entropy_with_logits(x, x, reduction="x"),
                           "x is not a valid value for reduction")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("argument", ["weight", "pos_weight"])
def test_weight_that_requires_grad_raises_like_torch(backend, device, argument):
    """torch cannot differentiate weight or pos_weight: a learnable one raises rather than silently keeping a
    None .grad; without grad mode both return the loss."""
    x = make((4, 3), torch.float32, device, requires_grad=True)
    y = make((4, 3), torch.float32, device, low=0, high=1)
    kw = {argument: make((3,), torch.float32, device, low=0.5, high=2, requires_grad=True)}
    phrase = f"not differentiable with respect to argument '{argument}'"
    with on(backend):
        assert_raises_like(lambda: F.binary_cross_entropy_with_logits(x, y, **kw),
                           lambda: PF.binary_cross_entropy_with_logits(x, y, **kw), phrase)
        full = {k: v.expand(4, 3) for k, v in kw.items()}
        with pytest.raises(RuntimeError, match=phrase):
            pyengine.autograd.BinaryCrossEntropyWithLogitsFunction.apply(  # applied directly: at the backward
                x, y, full.get("weight"), full.get("pos_weight")).backward()
        with torch.no_grad():
            assert_close(PF.binary_cross_entropy_with_logits(x, y, **kw),
                         F.binary_cross_entropy_with_logits(x, y, **kw))
