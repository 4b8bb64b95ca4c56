import warnings

import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
from utils import (BACKEND_DEVICES, COMPILED_DEVICES, FLOAT_DTYPES, HALF_DTYPES, assert_close, assert_half_close,
                   assert_raises_like, backward_aten_calls, grads, magnitude, make, on)

# Input shapes: (C), (N, C) with C = 1, 3, 17, around the vector widths (8, 16, 32) and past 1000,
# K-dim inputs (N, C, d1[, d2]) with position tiles full, partial and several, and empty batches. Rows in
# blocks of a vector (16 float, 8 double) with at most 16 classes take the CPU's row-per-lane path, the rest
# of the rows the row-at-a-time one: (37, 10), (16, 16), (40, 1) have both; (33, 17) only the latter.
SHAPES = [(7,), (1,), (5, 1), (4, 3), (6, 17), (3, 15), (3, 16), (3, 33), (2, 65), (3, 1031), (0, 5),
          (37, 10), (16, 16), (40, 1), (33, 17),
          (2, 3, 5), (2, 17, 70), (3, 4, 5, 6), (1, 2, 3, 131), (2, 5, 0)]
REDUCTIONS = ["mean", "sum", "none"]
SMOOTHING = [0.0, 0.1, 1.0]
IGNORE = -100


def classes(shape):
    return shape[0] if len(shape) == 1 else shape[1]


def class_target(shape, device, ignore="none", ignore_index=IGNORE):
    """Random class indices for an input of `shape`; some (about a third) or all set to ignore_index."""
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    t = torch.randint(0, classes(shape), tshape, device=device)
    if ignore == "some":
        t = torch.where(torch.rand(tshape, device=device) < 0.35, torch.full_like(t, ignore_index), t)
    elif ignore == "all":
        t = torch.full_like(t, ignore_index)
    return t


def prob_target(shape, dtype, device):
    dim = 0 if len(shape) == 1 else 1
    return torch.softmax(torch.randn(shape, dtype=torch.float64, device=device) * 2, dim=dim).to(dtype)


def check_against_torch(backend, x, target, **kw):
    """Loss and input gradient (for a random incoming gradient) of pyengine against torch."""
    with on(backend):
        loss = PF.cross_entropy(x, target, **kw)
        (grad,), g = grads(loss, [x])
    loss_ref = F.cross_entropy(x, target, **kw)
    (grad_ref,), _ = grads(loss_ref, [x], g)
    assert_close(loss, loss_ref)
    assert_close(grad, grad_ref, scale=gradient_terms(x, target, g, **kw))


