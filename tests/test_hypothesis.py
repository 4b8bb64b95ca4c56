"""Property tests: hypothesis draws shapes (empty and 0-dim included), strides (transposed, sliced, expanded
views), dtypes and argument combinations, and every op's output and gradients must match torch's on the
same inputs, on each CPU backend. A failing draw is shrunk to the smallest example and printed."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyengine
import pyengine.functional as PF
from utils import assert_close, on

BACKENDS = [b for b in ("cpp", "python") if b in pyengine.available_backends()]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
dtypes = st.sampled_from([torch.float64, torch.float32])
sizes = st.integers(0, 6)


@st.composite
def tensors(draw, shape, dtype, low=-3.0, high=3.0):
    """A tensor of `shape` with fresh values, laid out contiguously, transposed, strided or expanded."""
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: torch.rand(s, generator=gen, dtype=torch.float64).mul(high - low).add(low).to(dtype)  # noqa: E731
    if layout == "transposed" and len(shape) >= 2:
        return make((*shape[:-2], shape[-1], shape[-2])).transpose(-1, -2)
    if layout == "strided" and len(shape) >= 1:
        return make((*shape[:-1], 2 * shape[-1]))[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 0:
        return make((1, *shape[1:])).expand(shape)
    return make(tuple(shape))


def _compare(backend, ours, theirs, args, dtype):
    """ours(*args) against theirs(*args): values and the gradient of every floating arg, NaN where torch has it."""
    leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a
              for a in args]
    twins = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.requires_grad else a for a in leaves]
    try:
        ref = theirs(*twins)
    except Exception as exc:  # where torch raises, pyengine raises the same type
        with on(backend), pytest.raises(type(exc)):
            ours(*leaves)
        return
    with on(backend):
        out = ours(*leaves)
    assert_close(out, ref, dtype)
    grad_out = torch.randn_like(ref)
    inputs = [a for a in leaves if torch.is_tensor(a) and a.requires_grad]
    ref_inputs = [a for a in twins if torch.is_tensor(a) and a.requires_grad]
    if not inputs:
        return
    grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        assert (g is None) == (r is None)
        if r is not None:
            assert_close(g, r, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh", "leaky_relu"])
@SETTINGS
@given(data=st.data(), shape=st.lists(sizes, max_size=3), dtype=dtypes, slope=st.floats(-2.0, 2.0))
def test_activations(backend, op, data, shape, dtype, slope):
    x = data.draw(tensors(shape, dtype))
    if op == "leaky_relu":
        _compare(backend, lambda t: PF.leaky_relu(t, slope), lambda t: F.leaky_relu(t, slope), [x], dtype)
    else:
        _compare(backend, getattr(PF, op), getattr(torch, op), [x], dtype)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast: the second drops leading dims and sets some of the rest to 1 (or the first)."""
    shape = draw(st.lists(sizes, max_size=3))
    keep = draw(st.integers(0, len(shape)))
    other = [1 if draw(st.booleans()) else n for n in shape[len(shape) - keep:]]
    return (shape, other) if draw(st.booleans()) else (other, shape)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data(), shapes=broadcast_pair(), dtypes_=st.tuples(dtypes, dtypes),
       alpha=st.sampled_from([1, -1, 0.5, 2.5]))
def test_add(backend, data, shapes, dtypes_, alpha):
    a, b = data.draw(tensors(shapes[0], dtypes_[0])), data.draw(tensors(shapes[1], dtypes_[1]))
    dtype = torch.result_type(a, b)  # the dtype the sum is computed in sets the tolerance, for both gradients
    _compare(backend, lambda x, y: PF.add(x, y, alpha=alpha), lambda x, y: torch.add(x, y, alpha=alpha), [a, b],
             dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data(), lead=st.lists(sizes, max_size=2), k=sizes, n=sizes, bias=st.booleans(), dtype=dtypes)
def test_linear(backend, data, lead, k, n, bias, dtype):
    x = data.draw(tensors([*lead, k], dtype))
    w = data.draw(tensors([n, k], dtype))
    args = [x, w] + ([data.draw(tensors([n], dtype))] if bias else [])
    _compare(backend, PF.linear, F.linear, args, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data(), n=sizes, c=st.integers(1, 7), spatial=st.lists(st.integers(0, 3), max_size=2),
       probabilities=st.booleans(), weighted=st.booleans(), reduction=st.sampled_from(["none", "mean", "sum"]),
       smoothing=st.sampled_from([0.0, 0.1, 0.7]), ignore=st.booleans(), dtype=dtypes)
def test_cross_entropy(backend, data, n, c, spatial, probabilities, weighted, reduction, smoothing, ignore, dtype):
    logits = data.draw(tensors([n, c, *spatial], dtype))
    if probabilities:
        target = torch.softmax(data.draw(tensors([n, c, *spatial], dtype)), dim=1)
    else:
        seed = data.draw(st.integers(0, 2**31 - 1))
        target = torch.randint(0, c, (n, *spatial), generator=torch.Generator().manual_seed(seed))
        if ignore and target.numel():
            target.view(-1)[::2] = 2  # an ignored class index that is also a real class
    weight = data.draw(tensors([c], dtype, low=0.1, high=2.0)) if weighted else None
    kw = dict(weight=weight, reduction=reduction, label_smoothing=smoothing, ignore_index=2 if ignore else -100)
    _compare(backend, lambda x, t: PF.cross_entropy(x, t, **kw), lambda x, t: F.cross_entropy(x, t, **kw),
             [logits, target], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(data=st.data(), shape=st.lists(sizes, max_size=3), dtype=dtypes,
       reduction=st.sampled_from(["none", "mean", "sum"]), weighted=st.booleans(), pos_weighted=st.booleans())
def test_pointwise_losses(backend, data, shape, dtype, reduction, weighted, pos_weighted):
    x, y = data.draw(tensors(shape, dtype)), data.draw(tensors(shape, dtype, low=0.0, high=1.0))
    _compare(backend, lambda a, b: PF.mse_loss(a, b, reduction=reduction),
             lambda a, b: F.mse_loss(a, b, reduction=reduction), [x, y], dtype)
    kw = dict(reduction=reduction)
    if weighted:
        kw["weight"] = data.draw(tensors(shape, dtype, low=0.1, high=2.0))
    if pos_weighted and shape:
        kw["pos_weight"] = data.draw(tensors(shape[-1:], dtype, low=0.1, high=3.0))
    _compare(backend, lambda a, b: PF.binary_cross_entropy_with_logits(a, b, **kw),
             lambda a, b: F.binary_cross_entropy_with_logits(a, b, **kw), [x, y], dtype)

