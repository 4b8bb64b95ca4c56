"""linear: y = x @ W^T + b, for x of shape (*, in_features), W (out_features, in_features), b (out_features).

The chain rule through y = x W^T + b, with dy the gradient arriving from the layers above:
  dx = dy @ W          each input feature collects the gradient of every output it fed, weighted by W
  dW = dy^T @ x        summed over the batch: every row contributed to the same weights
  db = dy.sum(0)       the bias was broadcast over the batch, so its gradient sums over it
Leading batch dims are flattened into one: (*, in) -> (M, in).
Kernels: csrc/cpu/linear.cpp, csrc/cuda/linear.cu.
"""
import math

import torch

from .. import _backend
from ._function import autocast


@_backend.reference
def linear_forward(x, weight, bias=None):
    y = x @ weight.T
    if bias is not None:
        y = y + bias
    return y


@_backend.reference
def linear_backward(grad_y, x, weight, need_x=True, need_weight=True, need_bias=True):
    grad_x = grad_y @ weight if need_x else None
    grad_weight = grad_y.T @ x if need_weight else None
    grad_bias = grad_y.sum(0) if need_bias else None
    return grad_x, grad_weight, grad_bias


def _check(x, weight, bias):
    if x.dim() < 1 or weight.dim() != 2:
        raise RuntimeError(f"linear: input must be at least 1-D and weight 2-D, got {x.dim()}-D and {weight.dim()}-D")
    if x.shape[-1] != weight.shape[1]:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{x.shape[-1]} and "
                           f"{weight.shape[1]}x{weight.shape[0]})")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise RuntimeError(f"linear: input, weight and bias must have the same dtype, got {x.dtype}, "
                           f"{weight.dtype} and {None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


class LinearFunction(torch.autograd.Function):
    """y = x @ weight^T + bias for x (*, in), weight (out, in), bias (out) or None."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        _check(x, weight, bias)
        ctx.kernels = _backend.kernels(x.device)
        ctx.x_shape = x.shape
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # explicit: -1 is ambiguous when K = 0
        y = ctx.kernels.linear_forward(x2, weight, bias)
        ctx.save_for_backward(x, weight)  # x itself, not the view x2: double backward must reach the input
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x, grad_w, grad_b = _backend.backward_kernels(ctx.kernels).linear_backward(
            grad_y.reshape(x2.shape[0], weight.shape[0]), x2, weight, need_x, need_w, need_b and ctx.has_bias)
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b


def linear(input, weight, bias=None):
    """torch.nn.functional.linear. A 1-D weight (in,) gives one output feature with that dim squeezed, and a
    bias that broadcasts to (out,) (a single element) is expanded, as torch allows. Under torch.autocast the
    inputs take the autocast dtype, as torch's linear does."""
    input, weight, bias = autocast("lower", input, weight, bias)
    if weight.dim() == 1:
        if bias is not None:
            raise RuntimeError("linear: a 1-D weight takes no bias (torch: mat2 must be a matrix)")
        return linear(input, weight.unsqueeze(0)).squeeze(-1)
    if not input.is_floating_point():
        if input.dtype != weight.dtype:
            raise RuntimeError(f"linear: input and weight must have the same dtype, got {input.dtype} and "
                               f"{weight.dtype}")
        return linear_forward(input, weight, bias)  # integer matmul: torch supports it, nothing to differentiate
    if bias is not None and bias.dim() <= 1 and bias.numel() == 1 and weight.shape[0] != 1:
        bias = bias.reshape(1).expand(weight.shape[0])
    return LinearFunction.apply(input, weight, bias)