def gradient_terms(x, target, g, weight=None, reduction="mean", ignore_index=IGNORE, **_):
    """The size of the terms of a logit's gradient g w (p - y') [/ denominator]: p and y' are at most 1. Where
    they cancel (one class: p = y' = 1) the gradient is 0 up to their rounding, far below this."""
    w = 1.0 if weight is None else magnitude(weight)
    if reduction != "mean":
        return magnitude(g) * w
    if target.is_floating_point():
        denom = target.numel() / max(classes(tuple(x.shape)), 1)
    else:
        kept = target[target != ignore_index]
        denom = float(kept.numel() if weight is None else weight.detach()[kept].sum())
    return magnitude(g) * w / denom if denom else 0.0


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("smoothing", SMOOTHING)
def test_class_targets_match_torch(backend, device, dtype, shape, reduction, weighted, ignore, smoothing):
    x = make(shape, dtype, device, requires_grad=True)
    t = class_target(shape, device, ignore)
    w = make((classes(shape),), dtype, device, low=0.1, high=2.0) if weighted else None
    check_against_torch(backend, x, t, weight=w, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", SMOOTHING)
def test_probability_targets_match_torch(backend, device, dtype, shape, reduction, weighted, smoothing):
    x = make(shape, dtype, device, requires_grad=True)
    w = make((classes(shape),), dtype, device, low=0.1, high=2.0) if weighted else None
    check_against_torch(backend, x, prob_target(shape, dtype, device), weight=w, reduction=reduction,
                        label_smoothing=smoothing)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("ignore_index", [0, 2])
@pytest.mark.parametrize("shape", [(9, 4), (2, 4, 19)], ids=str)
def test_ignore_index_inside_the_class_range(backend, device, ignore_index, shape):
    x = make(shape, torch.float64, device, requires_grad=True)
    t = class_target(shape, device)
    for reduction in REDUCTIONS:
        check_against_torch(backend, x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [(13, 37), (4, 1031), (2, 5, 67)], ids=str)
@pytest.mark.parametrize("kind", ["index", "index-weight-smooth", "prob-weight-smooth"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_precision_error_within_twice_torch(backend, device, dtype, shape, kind, reduction):
    x = make(shape, dtype, device, requires_grad=True)
    c = classes(shape)
    t = prob_target(shape, dtype, device) if kind.startswith("prob") else class_target(shape, device, "some")
    if not kind.startswith("prob"):
        t.view(-1)[0] = 0  # not every row ignored: a NaN mean has no error to compare
    w = make((c,), dtype, device, low=0.5, high=1.5) if "weight" in kind else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1 if "smooth" in kind else 0.0)
    with on(backend):
        loss = PF.cross_entropy(x, t, **kw)
        (grad,), g = grads(loss, [x])
    loss_torch = F.cross_entropy(x, t, **kw)
    (grad_torch,), _ = grads(loss_torch, [x], g)
    x64 = x.detach().double().requires_grad_()
    kw64 = dict(kw, weight=None if w is None else w.double())
    loss64 = F.cross_entropy(x64, t.double() if t.is_floating_point() else t, **kw64)
    (grad64,), _ = grads(loss64, [x64], g.double())
    assert_half_close(loss, loss_torch, loss64)
    assert_half_close(grad, grad_torch, grad64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)], ids=str)
