import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
from pyengine.ops.linear_cross_entropy import CHUNK_ENV
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close,
                   assert_raises_like, backward_aten_calls, grads, magnitude, make, mkldnn_enabled, on)

IGNORE = -100
REDUCTIONS = ["mean", "sum", "none"]
# (leading dims, H, V): 0 rows, one class, odd sizes, leading batch dims, a vocabulary past the vector widths, and
# whole blocks of rows with a row per vector lane (up to 16 classes) and a ragged last block.
SHAPES = [((0,), 5, 7), ((1,), 3, 1), ((7,), 5, 13), ((2, 3), 4, 17), ((33,), 17, 70), ((37,), 5, 10)]


def row_bytes(v, dtype):
    return v * (8 if dtype == torch.float64 else 4)


def budget(v, dtype):
    """chunk_bytes with room for 3 rows and a bit: several chunks and a ragged last one."""
    return 3 * row_bytes(v, dtype) + 5


def targets(lead, v, device, ignore="none", ignore_index=IGNORE):
    t = torch.randint(0, v, lead, device=device)
    if ignore == "some":
        t = torch.where(torch.rand(lead, device=device) < 0.35, torch.full_like(t, ignore_index), t)
        if t.numel():
            t.view(-1)[0] = 0
    elif ignore == "all":
        t = torch.full_like(t, ignore_index)
    return t


def params(lead, h, v, dtype, device, bias=True, scale=1.0):
    x = make((*lead, h), dtype, device, requires_grad=True)
    w = (make((v, h), dtype, device, low=-scale, high=scale)).requires_grad_()
    b = make((v,), dtype, device, requires_grad=True) if bias else None
    return x, w, b


def composition(x, w, b, t, **kw):
    """torch's unfused linear + cross_entropy over the flattened rows; 'none' in target's shape."""
    loss = F.cross_entropy(F.linear(x.reshape(-1, x.shape[-1]), w, b), t.reshape(-1), **kw)
    return loss.reshape(t.shape) if kw.get("reduction") == "none" else loss


def check_against_torch(backend, x, w, b, t, chunk_bytes=None, **kw):
    params = [p for p in (x, w, b) if p is not None and p.requires_grad]
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=chunk_bytes, **kw)
        ours, g = grads(loss, params)
    ref = composition(x, w, b, t, **kw)
    theirs, _ = grads(ref, params, g)
    assert_close(loss, ref)
    scales = gradient_terms(x, w, t, g, kw.get("reduction", "mean"))
    for a, r, p in zip(ours, theirs, params):
        assert_close(a, r, scale=scales[0 if p is x else 1 if p is w else 2])


def gradient_terms(x, w, t, g, reduction):
    """The sizes of the sums of |terms| in dx, dW and db, where each row's logit gradient dz = g (p - y')
    [/ kept rows] has sum_v |dz_v| <= 2 g: they cancel to 0 up to rounding when p = y' (one class)."""
    kept = int((t != IGNORE).sum())
    per_row = 2 * magnitude(g) / (max(kept, 1) if reduction == "mean" else 1)
    rows = max(t.numel(), 1)
    return per_row * magnitude(w), per_row * rows * magnitude(x), per_row * rows


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_torch_composition(backend, device, dtype, shape, reduction, bias, ignore, smoothing):
    lead, h, v = shape
    x, w, b = params(lead, h, v, dtype, device, bias)
    t = targets(lead, v, device, ignore)
    check_against_torch(backend, x, w, b, t, budget(v, dtype), reduction=reduction,
                        label_smoothing=smoothing)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_gradcheck(backend, device, reduction, bias, smoothing):
    x, w, b = params((19,), 4, 6, torch.float64, device, bias)  # two blocks of 8 rows in lanes, and 3 rows
    t = targets((19,), 6, device, "some")
    chunk = 3 * row_bytes(6, torch.float64)
    with on(backend):
        assert torch.autograd.gradcheck(
            lambda *p: PF.linear_cross_entropy(p[0], p[1], t, linear_bias=p[2] if bias else None,
                                               reduction=reduction, label_smoothing=smoothing, chunk_bytes=chunk),
            (x, w, b) if bias else (x, w))


def logit_gradient_magnitudes(x64, w64, b64, t, g, **kw):
    """assert_half_close's magnitudes for dx, dW and db: the sizes of the terms of dx = dz W, dW = dz^T x and
    db = sum_r dz, from |dz| = |d loss / d logits| of the float64 reference. Each sum can cancel far below them,
    and a half-precision product's rounding error scales with them (with GEMMs in float16/bfloat16, dz itself is
    rounded to the dtype, as torch's is)."""
    z = F.linear(x64, w64, b64).detach().requires_grad_()
    (dz,) = torch.autograd.grad(F.cross_entropy(z, t, **kw), z, g.double())
    dz = dz.abs()
    return dz @ w64.abs(), dz.T @ x64.abs(), dz.sum(0)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
