"""Property tests: hypothesis draws shapes (empty and 0-dim included, sizes across the vector widths), layouts
(transposed, sliced and expanded views, which reach the kernels as views), dtypes (half precision too) and
argument combinations, and every op's output and gradients must match torch's on the same inputs, on every
backend. A failing draw is shrunk to the smallest example and printed.

float64/float32 compare with torch directly (utils.assert_close); float16/bfloat16 compare errors against a
float64 reference with torch's own error as the bound (utils.assert_half_close). Gradients are taken with
respect to the tensors the views were made from, so a view's backward (the sum over an expanded dim, the
scatter into a strided slice) is checked too."""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyengine.functional as PF
from test_cross_entropy import gradient_terms
from utils import (BACKEND_DEVICES, HALF_DTYPES, TORCH_ACTIVATIONS, assert_close, assert_half_close, magnitude, on,
                   output_gradient_magnitude, product_magnitudes, relu_kink_slack)

# PYENGINE_HYPOTHESIS_EXAMPLES: fewer examples where a second configuration reruns the suite (.ci/oldest-torch)
SETTINGS = settings(max_examples=int(os.environ.get("PYENGINE_HYPOTHESIS_EXAMPLES", 100)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
dtypes = st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16])
# Mostly small sizes (empty, 1, odd), sometimes past a vector of float (16 lanes with AVX-512) or of half (32).
sizes = st.one_of(st.integers(0, 6), st.integers(7, 40))
MAX_ELEMENTS = 4000


def shapes(max_dims=3):
    return st.lists(sizes, max_size=max_dims).filter(lambda s: _numel(s) <= MAX_ELEMENTS)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


class Drawn:
    """A tensor to pass to an op: `base` (float64 values) seen through `view` (identity, transpose, slice or
    expand). Each run makes its own leaf from base in the dtype under test and applies the view to it."""

    def __init__(self, base, view, layout):
        self.base, self.view, self.layout = base, view, layout

    def leaf(self, dtype, rounded_to=None):
        """A fresh leaf in dtype; rounded_to: the dtype whose values it holds (the float64 reference of a half
        run holds the half values)."""
        return self.base.to(rounded_to or dtype).to(dtype).requires_grad_()

    def value(self):
        """The view's values as a float64 tensor (for targets and weights, which take no gradient here)."""
        return self.view(self.base)

    def __repr__(self):
        return f"{self.layout} {tuple(self.view(self.base).shape)}"


@st.composite
def tensors(draw, shape, low=-3.0, high=3.0):
    """A tensor of `shape` with fresh values, laid out contiguously, transposed, strided or expanded."""
    seed = draw(st.integers(0, 2**31 - 1))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
    gen = torch.Generator().manual_seed(seed)

    def make(s):
        return torch.rand(s, generator=gen, dtype=torch.float64).mul(high - low).add(low)

    shape = tuple(shape)
    if layout == "transposed" and len(shape) >= 2:
        return Drawn(make((*shape[:-2], shape[-1], shape[-2])), lambda t: t.transpose(-1, -2), layout)
    if layout == "strided" and len(shape) >= 1:
        return Drawn(make((*shape[:-1], 2 * shape[-1])), lambda t: t[..., ::2], layout)
    if layout == "expanded" and len(shape) >= 1 and shape[0] > 1:
        return Drawn(make((1, *shape[1:])), lambda t: t.expand(shape), layout)
    return Drawn(make(shape), lambda t: t, "contiguous")


def _run(fn, drawn, others, dtypes, rounded_to=None):
    """fn on fresh leaves (in dtypes, one per drawn tensor) seen through their views: (output, leaves, views)."""
    leaves = [d.leaf(dt, r) for d, dt, r in zip(drawn, dtypes, rounded_to or dtypes)]
    views = [d.view(leaf) for d, leaf in zip(drawn, leaves)]
    return fn(*views, *others), leaves, views


def _leaf_magnitudes(drawn, view_magnitudes):
    """Magnitudes of the views' gradients carried back to the leaves through each view's backward (a sum over
    expanded dims, a scatter into a slice): both are sums of non-negative terms."""
    out = []
    for d, m in zip(drawn, view_magnitudes):
        if m is None:
            out.append(None)
            continue
        leaf = d.base.clone().requires_grad_()
        (g,) = torch.autograd.grad(d.view(leaf), leaf, m.expand(d.view(leaf).shape))
        out.append(g)
    return out


