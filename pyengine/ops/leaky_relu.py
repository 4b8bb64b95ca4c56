"""leaky_relu: y = x for x > 0, negative_slope * x otherwise.

dy/dx = 1 for x > 0, negative_slope otherwise. Unlike relu, a negative input still passes a little gradient,
so a unit never goes silent for good. The slope may be zero or negative, so the sign of x cannot be read back
from y: the backward keeps the input.
Kernels: csrc/cpu/leaky_relu.cpp, csrc/cuda/leaky_relu.cu; formula: leaky_relu_*_math in csrc/common/math.h.
"""
import numbers

import torch

from .. import _backend
from ._function import acc_dtype, apply, scalar_type_name, jvp_free_twin
from ._layout import once, widen


@_backend.reference
def leaky_relu_forward(x, negative_slope=0.01):
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    return torch.where(xa > 0, xa, xa * negative_slope).to(x.dtype)


@_backend.reference
def leaky_relu_backward(grad_y, x, negative_slope=0.01):
    # x first, as torch's leaky_relu_backward reads it; once, widen: laid out as torch's (_layout.py)
    g = widen(grad_y, acc_dtype(x.dtype))
    return torch.where((once(x) > 0).expand(x.shape), g, g * negative_slope).to(grad_y.dtype)


class LeakyReLUFunction(torch.autograd.Function):
    """y = leaky_relu(x, negative_slope); the backward (and jvp: the derivative is elementwise) reads the input."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, negative_slope=0.01):
        return _backend.kernels(x.device).leaky_relu_forward(x, float(negative_slope))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, negative_slope = inputs
        ctx.kernels = _backend.kernels(x.device)
        ctx.negative_slope = float(negative_slope)
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return _backend.backward_kernels(ctx.kernels).leaky_relu_backward(grad_y, x, ctx.negative_slope), None

    @staticmethod
    def jvp(ctx, tangent, _):
        (x,) = ctx.saved_tensors
        return _backend.backward_kernels(ctx.kernels).leaky_relu_backward(tangent, x, ctx.negative_slope)


_LEAKY_RELU_FOR_COMPILE = jvp_free_twin(LeakyReLUFunction)


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """Elementwise input where input > 0, else negative_slope * input: torch.nn.functional.leaky_relu.

    Args:
        input (Tensor): any shape, floating-point (float16, bfloat16, float32, float64) on the CPU or a GPU;
            other dtypes raise NotImplementedError, as in torch.
        negative_slope (float): the slope for input <= 0; zero and negative slopes work too. Default: 0.01.
        inplace (bool): accepted for compatibility with torch, but the result is always computed out of place:
            input is left unchanged and a new tensor is returned. Default: False.

    Returns:
        Tensor: input's shape and dtype.

    Autograd: the backward reads the saved input (the slope's sign may hide the input's sign in the output).
    Double backward and torch.func (vmap, grad, jacrev, jvp, jacfwd) are supported. The backend:
    pyengine.use_backend, else the environment variable PYENGINE_BACKEND, else the tensor's device
    (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.leaky_relu(torch.tensor([-2.0, 3.0]), negative_slope=0.5)
        tensor([-1.,  3.])
    """
    eager = _backend.eager_entries()
    result = None if eager is None else eager.leaky_relu(input, negative_slope)
    if result is not None:
        return result
    if not isinstance(negative_slope, numbers.Real):
        raise TypeError(f"leaky_relu(): negative_slope must be a number, got {type(negative_slope).__name__}")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"leaky_relu\" not implemented for '{scalar_type_name(input.dtype)}': pass a "
                                  "floating-point tensor")
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        return compiled.leaky_relu(input, float(negative_slope))
    return apply(LeakyReLUFunction, _LEAKY_RELU_FOR_COMPILE, input, negative_slope)