# (N, H, V, rows per chunk): odd sizes in one chunk and in several (a ragged last one), a wider vocabulary
# and the notes' layer, small enough for the CPU's one-pass kernels (run in float32 for the half dtypes)
@pytest.mark.parametrize("n,h,v,rows", [(37, 65, 130, None), (37, 65, 130, 5), (37, 64, 300, 5), (759, 8, 10, None)],
                         ids=["one-chunk", "chunks", "v300", "small"])
# the compiled kernels' GEMMs in the half dtype, or widened to float32 (what a CPU without fast half products runs)
@pytest.mark.parametrize("half_gemm", ["on", "off"])
def test_half_precision_error_within_twice_torch(backend, device, dtype, reduction, smoothing, n, h, v, rows,
                                                 half_gemm, monkeypatch):
    monkeypatch.setenv("PYENGINE_HALF_GEMM", half_gemm)
    x, w, b = params((n,), h, v, dtype, device, scale=0.3)
    t = targets((n,), v, device, "some")
    kw = dict(reduction=reduction, label_smoothing=smoothing)
    inputs = [x, w, b]
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=rows and rows * row_bytes(v, dtype), **kw)
        ours, g = grads(loss, inputs)
    ref = composition(x, w, b, t, **kw)
    theirs, _ = grads(ref, inputs, g)
    p64 = [p.detach().double().requires_grad_() for p in inputs]
    ref64 = composition(*p64, t, **kw)
    exact, _ = grads(ref64, p64, g.double())
    assert_half_close(loss, ref, ref64)
    for a, r, e, m in zip(ours, theirs, exact, logit_gradient_magnitudes(*p64, t, g, **kw)):
        assert_half_close(a, r, e, m)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_weight_gradient_accumulates_in_float32(backend, device):
    """Many chunks of bfloat16 rows: dW summed in float32 stays near the float64 result, where a sum of
    per-chunk bfloat16 partials would drift."""
    x, w, b = params((64,), 32, 50, torch.bfloat16, device, scale=0.3)
    t = targets((64,), 50, device)
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum",
                                       chunk_bytes=row_bytes(50, torch.float32))
        (dw,), g = grads(loss, [w])
    p64 = [p.detach().double().requires_grad_() for p in (x, w, b)]
    (dw64,), _ = grads(composition(*p64, t, reduction="sum"), [p64[1]], g.double())
    assert (dw.double() - dw64).abs().max() <= 2 * dw64.abs().max() * 2 ** -8


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_noncontiguous_operands(backend, device, reduction):
    x = make((5, 6), torch.float32, device).t().requires_grad_()  # (6, 5) seen through a transpose
    w = make((5, 11), torch.float32, device).t().requires_grad_()  # (11, 5)
    b = make((11, 2), torch.float32, device)[:, 1].requires_grad_()
    t = torch.stack([targets((6,), 11, device, "some")] * 2, -1)[:, 0]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous() or t.is_contiguous())
    check_against_torch(backend, x, w, b, t, 2 * row_bytes(11, torch.float32), reduction=reduction,
                        label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("ignore_index", [0, 3])
def test_ignore_index_inside_the_class_range(backend, device, ignore_index):
    x, w, b = params((9,), 4, 5, torch.float64, device)
    t = targets((9,), 5, device)
    for reduction in REDUCTIONS:
        check_against_torch(backend, x, w, b, t, 2 * row_bytes(5, torch.float64), reduction=reduction,
                            ignore_index=ignore_index, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ignored_rows_give_zero_loss_and_gradient(backend, device):
    x, w, b = params((4,), 3, 6, torch.float32, device)
    t = torch.tensor([1, IGNORE, 5, IGNORE], device=device)
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, reduction="none")
        loss.sum().backward()
    assert loss[1].item() == 0 and loss[3].item() == 0
    assert (x.grad[[1, 3]] == 0).all()
    with on(backend):
        mean = PF.linear_cross_entropy(x, w, torch.full_like(t, IGNORE), linear_bias=b)
        (dx, dw, db), _ = grads(mean, [x, w, b])
    assert torch.isnan(mean)  # a mean over no rows is 0/0, as torch's
    assert not (dx.any() or dw.any() or db.any())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, False, False)], ids=["x", "weight", "bias", "none"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_only_some_inputs_need_grad(backend, device, which, reduction):
    x, w, b = params((8,), 5, 9, torch.float64, device)
    for p, need in zip((x, w, b), which):
        p.requires_grad_(need)
    t = targets((8,), 9, device, "some")
    if any(which):
        check_against_torch(backend, x, w, b, t, 3 * row_bytes(9, torch.float64), reduction=reduction)
    else:
        with on(backend):
            loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
        assert not loss.requires_grad
        assert_close(loss, composition(x, w, b, t, reduction=reduction))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_no_grad_forward_and_1d_input(backend, device):
    x, w, b = params((), 6, 10, torch.float64, device)
    t = torch.tensor(4, device=device)
    with on(backend), torch.no_grad():
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
    assert_close(loss, F.cross_entropy(F.linear(x, w, b), t, label_smoothing=0.1).detach())
    check_against_torch(backend, x, w, b, t)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_budget_from_environment_and_results_independent_of_chunking(backend, device, monkeypatch):
    x, w, b = params((50,), 8, 40, torch.float64, device)
    t = targets((50,), 40, device, "some")
    results = []
    for rows in (50, 7, 1):
        monkeypatch.setenv(CHUNK_ENV, str(rows * row_bytes(40, torch.float64)))
        with on(backend):
            loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)
            results.append([loss, *torch.autograd.grad(loss, [x, w, b])])
    for other in results[1:]:
        for a, r in zip(other, results[0]):
            assert_close(a, r)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_accumulates_and_retain_graph(backend, device):
    x, w, b = params((6,), 4, 7, torch.float64, device)
    t = targets((6,), 7, device, "some")
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b)
        loss.backward(retain_graph=True)
        once = w.grad.clone()
        loss.backward()
    assert_close(w.grad, 2 * once)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_input_raises_like_torch(backend, device):
    x, w, b = params((4,), 3, 5, torch.float32, device)
    t = torch.tensor([0, 1, 2, 4], device=device)
    out_of_range = [] if device == "cuda" else [  # CUDA: a device-side assert, as torch's (see test_cross_entropy)
        (x, w, b, torch.tensor([0, 1, 5, 1], device=device), {}, "Target 5 is out of bounds"),
        (x, w, b, torch.tensor([0, -1, 2, IGNORE], device=device), dict(reduction="none", label_smoothing=0.1),
         "Target -1 is out of bounds"),
    ]
    # the errors torch's linear + cross_entropy share with pyengine's functional (the shape checks of torch 2.14's
    # F.linear_cross_entropy, which pyengine's signature follows: tests/test_linear_cross_entropy_api.py)
    cases = out_of_range + [  # (x, weight, bias, target, kwargs, torch's key phrase)
        (x, w.double(), b, t, {}, "have the same dtype"),
        (x, w, b.double(), t, {}, "have the same dtype"),
        (x, w, b, t.int(), {},  # torch 2.14's words, and torch 2.11's
         "expected target dtype to be Long or Byte, but got Int|expected scalar type Long but found Int"),
        (x, w, b, t.float(), {},
         "expected target dtype to be Long or Byte, but got Float|expected scalar type Long but found Float"),
        (x, w, b, t[:3], {}, r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
        (x, w, b, t, dict(reduction="avg"), "avg is not a valid value for reduction"),
        (x, w, b, t, dict(label_smoothing=1.5), "label_smoothing must be between 0.0 and 1.0"),
        (x.detach().long(), w.detach().long(), None, t, {}, "not implemented for 'Long'"),
    ]
    for xi, wi, bi, ti, kw, phrase in cases:
        def ours(xi=xi, wi=wi, bi=bi, ti=ti, kw=kw):
            with on(backend):
                PF.linear_cross_entropy(xi, wi, ti, linear_bias=bi, **kw).sum().backward()

        def theirs(xi=xi, wi=wi, bi=bi, ti=ti, kw=kw):
            composition(xi, wi, bi, ti, **kw).sum().backward()

        assert_raises_like(theirs, ours, phrase)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_kernels_check_their_arguments(backend, device):
    """Called directly, the compiled kernels reject what would read or write out of bounds."""
    C = pyengine._backend._C
    x, w, b = (p.detach() for p in params((3,), 4, 5, torch.float32, device))
    t = torch.zeros(3, dtype=torch.long, device=device)
    loss, lse, denom, dx, dw, db = C.linear_cross_entropy_forward(x, w, b, t, IGNORE, 0, 0.0, True, True, True, 64)
    assert dx is None and dw is None and db is None  # reduction none: gradients come from the backward
    g = torch.ones(3, device=device)
    bad = [  # (call, what its message must say)
        (lambda: C.linear_cross_entropy_forward(x, w[:, :3], b, t), r"weight must have shape \[5, 4\], got \[5, 3\]"),
        (lambda: C.linear_cross_entropy_forward(x, w, b[:4], t), r"bias must have shape \[5\], got \[4\]"),
        (lambda: C.linear_cross_entropy_forward(x, w, b, t[:2]), r"target must have shape \[3\], got \[2\]"),
        (lambda: C.linear_cross_entropy_forward(x, w, b, t.int()), "target must have dtype Long, got Int"),
        (lambda: C.linear_cross_entropy_forward(x, w.double(), b, t), "weight has dtype Double but the other"),
        (lambda: C.linear_cross_entropy_forward(x, w, b, t, chunk_bytes=0), "chunk_bytes must be positive, got 0"),
        (lambda: C.linear_cross_entropy_backward(g[:2], x, w, b, t, lse), r"grad_loss must have shape \[3\]"),
        (lambda: C.linear_cross_entropy_backward(g, x, w, b, t, lse[:2]), r"lse must have shape \[3\], got \[2\]"),
        (lambda: C.linear_cross_entropy_backward(g.double(), x, w, b, t, lse), "grad_loss must have dtype Float"),
    ]
    for call, phrase in bad:
        with pytest.raises(RuntimeError, match=phrase):
            call()
    with pytest.raises(ValueError, match="reduction must be 0 .none., 1 .mean. or 2 .sum., got 3"):
        C.linear_cross_entropy_forward(x, w, b, t, IGNORE, 3)
    if device == "cpu":
        with pytest.raises(IndexError, match="Target 5 is out of bounds"):
            C.linear_cross_entropy_forward(x, w, b, torch.tensor([0, 5, 1], device=device))


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_half_gemm_override_is_checked(backend, device, monkeypatch):
    """PYENGINE_HALF_GEMM takes on, off or auto; anything else says so rather than picking a path silently."""
    # 65 features: past the one-pass kernels (which run half operands in float32), into the chunk loop's GEMMs
    x, w, b = (p.detach() for p in params((3,), 65, 5, torch.bfloat16, device))
    t = torch.zeros(3, dtype=torch.long, device=device)
    monkeypatch.setenv("PYENGINE_HALF_GEMM", "yes")
    with pytest.raises(RuntimeError, match="PYENGINE_HALF_GEMM=yes: choose on, off or auto"):
        pyengine._backend._C.linear_cross_entropy_forward(x, w, b, t)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_of_the_usual_loss_makes_no_weight_sized_tensor(backend, device, reduction):
    # the forward computed the gradients: the backward of an incoming 1 hands them over (autograd takes dW as
    # weight.grad without a copy), and no zeros are made for the gradients of the non-differentiable outputs
    x = make((37, 12), torch.float32, device, requires_grad=True)
    w = make((29, 12), torch.float32, device, requires_grad=True)
    b = make((29,), torch.float32, device, requires_grad=True)
    t = torch.randint(0, 29, (37,), device=device)
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction)
    calls = backward_aten_calls(loss)
    made = [c for c in calls if c[1] in (tuple(w.shape), tuple(x.shape)) and c[0] not in ("detach", "view")]
    assert not made and not [c for c in calls if c[0].startswith("zeros")], calls
    x2, w2, b2 = (a.detach().requires_grad_() for a in (x, w, b))
    F.cross_entropy(F.linear(x2, w2, b2), t, reduction=reduction).backward()
    for ours, ref in ((x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert_close(ours, ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_chunk_logits_through_onednn_and_blas(backend, device, onednn, bias):
    # chunks of 64 rows x 130 -> 1030 classes: 8.6M multiply-adds each, which the CPU computes with oneDNN's
    # linear while torch.backends.mkldnn is on, at::addmm into the chunk buffer otherwise
    x = make((300, 130), torch.float32, device, requires_grad=True)
    w = make((1030, 130), torch.float32, device, requires_grad=True, low=-0.3, high=0.3)
    b = make((1030,), torch.float32, device, requires_grad=True) if bias else None
    t = torch.randint(0, 1030, (300,), device=device)
    inputs = [x, w] + ([b] if bias else [])
    with mkldnn_enabled(onednn), on(backend):
        loss = PF.linear_cross_entropy(x, w, t, linear_bias=b, chunk_bytes=64 * 1030 * 4)
        ours = torch.autograd.grad(loss, inputs)
    ref_loss = F.cross_entropy(F.linear(x, w, b), t)
    assert_close(loss, ref_loss)
    for g, g_ref in zip(ours, torch.autograd.grad(ref_loss, inputs)):
        assert_close(g, g_ref)