def _compare(backend, device, ours, theirs, drawn, dtypes, others=(), magnitudes=None):
    """ours(*views, *others) against theirs(...): values and the gradient of every drawn tensor (its leaf, the
    tensor its view was made from), each drawn tensor in its dtype (one dtype for all, or a list).
    The size of the terms each result element sums, where they can cancel far below it: by default the output's
    own and, for a leaf's gradient, the sum of the |gradients| of its view's elements (an expanded dim sums them);
    magnitudes(views64, g64) -> (output magnitude or None, [view-gradient magnitude or None]) overrides them
    where the op itself cancels. assert_half_close takes them as they are, assert_close their largest as scale.
    A third item, [view-gradient slack or None], is assert_half_close's slack (utils.relu_kink_slack)."""
    drawn = [Drawn(d.base.to(device), d.view, d.layout) for d in drawn]
    dtypes = list(dtypes) if isinstance(dtypes, (list, tuple)) else [dtypes] * len(drawn)
    try:
        ref, ref_leaves, _ = _run(theirs, drawn, others, dtypes)
    except Exception as exc:  # where torch raises, pyengine raises the same type
        with on(backend), pytest.raises(type(exc)):
            _run(ours, drawn, others, dtypes)
        return
    with on(backend):
        out, leaves, _ = _run(ours, drawn, others, dtypes)
    dtype, half = ref.dtype, ref.dtype in HALF_DTYPES
    # drawn from the example's own generator: hypothesis replays a failing example and must see the same one
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(len(drawn)), dtype=torch.float64)
    grad_out = grad_out.to(ref.device, ref.dtype)
    with on(backend):
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out, allow_unused=True)
    # the float64 reference on the same (rounded) values, and the magnitudes
    others64 = [o.double() if torch.is_tensor(o) and o.is_floating_point() else o for o in others]
    exact, exact_leaves, exact_views = _run(theirs, drawn, others64, [torch.float64] * len(drawn), dtypes)
    g64 = grad_out.double()
    found = torch.autograd.grad(exact, exact_leaves + exact_views, g64, allow_unused=True)
    exact_grads, m_views = found[:len(drawn)], [None if v is None else v.abs() for v in found[len(drawn):]]
    m_out, slack_grads = None, [None] * len(drawn)
    if magnitudes is not None:
        m_out, op_views, *slack_views = magnitudes([v.detach() for v in exact_views], g64)
        m_views = [m if m is not None else default for m, default in zip(op_views, m_views)]
        if slack_views:
            slack_grads = _leaf_magnitudes(drawn, slack_views[0])
    m_grads = _leaf_magnitudes(drawn, m_views)
    if not half:
        assert_close(out, ref, scale=None if m_out is None else magnitude(m_out))
        for g, r, m in zip(grads, ref_grads, m_grads):
            assert (g is None) == (r is None)
            if r is None:
                continue
            if g.dtype in HALF_DTYPES:  # a half operand of a float32 result: the float32 gradient rounded once
                eps = torch.finfo(g.dtype).eps
                torch.testing.assert_close(g, r, rtol=eps, atol=eps * magnitude(m), equal_nan=True)
            else:  # computed in the result's dtype, cast to the operand's: the less precise of the two
                computed = max(g.dtype, dtype, key=lambda t: torch.finfo(t).eps)
                assert_close(g, r, computed, scale=None if m is None else magnitude(m))
        return
    assert_half_close(out, ref, exact, m_out)
    for g, r, e, m, slack in zip(grads, ref_grads, exact_grads, m_grads, slack_grads):
        assert (g is None) == (r is None)
        if r is not None:
            assert_half_close(g, r, e, m, slack)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", ["relu", "sigmoid", "tanh", "leaky_relu"])
@SETTINGS
@given(data=st.data(), shape=shapes(), dtype=dtypes, slope=st.floats(-2.0, 2.0))
def test_activations(backend, device, op, data, shape, dtype, slope):
    x = data.draw(tensors(shape))

    def magnitudes(views, g):  # relu and leaky_relu scale g; sigmoid and tanh cancel near saturation
        if op in ("relu", "leaky_relu"):
            return None, [g.abs() * max(1.0, abs(slope))]
        return None, [output_gradient_magnitude(op, getattr(torch, op)(views[0]), g)]

    if op == "leaky_relu":
        _compare(backend, device, lambda t: PF.leaky_relu(t, slope), lambda t: F.leaky_relu(t, slope), [x], dtype,
                 magnitudes=magnitudes)
    else:
        _compare(backend, device, getattr(PF, op), getattr(torch, op), [x], dtype, magnitudes=magnitudes)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast: the second drops leading dims and sets some of the rest to 1 (or the first)."""
    shape = draw(shapes())
    keep = draw(st.integers(0, len(shape)))
    other = [1 if draw(st.booleans()) else n for n in shape[len(shape) - keep:]]
    return (shape, other) if draw(st.booleans()) else (other, shape)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), shapes_=broadcast_pair(), dtypes_=st.tuples(dtypes, dtypes),
       alpha=st.sampled_from([1, -1, 0.5, 2.5]))
def test_add(backend, device, data, shapes_, dtypes_, alpha):
    """Broadcasting, and type promotion between the two operands' dtypes."""
    a, b = data.draw(tensors(shapes_[0])), data.draw(tensors(shapes_[1]))

    def magnitudes(views, g):  # a sum over broadcast dims cancels: its terms are |g|
        va, vb = (v.abs().requires_grad_() for v in views)
        out = torch.add(va, vb, alpha=abs(alpha))
        return out.detach(), torch.autograd.grad(out, [va, vb], g.abs())

    _compare(backend, device, lambda x, y: PF.add(x, y, alpha=alpha), lambda x, y: torch.add(x, y, alpha=alpha),
             [a, b], dtypes_, magnitudes=magnitudes)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), lead=st.lists(sizes, max_size=2), k=sizes, n=sizes, bias=st.booleans(), dtype=dtypes)
