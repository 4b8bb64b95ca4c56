"""Broadcast add: out = input + alpha * other, with PyTorch's broadcasting and type promotion.

Broadcasting lines the shapes up from the right; a missing or size-1 dim is repeated to match the other
operand. A repeated operand fed every output along those dims, so by the chain rule its gradient is the
sum of the output gradient over them: broadcasting's backward is a sum over the broadcast dims.
  d input = sum over input's broadcast dims of dout          reshaped to input.shape
  d other = alpha * sum over other's broadcast dims of dout  reshaped to other.shape
Kernels: csrc/cpu/add.cpp, csrc/cuda/add.cu.
"""
import math
import numbers

import torch

from .. import _backend
from ._function import C_TYPE_NAMES, acc_dtype, apply, result_type, jvp_free_twin
from ._layout import widen


@_backend.reference
def add_forward(input, other, alpha=1):
    if input.dtype == torch.bool:  # bool + bool is logical or; a true alpha keeps other, a false one drops it
        return torch.logical_or(input, other & bool(alpha))
    if input.is_floating_point():  # float16/bfloat16 computed in float and rounded once, as the kernels do
        acc = acc_dtype(input.dtype)  # widen: laid out as torch's (_layout.py)
        return (widen(input, acc) + alpha * widen(other, acc)).to(input.dtype)
    return input + alpha * other


@_backend.reference
def add_backward(grad, shape, scale=1):
    """Sums grad over the dims that broadcasting added or stretched, giving a tensor of `shape`."""
    shape = tuple(shape)
    lead = grad.dim() - len(shape)
    acc = acc_dtype(grad.dtype)
    g = grad.to(acc)
    if lead:
        g = g.sum(dim=tuple(range(lead)))  # dims the operand did not have at all
    stretched = tuple(d for d, n in enumerate(shape) if n == 1 and g.shape[d] != 1)
    if stretched:
        g = g.sum(dim=stretched, keepdim=True)  # size-1 dims repeated to match the other operand
    if scale != 1:
        g = g * scale
    g = g.to(grad.dtype)  # of `shape` already: no reshape, which would restride grad's dims of one element
    # never grad itself (nor a view of it): autograd would store the caller's tensor as .grad (and both operands'
    # grads in one). Told by what ran, not by data_ptr, which a batched tensor under torch.func does not have.
    return g.clone() if not (lead or stretched or scale != 1 or acc != grad.dtype) else g


_FLOAT16_MAX = 65504.0


def _check_alpha(dtype, alpha):
    """torch.add's rules for alpha: a bool alpha needs a bool result, an integral result an integral alpha."""
    if isinstance(alpha, bool) and dtype != torch.bool:
        raise RuntimeError("Boolean alpha only supported for Boolean results.")
    if not (dtype.is_floating_point or dtype.is_complex) and not isinstance(alpha, numbers.Integral):
        raise RuntimeError("For integral input tensors, argument alpha must not be a floating point number.")
    if dtype != torch.bool and not (dtype.is_floating_point or dtype.is_complex):
        info = torch.iinfo(dtype)  # as c10's checked conversion: an unsigned type takes -max..max (wrapping)
        if not (info.min if info.min < 0 else -info.max) <= alpha <= info.max:
            raise RuntimeError(f"value cannot be converted to type {C_TYPE_NAMES[dtype]} without overflow")
    elif dtype.is_floating_point and isinstance(alpha, numbers.Real) and math.isfinite(alpha) and (
            abs(alpha) > torch.finfo(dtype).max):  # an inf or NaN alpha passes, as in c10
        raise RuntimeError(f"value cannot be converted to type {C_TYPE_NAMES[dtype]} without overflow")


def _check_broadcastable(a, b):
    """Raises torch.add's own error when shapes a and b do not broadcast (torch.broadcast_shapes words it
    differently and costs ~12 us a call)."""
    for i, (m, n) in enumerate(zip(reversed(a), reversed(b))):
        if m != n and m != 1 and n != 1:
            raise RuntimeError(f"The size of tensor a ({m}) must match the size of tensor b ({n}) at non-singleton "
                               f"dimension {max(len(a), len(b)) - 1 - i}")


