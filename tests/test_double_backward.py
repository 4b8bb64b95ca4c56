"""Double backward: gradgradcheck for every op with a second derivative (linear, relu, sigmoid, tanh, leaky_relu,
add, mse_loss, binary_cross_entropy_with_logits), through the autograd Functions and through torch.ops.pyengine;
cross_entropy raises a clear error when its gradient is differentiated again, and never returns a silent zero."""
import pytest
import torch
import torch.nn.functional as F

import pyengine
import pyengine.functional as PF
from utils import BACKEND_DEVICES, on


def _away_from_zero(*shape, device):
    """Values in +-[0.2, 2]: relu and leaky_relu have a kink at 0 that finite differences must not straddle."""
    x = torch.empty(shape, dtype=torch.float64, device=device).uniform_(0.2, 2.0)
    return (x * torch.where(torch.rand(shape, device=device) < 0.5, -1.0, 1.0)).requires_grad_()


def _r(*shape, device, low=-2.0, high=2.0):
    return torch.empty(shape, dtype=torch.float64, device=device).uniform_(low, high).requires_grad_()


CASES = {
    "linear": lambda d: (PF.linear, (_r(4, 3, device=d), _r(5, 3, device=d), _r(5, device=d))),
    "linear_leading_dims": lambda d: (PF.linear, (_r(2, 3, 4, device=d), _r(2, 4, device=d))),
    "linear_sigmoid": lambda d: (lambda x, w, b: PF.linear(x, w, b, activation="sigmoid"),
                                 (_r(4, 3, device=d), _r(5, 3, device=d), _r(5, device=d))),
    # leading dims and an activation: act'(z) comes from the saved output, which must be the node's own output
    "linear_sigmoid_leading_dims": lambda d: (lambda x, w, b: PF.linear(x, w, b, activation="sigmoid"),
                                              (_r(2, 3, 4, device=d), _r(5, 4, device=d), _r(5, device=d))),
    "linear_relu": lambda d: (lambda x, w: PF.linear(x, w, activation="relu"),
                              (_away_from_zero(4, 1, device=d), _away_from_zero(5, 1, device=d))),
    "relu": lambda d: (PF.relu, (_away_from_zero(3, 5, device=d),)),
    "sigmoid": lambda d: (PF.sigmoid, (_r(3, 5, device=d),)),
    "tanh": lambda d: (PF.tanh, (_r(3, 5, device=d),)),
    "leaky_relu": lambda d: (lambda x: PF.leaky_relu(x, 0.1), (_away_from_zero(3, 5, device=d),)),
    "add": lambda d: (lambda a, b: PF.add(a, b, alpha=1.5), (_r(3, 5, device=d), _r(5, device=d))),
    "mse_loss_strided": lambda d: (PF.mse_loss, (_r(5, 3, device=d).t(), _r(3, 5, device=d))),
    "linear_strided": lambda d: (PF.linear, (_r(3, 4, device=d).t(), _r(2, 3, device=d), None)),
    "mse_loss": lambda d: (PF.mse_loss, (_r(3, 5, device=d), _r(3, 5, device=d))),
    "binary_cross_entropy_with_logits": lambda d: (
        lambda x, t: PF.binary_cross_entropy_with_logits(x, t, pos_weight=torch.full((5,), 2.0, device=d,
                                                                                  dtype=torch.float64)),
        (_r(3, 5, device=d), _r(3, 5, device=d, low=0.0, high=1.0))),
    # a fixed target: the compiled node computes the first gradient in the forward; create_graph must still reach x
    "binary_cross_entropy_with_logits_fixed_target": lambda d: (
        lambda x: PF.binary_cross_entropy_with_logits(x, torch.linspace(0, 1, 15, device=d, dtype=torch.float64)
                                                      .reshape(3, 5), reduction="sum"),
        (_r(3, 5, device=d),)),
}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradgradcheck(case, backend, device):
    fn, args = CASES[case](device)
    with on(backend):
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_second_derivative_matches_torch_in_a_gradient_penalty(backend, device):
    """A gradient penalty, the usual reason for create_graph=True: ||d loss / dx||^2 differentiated w.r.t. the
    weights, through linear, sigmoid and mse_loss, against torch's."""
    x, w, b, t = _r(6, 4, device=device), _r(3, 4, device=device), _r(3, device=device), _r(6, 3, device=device)

    def penalty_grads(lin, sig, mse):
        loss = mse(sig(lin(x, w, b)), t)
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), (w, b))

    with on(backend):
        ours = penalty_grads(PF.linear, PF.sigmoid, PF.mse_loss)
    theirs = penalty_grads(F.linear, torch.sigmoid, F.mse_loss)
    for a, b_ in zip(ours, theirs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif("cpp" not in pyengine.built_backends(), reason="pyengine._C is not built")
@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "leaky_relu"])
def test_gradgradcheck_registered_operator(name):
    op = getattr(torch.ops.pyengine, f"{name}_forward")
    x = _away_from_zero(3, 4, device="cpu")
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.skipif("cpp" not in pyengine.built_backends(), reason="pyengine._C is not built")
def test_gradgradcheck_registered_linear_and_add():
    x, w, b = _r(4, 3, device="cpu"), _r(5, 3, device="cpu"), _r(5, device="cpu")
    assert torch.autograd.gradgradcheck(torch.ops.pyengine.linear_forward, (x, w, b))
    add = torch.ops.pyengine.add_forward
    assert torch.autograd.gradgradcheck(lambda a, c: add(a, c, 2.0), (x, _r(3, device="cpu")))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_cross_entropy_first_derivative_under_create_graph_then_a_clear_error(backend, device):
    logits, target = _r(4, 6, device=device), torch.randint(0, 6, (4,), device=device)
    with on(backend):
        loss = PF.cross_entropy(logits, target)
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="pyengine.cross_entropy has no double backward"):
        torch.autograd.grad(g.pow(2).sum(), logits)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_second_derivative_is_a_clear_error(backend, device, reduction):
    """For every input and reduction (mean and sum save only the gradients), never "appears to not have been used
    in the graph", never a silent None with allow_unused=True."""
    x, w, b = _r(5, 4, device=device), _r(7, 4, device=device), _r(7, device=device)
    target = torch.randint(0, 7, (5,), device=device)
    with on(backend):
        loss = PF.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction).sum()
    first = torch.autograd.grad(loss, [x, w, b], create_graph=True)
    expected = torch.autograd.grad(F.cross_entropy(F.linear(x, w, b), target, reduction=reduction).sum(), [x, w, b])
    for g, g_ref in zip(first, expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    for wrt in (x, w, b):
        for g in first:
            with pytest.raises(RuntimeError, match="pyengine.linear_cross_entropy has no double backward"):
                torch.autograd.grad(g.pow(2).sum(), wrt, retain_graph=True, allow_unused=True)


@pytest.mark.skipif("cpp" not in pyengine.built_backends(), reason="pyengine._C is not built")
def test_registered_cross_entropy_double_backward_raises():
    logits = _r(4, 6, device="cpu")
    target = torch.randint(0, 6, (4, 1))
    loss = torch.ops.pyengine.cross_entropy_forward(logits.unsqueeze(-1), target, None, -100, 1, 0.0)[0]
    (g,) = torch.autograd.grad(loss, logits, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(g.sum(), logits)