def test_linear(backend, device, data, lead, k, n, bias, dtype):
    if _numel(lead) * max(k, n) > MAX_ELEMENTS:
        return
    args = [data.draw(tensors([*lead, k])), data.draw(tensors([n, k]))] + ([data.draw(tensors([n]))] if bias else [])

    def magnitudes(views, g):
        x, w, b = views[0], views[1], views[2] if bias else None
        rows = _numel(lead)
        x2, g2 = x.reshape(rows, k), g.reshape(rows, n)
        m_y, [(m_w, m_b)], m_x = product_magnitudes(x2, [(w, b, None)], g2)
        return m_y.reshape(g.shape), [m_x.reshape(x.shape), m_w] + ([m_b] if bias else [])

    _compare(backend, device, PF.linear, F.linear, args, dtype, magnitudes=magnitudes)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), n=st.one_of(st.integers(0, 6), st.integers(16, 70)), c=st.integers(1, 40),
       spatial=st.lists(st.integers(0, 3), max_size=2), probabilities=st.booleans(), weighted=st.booleans(),
       reduction=st.sampled_from(["none", "mean", "sum"]), smoothing=st.sampled_from([0.0, 0.1, 0.7]),
       ignore=st.booleans(), dtype=dtypes)
def test_cross_entropy(backend, device, data, n, c, spatial, probabilities, weighted, reduction, smoothing, ignore,
                       dtype):
    """More than 16 classes and rows in whole blocks of a vector reach both CPU paths (a row per vector lane for
    at most 16 classes, a row at a time past that)."""
    if n * c * _numel(spatial) > MAX_ELEMENTS:
        return
    logits = data.draw(tensors([n, c, *spatial]))
    if probabilities:
        target = torch.softmax(data.draw(tensors([n, c, *spatial])).value(), dim=1).to(dtype)
    else:
        seed = data.draw(st.integers(0, 2**31 - 1))
        target = torch.randint(0, c, (n, *spatial), generator=torch.Generator().manual_seed(seed))
        if ignore and target.numel():
            target.view(-1)[::2] = 2  # an ignored class index that is also a real class
    target = target.to(device)
    weight = data.draw(tensors([c], low=0.1, high=2.0)).value().to(device, dtype) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=smoothing, ignore_index=2 if ignore else -100)
    x_shape = (n, c, *spatial)

    def terms(g):
        return gradient_terms(torch.empty(x_shape), target, g, weight, **kw)

    def magnitudes(views, g):  # p - y' cancels to 0 for one class: its terms are g w / denominator
        return None, [torch.full(x_shape, terms(g), dtype=torch.float64, device=g.device)]

    _compare(backend, device, lambda x, t, w: PF.cross_entropy(x, t, w, **kw),
             lambda x, t, w: F.cross_entropy(x, t, w, **kw), [logits], dtype, others=(target, weight),
             magnitudes=magnitudes)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), shape=shapes(), dtype=dtypes, reduction=st.sampled_from(["none", "mean", "sum"]),
       weighted=st.booleans(), pos_weighted=st.booleans())
def test_pointwise_losses(backend, device, data, shape, dtype, reduction, weighted, pos_weighted):
    x, y = data.draw(tensors(shape)), data.draw(tensors(shape, low=0.0, high=1.0))
    _compare(backend, device, lambda a, b: PF.mse_loss(a, b, reduction=reduction),
             lambda a, b: F.mse_loss(a, b, reduction=reduction), [x, y], dtype)
    weight = data.draw(tensors(shape, low=0.1, high=2.0)).value().to(device, dtype) if weighted else None
    pos_weight = (data.draw(tensors(shape[-1:], low=0.1, high=3.0)).value().to(device, dtype)
                  if pos_weighted and shape else None)
    _compare(backend, device,
             lambda a, b, w, pw: PF.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw),
             lambda a, b, w, pw: F.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw),
             [x, y], dtype, others=(weight, pos_weight))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), lead=st.lists(sizes, max_size=2), widths=st.lists(st.integers(1, 40), min_size=2, max_size=4),
       activation=st.sampled_from(["relu", "sigmoid", None]), output_activation=st.sampled_from(["sigmoid", None]),
       dtype=dtypes)
