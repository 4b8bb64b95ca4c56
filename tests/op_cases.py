"""One sample call per op, shared by the cross-cutting tests (threads, memory, determinism, hypothesis):
OPS[name](device, dtype, shape) -> (pyengine function, torch function, args) with args' float tensors
requiring grad where torch can differentiate them."""
import torch
import torch.nn.functional as F

import pyengine.functional as PF


def _t(shape, dtype, device, grad=True, low=-3.0, high=3.0):
    return torch.empty(shape, dtype=dtype, device=device).uniform_(low, high).requires_grad_(grad)


def _linear(device, dtype, shape):
    x = _t(shape, dtype, device)
    k = shape[-1] if shape else 1
    return PF.linear, F.linear, (x, _t((5, k), dtype, device), _t((5,), dtype, device))


def _add(device, dtype, shape):
    other_shape = (1,) * max(len(shape) - 1, 0) + shape[-1:] if shape else ()
    return (lambda a, b: PF.add(a, b, alpha=0.5)), (lambda a, b: torch.add(a, b, alpha=0.5)), (
        _t(shape, dtype, device), _t(other_shape, dtype, device))


def _cross_entropy(device, dtype, shape):
    n = shape[0] if shape else 4
    c = shape[-1] if len(shape) > 1 else 7
    target = torch.randint(0, c, (n,), device=device)
    if n:
        target[0] = -100
    fn = dict(label_smoothing=0.1)
    return (lambda x, t: PF.cross_entropy(x, t, **fn)), (lambda x, t: F.cross_entropy(x, t, **fn)), (
        _t((n, c), dtype, device), target)


def _mse(device, dtype, shape):
    return PF.mse_loss, F.mse_loss, (_t(shape, dtype, device), _t(shape, dtype, device))


def _bce(device, dtype, shape):
    return PF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, (
        _t(shape, dtype, device), _t(shape, dtype, device, low=0.0, high=1.0))


def _fused_mlp(device, dtype, shape):
    """A 2-layer MLP over the last dim (shape's last dim in, 6 hidden, 3 out), relu between."""
    k = shape[-1] if shape else 1
    x = _t(shape if shape else (k,), dtype, device)
    params = (_t((6, k), dtype, device), _t((3, 6), dtype, device), _t((6,), dtype, device), _t((3,), dtype, device))
    return ((lambda x, w1, w2, b1, b2: PF.fused_mlp(x, [w1, w2], [b1, b2], "relu")),
            (lambda x, w1, w2, b1, b2: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)), (x, *params))


def _linear_cross_entropy(device, dtype, shape):
    """shape's rows (all but the last dim) of H = the last dim into 11 classes; every 3rd target ignored."""
    h = shape[-1] if shape else 1
    lead = shape[:-1] if len(shape) > 1 else (4,)
    target = torch.randint(0, 11, lead, device=device)
    target.view(-1)[::3] = -100
    return ((lambda x, w, b, t: PF.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1)),
            (lambda x, w, b, t: F.cross_entropy(F.linear(x, w, b).reshape(-1, 11), t.reshape(-1),
                                                label_smoothing=0.1)),
            (_t((*lead, h), dtype, device), _t((11, h), dtype, device), _t((11,), dtype, device), target))


def _unary(ours, theirs):
    return lambda device, dtype, shape: (ours, theirs, (_t(shape, dtype, device),))


OPS = {
    "linear": _linear,
    "relu": _unary(PF.relu, torch.relu),
    "sigmoid": _unary(PF.sigmoid, torch.sigmoid),
    "tanh": _unary(PF.tanh, torch.tanh),
    "leaky_relu": _unary(lambda x: PF.leaky_relu(x, 0.1), lambda x: F.leaky_relu(x, 0.1)),
    "add": _add,
    "cross_entropy": _cross_entropy,
    "mse_loss": _mse,
    "binary_cross_entropy_with_logits": _bce,
    "fused_mlp": _fused_mlp,
    "linear_cross_entropy": _linear_cross_entropy,
}


def run(fn, args, grad_out=None):
    """fn(*args) and the gradients of every arg that requires grad; returns (out, grads, grad_out)."""
    out = fn(*args)
    inputs = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    if grad_out is None:
        grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out) if inputs else ()
    return out, grads, grad_out
