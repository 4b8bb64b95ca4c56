"""Mean squared error, the regression loss of the origin notes' LinearModel: loss = mean((x - y)^2).

  d loss / dx = 2 (x - y) / n        (reduction 'mean'; 'sum' drops the 1 / n, 'none' keeps one per element)
  d loss / dy = -2 (x - y) / n
Operands of different shapes broadcast (torch warns, since that is rarely meant), so their gradients are summed
back over the broadcast dims by autograd's expand.
Kernels: csrc/cpu/mse_loss.cpp, csrc/cuda/mse_loss.cu; formula: mse_loss_*_math in csrc/common/math.h.
"""
import warnings

import torch

from .. import _backend
from ._function import acc_dtype, apply, autocast, needs_grad, result_type, jvp_free_twin

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _reduce(loss, reduction, dtype):
    if reduction == 0:
        return loss.to(dtype)
    total = loss.sum()
    return (total / loss.numel() if reduction == 1 else total).to(dtype)


@_backend.reference
def mse_loss_forward(input, target, reduction=1):
    d = input.to(acc_dtype(input.dtype)) - target.to(acc_dtype(input.dtype))
    return _reduce(d * d, reduction, input.dtype)


@_backend.reference
def mse_loss_backward(grad_loss, input, target, reduction=1, need_input=True, need_target=True):
    acc = acc_dtype(input.dtype)
    g = grad_loss.to(acc)
    if reduction == 1:
        g = g / input.numel()
    grad = 2.0 * (input.to(acc) - target.to(acc)) * g
    return (grad.to(input.dtype) if need_input else None), ((-grad).to(input.dtype) if need_target else None)


@_backend.reference
def mse_loss_forward_with_grad(input, target, reduction=1):
    """The training forward of 'mean'/'sum' (csrc/autograd.cpp's node takes it when only the input wants a
    gradient): (loss, d loss / d input for an incoming gradient of 1), so that the backward only scales it."""
    if reduction == 0:
        raise RuntimeError("mse_loss_forward_with_grad: reduction must be mean or sum (1 or 2), got none")
    one = torch.ones((), dtype=input.dtype, device=input.device)
    grad_input, _ = mse_loss_backward(one, input, target, reduction, need_target=False)
    return mse_loss_forward(input, target, reduction), grad_input


def _check_reduction(reduction, size_average, reduce):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return reduction


def elementwise_loss_jvp(backward, grad_ones, tangents, reduction, dtype):
    """Forward-mode AD of an elementwise loss from its backward: the loss's derivatives per element (the backward
    of reduction 'none' for an incoming gradient of ones) times the tangents, summed, then reduced as the loss is."""
    partials = backward(grad_ones, *[t is not None for t in tangents])
    acc = acc_dtype(dtype)
    total = sum(p.to(acc) * t.to(acc) for p, t in zip(partials, tangents) if t is not None)
    return _reduce(total, reduction, dtype)


class MSELossFunction(torch.autograd.Function):
    """MSELossFunction.apply(input, target, reduction='mean'): (input - target)^2 reduced by reduction ('none',
    'mean' or 'sum'), for input and target of one shape and dtype (pyengine.functional.mse_loss broadcasts and
    promotes them first)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, reduction="mean"):
        if input.shape != target.shape or input.dtype != target.dtype:
            raise RuntimeError(f"MSELossFunction: input and target must have one shape and dtype, got "
                               f"{list(input.shape)} {input.dtype} and {list(target.shape)} {target.dtype}")
        code = REDUCTIONS[_check_reduction(reduction, None, None)]
        return _backend.kernels(input.device).mse_loss_forward(input.contiguous(), target.contiguous(), code)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, reduction = inputs
        ctx.kernels = _backend.kernels(input.device)
        ctx.reduction = REDUCTIONS[reduction]
        ctx.save_for_backward(input, target)  # the inputs themselves, which double backward differentiates
        ctx.save_for_forward(input, target)

    @staticmethod
    def backward(ctx, grad_loss):
        input, target = (t.contiguous() for t in ctx.saved_tensors)
        need_input, need_target = needs_grad(ctx, 2)[:2]
        kernels = _backend.backward_kernels(ctx.kernels)
        grad_input, grad_target = kernels.mse_loss_backward(grad_loss.contiguous(), input, target, ctx.reduction,
                                                            need_input, need_target)
        return grad_input, grad_target, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, _):
        input, target = (t.contiguous() for t in ctx.saved_tensors)
        kernels = _backend.backward_kernels(ctx.kernels)
        return elementwise_loss_jvp(lambda ones, *need: kernels.mse_loss_backward(ones, input, target, 0, *need),
                                    torch.ones_like(input), (input_tangent, target_tangent), ctx.reduction,
                                    input.dtype)


_MSE_FOR_COMPILE = jvp_free_twin(MSELossFunction)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """The squared error (input - target)^2, reduced: torch.nn.functional.mse_loss without its weight argument.

    Args:
        input (Tensor): any shape, floating-point.
        target (Tensor): input's shape. Another shape broadcasts with a UserWarning, as in torch; the dtypes
            are promoted together (an integer result raises RuntimeError).
        size_average (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        reduce (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        reduction (str): 'none' | 'mean' | 'sum': the loss per element, their mean, or their sum.
            Default: 'mean'.
        weight (Tensor, optional): torch's per-element weight is not supported: anything but None raises
            NotImplementedError (multiply the reduction='none' loss instead). Default: None.

    Shape:
        - input, target: (*); output: a scalar, or (*) for reduction='none'.

    Returns:
        Tensor: in the promoted dtype; under torch.autocast float16/bfloat16 operands become float32, as in torch.

    Autograd: both input and target are differentiable. Double backward and torch.func (vmap, grad, jacrev, jvp,
    jacfwd) are supported. The backend: pyengine.use_backend, else the environment variable PYENGINE_BACKEND,
    else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        tensor(2.)
        >>> PF.mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), reduction="none")
        tensor([0., 4.])
    """
    if weight is None and size_average is None and reduce is None:
        eager = _backend.eager_entries()  # the usual call in one C++ step (csrc/eager.cpp), else None
        result = None if eager is None else eager.mse_loss(input, target, reduction)
        if result is not None:
            return result
    if weight is not None:
        raise NotImplementedError("pyengine.mse_loss has no weight argument; multiply the per-element loss instead")
    reduction = _check_reduction(reduction, size_average, reduce)
    input, target = autocast("float32", input, target)
    if target.shape != input.shape:
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=2)
        input, target = torch.broadcast_tensors(input, target)
    dtype = result_type(input, target)
    if not dtype.is_floating_point:
        raise RuntimeError(f"mse_loss: expected floating-point input and target, got {input.dtype} and {target.dtype}")
    input, target = input.to(dtype), target.to(dtype)
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        return compiled.mse_loss(input, target, REDUCTIONS[reduction])
    return apply(MSELossFunction, _MSE_FOR_COMPILE, input, target, reduction)