def test_fused_mlp(backend, device, data, lead, widths, activation, output_activation, dtype):
    if _numel(lead) * max(widths) > MAX_ELEMENTS:
        return
    layers = len(widths) - 1
    drawn = [data.draw(tensors([*lead, widths[0]]))]
    drawn += [data.draw(tensors([widths[i + 1], widths[i]], low=-1, high=1)) for i in range(layers)]
    drawn += [data.draw(tensors([widths[i + 1]], low=-1, high=1)) for i in range(layers)]
    acts = [activation] * (layers - 1) + [output_activation]

    def theirs(x, *params):
        for w, b, act in zip(params[:layers], params[layers:], acts):
            x = TORCH_ACTIVATIONS[act](F.linear(x, w, b))
        return x

    def ours(x, *params):
        return PF.fused_mlp(x, list(params[:layers]), list(params[layers:]), activation, output_activation)

    def magnitudes(views, g):
        rows = _numel(lead)
        x, params = views[0].reshape(rows, widths[0]), views[1:]
        net, g_rows = list(zip(params[:layers], params[layers:], acts)), g.reshape(rows, widths[-1])
        m_y, layer_m, m_x = product_magnitudes(x, net, g_rows, rounded_to=dtype)
        layer_s, s_x = relu_kink_slack(x, net, g_rows, rounded_to=dtype)
        return (m_y.reshape(g.shape), [m_x.reshape(views[0].shape), *(m for m, _ in layer_m), *(m for _, m in layer_m)],
                [s_x.reshape(views[0].shape), *(s for s, _ in layer_s), *(s for _, s in layer_s)])

    _compare(backend, device, ours, theirs, drawn, dtype, magnitudes=magnitudes)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@SETTINGS
@given(data=st.data(), lead=st.lists(sizes, max_size=2), h=st.integers(1, 40), v=st.integers(1, 40),
       bias=st.booleans(), reduction=st.sampled_from(["none", "mean", "sum"]), smoothing=st.sampled_from([0.0, 0.1]),
       ignore=st.booleans(), chunk_rows=st.integers(1, 8), dtype=dtypes)
def test_linear_cross_entropy(backend, device, data, lead, h, v, bias, reduction, smoothing, ignore, chunk_rows,
                              dtype):
    """Against torch's cross_entropy(linear(...)); chunks of a few rows, so that several chunks and a ragged last
    one are the rule."""
    if _numel(lead) * max(h, v) > MAX_ELEMENTS:
        return
    drawn = [data.draw(tensors([*lead, h])), data.draw(tensors([v, h], low=-1, high=1))]
    drawn += [data.draw(tensors([v]))] if bias else []
    seed = data.draw(st.integers(0, 2**31 - 1))
    target = torch.randint(0, v, lead, generator=torch.Generator().manual_seed(seed)).to(device)
    if ignore and target.numel():
        target.view(-1)[::3] = -100
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    chunk = chunk_rows * v * (8 if dtype == torch.float64 else 4)

    def ours(x, w, b=None):
        return PF.linear_cross_entropy(x, w, target, linear_bias=b, chunk_bytes=chunk, **kw)

    def theirs(x, w, b=None):
        loss = F.cross_entropy(F.linear(x, w, b).reshape(-1, v), target.reshape(-1), **kw)
        return loss.reshape(target.shape) if reduction == "none" else loss

    def magnitudes(views, g):
        rows = _numel(lead)
        kept = max(int((target != -100).sum()), 1)
        x, w = views[0].reshape(rows, h), views[1]
        # a row's loss lse - z_t cancels where the target dominates: its terms, and the logits' own rounding
        z = x @ w.T + (views[2] if bias else 0)
        m_z = x.abs() @ w.abs().T + (views[2].abs() if bias else 0)
        m_row = z.logsumexp(1).abs() + z.abs().amax(1) + m_z.amax(1) if v else torch.zeros(rows, dtype=z.dtype)
        m_row = m_row * (target.reshape(-1) != -100)
        m_loss = m_row.reshape(target.shape) if reduction == "none" else m_row.sum() / (
            kept if reduction == "mean" else 1)
        # a row's logit gradient g (p - y') [/ kept rows] sums to at most 2 |g| over V
        g_rows = g.abs().reshape(-1).expand(rows) if reduction == "none" else g.abs().expand(rows)
        m_dz = (2 * g_rows / (kept if reduction == "mean" else 1)).unsqueeze(1).expand(rows, v)
        return m_loss, [(m_dz @ w.abs()).reshape(views[0].shape), m_dz.T @ x.abs()] + ([m_dz.sum(0)] if bias else [])

    _compare(backend, device, ours, theirs, drawn, dtype, magnitudes=magnitudes)