def test_gradcheck(backend, device, kind, reduction, weighted, smoothing, shape):
    x = make(shape, torch.float64, device, requires_grad=True)
    t = prob_target(shape, torch.float64, device) if kind == "prob" else class_target(shape, device, "some")
    if kind == "index":
        t.view(-1)[0] = 1  # some row kept: the mean over none is NaN
    w = make((classes(shape),), torch.float64, device, low=0.1, high=2.0) if weighted else None
    with on(backend):
        assert torch.autograd.gradcheck(
            lambda x: PF.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=smoothing), (x,))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_noncontiguous_operands(backend, device, kind):
    x = make((6, 40), torch.float32, device, requires_grad=True)
    w = make((40, 2), torch.float32, device, low=0.1, high=2.0)[:, 1]
    xk = make((4, 9, 11), torch.float32, device, requires_grad=True)  # K-dim input seen through a transpose
    cases = [(x[:, ::2], 20, w[::2]), (x.t(), 6, None), (xk.transpose(1, 2), 11, None), (xk[:, :, ::3], 9, w[:9])]
    for xv, _c, wv in cases:
        shape = tuple(xv.shape)
        t = prob_target(shape, torch.float32, device) if kind == "prob" else class_target(shape, device, "some")
        t = torch.stack([t, t], -1)[..., 0]
        assert not t.is_contiguous()
        check_against_torch(backend, xv, t, weight=wv, label_smoothing=0.1)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_grad_accumulates_and_retain_graph(backend, device):
    x = make((7, 33), torch.float64, device, requires_grad=True)
    t = class_target((7, 33), device, "some")
    with on(backend):
        loss = PF.cross_entropy(x, t, label_smoothing=0.1)
        loss.backward(retain_graph=True)
        once = x.grad.clone()
        loss.backward()
    assert_close(x.grad, 2 * once)
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref, t, label_smoothing=0.1).backward()
    assert_close(once, x_ref.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("size_average,reduce", [(None, False), (False, None), (True, None), (False, True),
                                                  (True, False)])
def test_legacy_size_average_and_reduce(backend, device, size_average, reduce):
    x = make((6, 5), torch.float64, device, requires_grad=True)
    t = class_target((6, 5), device, "some")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_torch(backend, x, t, size_average=size_average, reduce=reduce)


def special_logits(dtype, device):
    """Rows with NaN, +inf, -inf, all -inf, and huge logits that only max-subtraction keeps finite."""
    inf, nan = float("inf"), float("nan")
    rows = [[1.0, 2.0, 3.0, 0.5], [nan, 1.0, 2.0, 3.0], [1.0, inf, 2.0, 3.0], [inf, inf, 0.0, 1.0],
            [-inf, 1.0, 2.0, 3.0], [-inf, -inf, -inf, -inf], [1e4, 0.0, 1.0, -1.0], [-1e30, 0.0, 1.0, 2.0],
            [1e4, -1e30, 5.0, 1e4], [-inf, -inf, 2.0, -inf], [nan, 1.0, 2.0, 3.0], [3e38, -3e38, 0.0, 1.0]]
    if dtype == torch.float32:
        # lse = 1e4 + log 2 rounds to a float32 ulp of 1e4 (5e-4): the saved float lse cannot do better, so in
        # float32 one logit dominates the huge row (lse exact); float64 keeps the tie.
        rows[8] = [1e4, -1e30, 5.0, 1e4 - 40]
    return torch.tensor(rows, dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("copies", [1, 3], ids=["12rows", "36rows"])  # 36: whole row-per-lane blocks too
def test_nan_inf_and_huge_logits_like_torch(backend, device, dtype, kind, reduction, weighted, smoothing, copies):
    x = special_logits(dtype, device).repeat(copies, 1).requires_grad_()
    n, c = x.shape
    if kind == "prob":
        t = prob_target((n, c), dtype, device)
        t[:, 1] = 0  # a zero probability on a -inf logit makes 0 * -inf = NaN, as in torch
    else:
        t = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1, 2, IGNORE, 0], device=device).repeat(copies)
    w = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=dtype, device=device) if weighted else None
    check_against_torch(backend, x, t, weight=w, reduction=reduction, label_smoothing=smoothing)
    if kind == "index" and reduction == "none" and not weighted:  # every finite row stays finite
        with on(backend):
            loss = PF.cross_entropy(x, t, reduction="none", label_smoothing=smoothing)
        assert torch.isfinite(loss[[0, 6, 7]]).all()


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_ignored_rows_give_zero_loss_and_gradient(backend, device):
    """Ignored rows: loss 0 even with NaN logits, gradient 0 (NaN for the NaN row, as torch's)."""
    x = make((4, 6), torch.float32, device)
    x[1, 2] = float("nan")
    x.requires_grad_()
    t = torch.tensor([1, IGNORE, 5, IGNORE], device=device)
    with on(backend):
        loss = PF.cross_entropy(x, t, reduction="none")
        loss.sum().backward()
    assert loss[1].item() == 0 and loss[3].item() == 0
    assert (x.grad[3] == 0).all()
    assert torch.isfinite(x.grad[[0, 2, 3]]).all()
    with on(backend):
        all_ignored = PF.cross_entropy(x.detach(), torch.full_like(t, IGNORE))
        summed = PF.cross_entropy(x.detach(), torch.full_like(t, IGNORE), reduction="sum")
    assert torch.isnan(all_ignored) and summed.item() == 0  # mean over no rows is 0/0, as in torch


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kw", [{}, dict(label_smoothing=0.1, reduction="sum")], ids=["mean", "smooth-sum"])
def test_large_vocabulary_rows(backend, device, kw):
    """Many classes per row (the LLM case) with a few strongly preferred ones. p_t - 1 cancels, and torch's
    own float32 gradient is off by up to ~1e-4 there, so pyengine's error against float64 may be at most
    twice torch's, element by element relative to the size of the terms p and y' (assert_half_close, which
    holds float32 to its own rounding)."""
    x = make((3, 50257), torch.float32, device, low=-5, high=5)
    t = torch.tensor([0, 50256, 31337], device=device)
    x[0, 0] += 20
    x[2, :100] += 10
    x.requires_grad_()
    with on(backend):
        loss = PF.cross_entropy(x, t, **kw)
        (grad,), g = grads(loss, [x])
    x64 = x.detach().double().requires_grad_()
    loss64 = F.cross_entropy(x64, t, **kw)
    (grad64,), _ = grads(loss64, [x64], g.double())
    (grad32,), _ = grads(F.cross_entropy(x, t, **kw), [x], g)
    assert_close(loss, loss64.float())
    eps = kw.get("label_smoothing", 0.0)
    y = F.one_hot(t, x.shape[1]).double() * (1 - eps) + eps / x.shape[1]
    terms = (torch.softmax(x64.detach(), 1) + y) * g.double().abs() / (1 if kw else len(t))
    assert_half_close(grad, grad32, grad64, terms)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_gradient_output(backend, device, dtype):
    """dx past 8 MB, odd row length: the CPU backward streams it past the caches from an unaligned row start."""
    shape = (64 if dtype == torch.float32 else 130, 32771)
    x = make(shape, dtype, device, requires_grad=True)
    t = class_target(shape, device, "some")
    with on(backend):
        loss = PF.cross_entropy(x, t, reduction="sum")
        (grad,), g = grads(loss, [x])
    (grad_torch,), _ = grads(F.cross_entropy(x, t, reduction="sum"), [x], g)
    if dtype == torch.float32:
        assert_close(grad, grad_torch)
    else:
        x64 = x.detach().double().requires_grad_()
        (grad64,), _ = grads(F.cross_entropy(x64, t, reduction="sum"), [x64], g.double())
        assert_half_close(grad, grad_torch, grad64)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_zero_classes(backend, device, kind):
    x = make((3, 0), torch.float64, device, requires_grad=True)
    if kind == "prob":
        t = torch.rand(3, 0, dtype=torch.float64, device=device)
    else:
        t = torch.full((3,), IGNORE, device=device)
    for reduction in REDUCTIONS:
        check_against_torch(backend, x, t, reduction=reduction)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_bad_input_raises_like_torch(backend, device):
    x = make((4, 3), torch.float32, device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 1], device=device)
    xk = make((2, 3, 5), torch.float32, device)
    # Out-of-range targets: IndexError on the CPU. On CUDA they trip a device-side assert (torch's and ours),
    # which ends the process's CUDA context, so test_cuda_out_of_range_target_is_a_python_error runs them apart.
    out_of_range = [] if device == "cuda" else [
        (x, torch.tensor([0, 1, 7, 1], device=device), {}, "Target 7 is out of bounds"),
        (x, torch.tensor([0, -1, 2, 1], device=device), {}, "Target -1 is out of bounds"),
        (xk, torch.full((2, 5), 3, device=device), {}, "Target 3 is out of bounds"),
        (x, torch.tensor([0, 1, 7, IGNORE], device=device), dict(label_smoothing=0.1, reduction="none"),
         "Target 7 is out of bounds"),
    ]
    long_or_byte = "expected target dtype to be Long or Byte, but got "

    def index_dtype(got):  # torch 2.14's words, and torch 2.11's
        return f"{long_or_byte}{got}|expected scalar type Long but found {got}"

    cases = out_of_range + [  # (input, target, kwargs, torch's key phrase)
        (x, t.int(), {}, index_dtype("Int")),
        (x, t.int(), dict(label_smoothing=0.1), index_dtype("Int")),
        (x, t, dict(reduction="avg"), "avg is not a valid value for reduction"),
        (x, t, dict(label_smoothing=1.5), r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
        (x, torch.rand(4, 3, device=device), dict(label_smoothing=1.5), "label_smoothing must be between"),
        (x, t, dict(weight=torch.ones(4, device=device)), "weight tensor should be defined either for all 3 classes"),
        (x, t, dict(weight=torch.ones(2, 3, device=device)), r"but got weight tensor of shape: \[2, 3\]"),
        (x, torch.rand(4, 3, device=device), dict(weight=torch.ones(5, device=device)),
         "weight tensor should be defined either for all 3 classes"),
        (x, torch.tensor([0, 1, 2], device=device), {},  # batch mismatch
         r"Expected input batch_size \(4\) to match target batch_size \(3\)"),
        (xk, torch.zeros(2, 4, dtype=torch.long, device=device), {}, r"Expected target size \[2, 5\], got \[2, 4\]"),
        (xk, torch.zeros(2, 5, 1, dtype=torch.long, device=device), {}, r"Expected target size \[2, 5\]"),
        (x, torch.rand(4, 2, device=device), {}, "0D or 1D target tensor expected, multi-target not supported"),
        (x, torch.zeros(4, 2, dtype=torch.long, device=device), dict(weight=torch.ones(5, device=device)),
         "multi-target not supported"),  # the target's dims are checked before the weight
        (x, torch.rand(4, device=device), {}, index_dtype("Float")),
        (x, torch.zeros(4, 3, dtype=torch.long, device=device), {},
         "Expected floating point type for target with class probabilities, got Long"),
        (make((3,), torch.float32, device), torch.tensor([1, 2], device=device), {},
         "For 1D input, 1D target must have size 1, but got target size: 2"),
        (make((3,), torch.float32, device), torch.tensor(0.5, device=device), {}, index_dtype("Float")),
        # torch returns a loss for (C) logits and a (1,) target: the error is backward's, x needs no gradient
        (make((3,), torch.float32, device), torch.tensor([1], device=device), {}, "does not require grad"),
    ]
    for inp, target, kw, phrase in cases:
        def ours(inp=inp, target=target, kw=kw):
            with on(backend):
                PF.cross_entropy(inp, target, **kw).sum().backward()

        def theirs(inp=inp, target=target, kw=kw):
            F.cross_entropy(inp, target, **kw).sum().backward()

        assert_raises_like(theirs, ours, phrase)


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
def test_kernels_check_their_arguments(backend, device):
    """Called directly, the compiled kernels reject what would read or write out of bounds."""
    C = pyengine._backend._C
    x = make((3, 4, 2), torch.float32, device)
    t = torch.zeros(3, 2, dtype=torch.long, device=device)
    loss, lse, denom = C.cross_entropy_forward(x, t, None, IGNORE, 1, 0.0)
    g = torch.ones((), device=device)
    if device == "cpu":  # on CUDA a bad target is a device-side assert: see the subprocess test below
        bad_t = t.clone()
        bad_t[2, 1] = 4
        with pytest.raises(IndexError, match="Target 4 is out of bounds"):
            C.cross_entropy_backward(g, x, bad_t, None, lse, denom, IGNORE, 1, 0.0)
        with pytest.raises(IndexError, match="Target 4 is out of bounds"):
            C.cross_entropy_forward(x, bad_t, None, IGNORE, 1, 0.0)
    with pytest.raises(RuntimeError, match=r"lse must have shape \[3, 2\], got \[2, 2\]"):
        C.cross_entropy_backward(g, x, t, None, lse[:2], denom, IGNORE, 1, 0.0)
    with pytest.raises(RuntimeError, match=r"grad_loss must have shape \[3, 2\], got \[3, 3\]"):
        C.cross_entropy_backward(torch.ones(3, 3, device=device), x, t, None, lse, denom, IGNORE, 0, 0.0)
    with pytest.raises(RuntimeError, match=r"weight must have shape \[4\], got \[5\]"):
        C.cross_entropy_forward(x, t, torch.ones(5, device=device), IGNORE, 1, 0.0)
    with pytest.raises(RuntimeError, match="logits must be contiguous"):
        C.cross_entropy_forward(x.transpose(1, 2), t, None, IGNORE, 1, 0.0)
    with pytest.raises(ValueError, match="reduction must be 0 .none., 1 .mean. or 2 .sum., got 3"):
        C.cross_entropy_forward(x, t, None, IGNORE, 3, 0.0)


@pytest.mark.parametrize("backend,device", [p for p in COMPILED_DEVICES if p.values[1] == "cuda"])
def test_cuda_out_of_range_target_is_a_python_error(backend, device):
    """A target outside [0, C) reaches the user as a Python exception (at the next synchronization), never as a
    silent result. Run in a fresh process, since a device-side assert ends that process's CUDA context."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, pyengine, pyengine.functional as PF
        x = torch.randn(4, 3, device="cuda")
        try:
            with pyengine.use_backend("cuda"):
                loss = PF.cross_entropy(x, torch.tensor([0, 1, 7, 1], device="cuda"))
            print(loss.item())
        except RuntimeError as e:  # since torch 2.8 a torch.AcceleratorError, a RuntimeError
            print("raised RuntimeError:", type(e).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "raised RuntimeError" in out.stdout, (out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize("backend,device", COMPILED_DEVICES)
@pytest.mark.parametrize("shape", [(1001, 10), (301, 40)], ids=str)
def test_results_do_not_depend_on_the_thread_count(backend, device, shape):
    """Rows split over threads by the thread count, but each row's path (a row per lane or a row at a time) and
    every sum's order by the shape alone: the same bits with one thread or two."""
    x = make(shape, torch.float32, device, requires_grad=True)
    t = class_target(shape, device, "some")
    results, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with on(backend):
                loss = PF.cross_entropy(x, t, label_smoothing=0.1)
                results.append((loss, *torch.autograd.grad(loss, x)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 2)], ids=str)