class BroadcastAddFunction(torch.autograd.Function):
    """out = input + alpha * other for tensors of broadcastable shapes; operands of different dtypes are
    promoted as torch.add promotes them, and each gradient comes back in its operand's own dtype.
    Forward-mode AD: d out = d input + alpha * d other, in out's dtype and shape."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, other, alpha=1):
        a, b = _promote(input, other, alpha)
        return _backend.kernels(a.device).add_forward(a, b, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, other, alpha = inputs
        ctx.kernels = _backend.kernels(output.device)
        ctx.alpha = alpha
        ctx.shapes = (input.shape, other.shape)
        ctx.dtypes = (input.dtype, other.dtype)
        ctx.devices = (input.device, other.device)
        ctx.out = (output.shape, output.dtype, output.device)

    @staticmethod
    def backward(ctx, grad):
        grads = []
        for i, scale in enumerate((1, ctx.alpha)):
            if not ctx.needs_input_grad[i]:
                grads.append(None)
                continue
            if i == 0 and grad.shape == ctx.shapes[0] and not torch.is_grad_enabled():
                # input's gradient is dout itself: no copy (autograd's AccumulateGrad copies it before storing it
                # as a .grad that someone else still references). At most one operand takes it.
                grads.append(grad.to(dtype=ctx.dtypes[0], device=ctx.devices[0]))
                continue
            g = _backend.backward_kernels(ctx.kernels).add_backward(grad, list(ctx.shapes[i]), scale)
            grads.append(g.to(dtype=ctx.dtypes[i], device=ctx.devices[i]))
        return grads[0], grads[1], None

    @staticmethod
    def jvp(ctx, input_tangent, other_tangent, _):
        shape, dtype, device = ctx.out
        terms = [t.to(dtype=dtype, device=device) * s for t, s in ((input_tangent, 1), (other_tangent, ctx.alpha))
                 if t is not None]
        total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        return total.expand(shape).contiguous()


_ADD_FOR_COMPILE = jvp_free_twin(BroadcastAddFunction)


def _promote(input, other, alpha):
    """torch.add's checks and promotion: both operands in the result dtype, on one device."""
    dtype = result_type(input, other)
    if dtype.is_complex:
        raise NotImplementedError("pyengine.add does not support complex tensors")
    _check_alpha(dtype, alpha)
    _check_broadcastable(input.shape, other.shape)
    a, b = input.to(dtype), other.to(dtype)
    if a.device != b.device:  # a 0-dim CPU tensor may join a CUDA one, as in torch
        a, b = (a.to(b.device), b) if a.dim() == 0 and a.device.type == "cpu" else (a, b.to(a.device))
    return a, b


def add(input, other, *, alpha=1):
    """input + alpha * other with torch's broadcasting and type promotion: torch.add without its out argument.

    Args:
        input (Tensor or number): the first operand.
        other (Tensor or number): the second operand; its shape broadcasts with input's, either way. At least
            one of input and other must be a tensor; a Python number is promoted as torch promotes it.
        alpha (number, keyword-only): the multiplier of other, with torch.add's rules (an integral result takes
            an integral alpha; a bool alpha only a bool result). Default: 1.

    Returns:
        Tensor: the broadcast shape of input and other, in torch.result_type(input, other). Bool and integer
        tensors work (without gradient); complex tensors raise NotImplementedError.

    Autograd: each operand's gradient is the output's gradient summed over the dims it was broadcast along
    (times alpha for other), in that operand's own dtype. Double backward and torch.func (vmap, grad, jacrev,
    jvp, jacfwd) are supported. The backend: pyengine.use_backend, else the environment variable
    PYENGINE_BACKEND, else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.add(torch.zeros(2, 3), torch.tensor([1.0, 2.0, 3.0]), alpha=2)
        tensor([[2., 4., 6.],
                [2., 4., 6.]])
        >>> PF.add(torch.tensor([1, 2]), 1)  # integers stay integers
        tensor([2, 3])
    """
    eager = _backend.eager_entries()
    result = None if eager is None else eager.add(input, other, alpha)
    if result is not None:
        return result
    if not torch.is_tensor(input) and not torch.is_tensor(other):
        raise TypeError("pyengine.add needs at least one tensor operand")
    dtype = result_type(input, other)  # Python numbers promote as torch's wrapped numbers do
    device = input.device if torch.is_tensor(input) else other.device
    if not torch.is_tensor(input):
        input = torch.tensor(input, dtype=dtype, device=device)
    if not torch.is_tensor(other):
        other = torch.tensor(other, dtype=dtype, device=device)
    if not isinstance(alpha, numbers.Number):
        raise TypeError(f"add(): alpha must be a number, got {type(alpha).__name__}")
    if input.dtype != dtype:
        input = input.to(dtype)
    if other.dtype != dtype:
        other = other.to(dtype)
    compiled = _backend.compiled_autograd(input)
    if (compiled is not None and dtype.is_floating_point and input.device == other.device
            and isinstance(alpha, numbers.Real) and not isinstance(alpha, bool)):
        _check_broadcastable(input.shape, other.shape)
        if abs(alpha) > _FLOAT16_MAX:  # only an alpha past float16's range can overflow a float dtype
            _check_alpha(dtype, alpha)
        return compiled.add(input, other, alpha)
    return apply(BroadcastAddFunction, _ADD_FOR_COMPILE, input, other, alpha)
