"""Every op under stress: several Python threads at once, many calls without memory growth, and the same result
on every run for the same input."""
import threading

import pytest
import torch

from op_cases import OPS, run
from utils import MAX_GROWTH_PER_CALL, BACKEND_DEVICES, assert_close, magnitude, memory_growth_per_call, on


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_threads_calling_at_once_get_torch_results(backend, device, op):
    errors = []

    def worker(seed):
        try:
            torch.manual_seed(seed)
            ours, theirs, args = OPS[op](device, torch.float64, (33, 17))
            for _ in range(20):
                with on(backend):  # use_backend is per thread (a context variable)
                    out, grads, g = run(ours, args)
                ref, ref_grads, _ = run(theirs, args, g)
                assert_close(out, ref)
                for a, b in zip(grads, ref_grads):
                    assert_close(a, b)
        except Exception as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors[0]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_same_result_on_every_run(backend, device, op):
    ours, _, args = OPS[op](device, torch.float32, (3001, 19))
    with on(backend):
        out1, grads1, g = run(ours, args)
        out2, grads2, _ = run(ours, args, g)
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_no_memory_growth_per_call(backend, device):
    """Forward+backward calls (all ops in turn) keep no memory: the process grows by less than a leak of the
    smallest output per call would make it."""
    cases = [OPS[op](device, torch.float32, (16, 8)) for op in sorted(OPS)]
    state = {"i": 0}

    def call():
        ours, _, args = cases[state["i"] % len(cases)]
        state["i"] += 1
        with on(backend):
            run(ours, args)

    growth = memory_growth_per_call(call, device)
    assert growth < MAX_GROWTH_PER_CALL, f"memory grew by {growth:.0f} bytes per call"


def _grad_args(args):
    return [a for a in args if torch.is_tensor(a) and a.requires_grad]


def _viewed(args, layout):
    """Each argument that requires grad as a view of a fresh leaf (a strided slice, or an expand of one row),
    the leaves returned apart: the view reaches the op, the gradient is the leaf's."""
    leaves, views = [], []
    for a in args:
        if not (torch.is_tensor(a) and a.requires_grad and a.dim() >= 1 and a.shape[0] > 1):
            views.append(a)
            continue
        if layout == "strided":
            base = a.detach().new_empty((*a.shape[:-1], 2 * a.shape[-1])).uniform_(-2, 2)
            leaf = base.requires_grad_()
            view = leaf[..., ::2]
        else:
            leaf = a.detach()[:1].clone().requires_grad_()
            view = leaf.expand(a.shape)
        leaves.append(leaf)
        views.append(view)
    return leaves, views


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_views_of_the_inputs_match_torch(backend, device, op, layout):
    ours, theirs, args = OPS[op](device, torch.float64, (6, 5))
    leaves, views = _viewed(args, layout)
    with on(backend):
        out = ours(*views)
    ref = theirs(*views)
    g = torch.randn_like(ref)
    with on(backend):
        grads = torch.autograd.grad(out, leaves, g)
    ref_grads = torch.autograd.grad(ref, leaves, g)
    assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        # an expanded view's gradient sums a column of terms of about |g|: that sets its rounding
        assert_close(a, b, scale=magnitude(g) * a.numel())


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_retain_graph_and_gradient_accumulation(backend, device, op):
    """The origin notes: .grad sums over backward calls until zeroed; retain_graph keeps what backward needs."""
    ours, theirs, args = OPS[op](device, torch.float64, (6, 5))
    with on(backend):
        out = ours(*args).sum()
        out.backward(retain_graph=True)
        out.backward()
    doubled = [a.grad.clone() for a in _grad_args(args)]
    for a in _grad_args(args):
        a.grad = None
    theirs(*args).sum().backward()
    for ours_grad, a in zip(doubled, _grad_args(args)):
        assert_close(ours_grad, 2 * a.grad)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(backend, device, op, mode):
    """No graph is recorded (and in inference mode the output is an inference tensor), the values are torch's."""
    ours, theirs, args = OPS[op](device, torch.float64, (6, 5))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with context(), on(backend):
        out = ours(*args)
    with context():
        ref = theirs(*args)
    assert out.grad_fn is None and not out.requires_grad
    assert out.is_inference() == ref.is_inference()
    assert_close(out, ref)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("changed", ["input", "output"])
def test_in_place_change_of_a_saved_tensor_like_torch(backend, device, op, changed):
    """Changing in place a tensor that the backward needs (an input, or the output relu, sigmoid and tanh save)
    raises autograd's error, as torch does for its own op; where torch's backward does not need it, the
    gradient is torch's."""
    ours, theirs, args = OPS[op](device, torch.float64, (6, 5))

    def run(fn, backend_name):
        leaves = [a.detach().clone().requires_grad_() if torch.is_tensor(a) and a.requires_grad else a
                  for a in args]
        inputs = [a * 1 if torch.is_tensor(a) and a.requires_grad else a for a in leaves]  # not leaves: writable
        with on(backend_name):
            out = fn(*inputs)
        (inputs[0] if changed == "input" else out).add_(1)  # a new version of the tensor
        return torch.autograd.grad(out.sum(), [a for a in leaves if torch.is_tensor(a) and a.requires_grad])

    try:
        expected = run(theirs, "python")
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            run(ours, backend)
        return
    for a, b in zip(run(ours, backend), expected):
        assert_close(a, b)