def test_class_weight_that_requires_grad_like_torch(backend, device, shape):
    """A learnable class weight: torch refuses it for class-index targets (a silent None .grad would hide a
    weight that never learns) and differentiates it for probability targets; so does pyengine."""
    x = make(shape, torch.float64, device, requires_grad=True)
    w = make((shape[1],), torch.float64, device, low=0.1, high=2.0, requires_grad=True)
    t = class_target(shape, device, "some")
    phrase = "not differentiable with respect to argument 'weight'"
    with on(backend):
        assert_raises_like(lambda: F.cross_entropy(x, t, weight=w), lambda: PF.cross_entropy(x, t, weight=w), phrase)
        assert_raises_like(lambda: F.cross_entropy(x.detach(), t, weight=w),
                           lambda: PF.cross_entropy(x.detach(), t, weight=w), phrase)
        with pytest.raises(RuntimeError, match=phrase):  # applied directly: when the gradient is asked for
            pyengine.autograd.SoftmaxCrossEntropyFunction.apply(x, t, w)[0].backward()
        with torch.no_grad():
            assert_close(PF.cross_entropy(x, t, weight=w), F.cross_entropy(x, t, weight=w))
    y = prob_target(shape, torch.float64, device)
    for reduction in REDUCTIONS:
        for smoothing in (0.0, 0.2):
            kw = dict(weight=w, reduction=reduction, label_smoothing=smoothing)
            with on(backend):
                loss = PF.cross_entropy(x, y, **kw)
                ours, g = grads(loss, [x, w])
            ref = F.cross_entropy(x, y, **kw)
            theirs, _ = grads(ref, [x, w], g)
            assert_close(loss, ref)
            for a, b in zip(ours, theirs):
                assert_close(a, b)
            with on(backend):
                assert torch.autograd.gradcheck(
                    lambda wt, kw=kw: PF.cross_entropy(x.detach(), y, **{**kw, "weight": wt}), (w,))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_backward_makes_no_zeros_for_the_saved_gradient(backend, device):
    # the forward's non-differentiable outputs (the gradient it computed, lse, the divisor) get no materialized
    # zero gradients: for the saved gradient that would be a logits-sized block at every backward
    logits = make((33, 70), torch.float32, device, requires_grad=True)
    t = torch.randint(0, 70, (33,), device=device)
    with on(backend):
        loss = PF.cross_entropy(logits, t)
    calls = backward_aten_calls(loss)
    assert not [c for c in calls if c[0].startswith("zeros")], calls
    ref = logits.detach().requires_grad_()
    F.cross_entropy(ref, t).backward()
    assert_close(logits.grad, ref.grad)
