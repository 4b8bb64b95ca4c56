"""Sigmoid and binary cross-entropy fused: the loss of a logit x against a label y in [0, 1].

  loss = -[pw y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
       = (1 - y) x + (1 + (pw - 1) y) softplus(-x)            softplus(-x) = log(1 + e^-x)
softplus(-x) is computed as log1p(e^-|x|) + max(-x, 0), which never overflows: a logit of 1000 gives a loss,
not inf or NaN, where sigmoid followed by log would underflow to log(0). pw is pos_weight (1 by default).
  d loss / dx = (1 + (pw - 1) y) sigmoid(x) - pw y             (= sigmoid(x) - y without pos_weight)
  d loss / dy = (pw - 1) softplus(-x) - x
each times the element weight w, and 1 / n for reduction 'mean'.
Kernels: csrc/cpu/binary_cross_entropy_with_logits.cpp, csrc/cuda/binary_cross_entropy_with_logits.cu;
formulas: bce_with_logits_*_math in csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import (NOT_DIFFERENTIABLE, acc_dtype, apply, autocast, contiguous, jvp_free_twin, needs_grad,
                        not_differentiable, result_type, scalar_type_name)
from .mse_loss import REDUCTIONS, _check_reduction, _reduce, elementwise_loss_jvp


def _softplus_neg(x):
    return torch.log1p(torch.exp(-x.abs())) + (-x).clamp_min(0)


@_backend.reference
def binary_cross_entropy_with_logits_forward(input, target, weight=None, pos_weight=None, reduction=1):
    acc = acc_dtype(input.dtype)
    x, y = input.to(acc), target.to(acc)
    log_weight = 1.0 if pos_weight is None else 1.0 + (pos_weight.to(acc) - 1.0) * y
    loss = (1.0 - y) * x + log_weight * _softplus_neg(x)
    if weight is not None:
        loss = loss * weight.to(acc)
    return _reduce(loss, reduction, input.dtype)


@_backend.reference
def binary_cross_entropy_with_logits_backward(grad_loss, input, target, weight=None, pos_weight=None, reduction=1,
                                              need_input=True, need_target=True):
    acc = acc_dtype(input.dtype)
    x, y = input.to(acc), target.to(acc)
    g = grad_loss.to(acc)
    if reduction == 1:
        g = g / input.numel()
    if weight is not None:
        g = g * weight.to(acc)
    grad_input = grad_target = None
    if need_input:
        sig = 1.0 / (1.0 + torch.exp(-x))
        if pos_weight is None:
            grad_input = (sig - y) * g
        else:
            pw = pos_weight.to(acc)
            grad_input = ((1.0 + (pw - 1.0) * y) * sig - pw * y) * g
        grad_input = grad_input.to(input.dtype)
    if need_target:
        grad_target = -x if pos_weight is None else (pos_weight.to(acc) - 1.0) * _softplus_neg(x) - x
        grad_target = (grad_target * g).to(input.dtype)
    return grad_input, grad_target


@_backend.reference
def binary_cross_entropy_with_logits_forward_with_grad(input, target, weight=None, pos_weight=None, reduction=1):
    """The training forward of 'mean'/'sum' (csrc/autograd.cpp's node takes it when only the input wants a
    gradient): (loss, d loss / d input for an incoming gradient of 1), so that the backward only scales it."""
    if reduction == 0:
        raise RuntimeError("binary_cross_entropy_with_logits_forward_with_grad: reduction must be mean or sum (1 or "
                           "2), got none")
    loss = binary_cross_entropy_with_logits_forward(input, target, weight, pos_weight, reduction)
    one = torch.ones((), dtype=input.dtype, device=input.device)
    grad_input, _ = binary_cross_entropy_with_logits_backward(one, input, target, weight, pos_weight, reduction,
                                                              need_target=False)
    return loss, grad_input


class BinaryCrossEntropyWithLogitsFunction(torch.autograd.Function):
    """BinaryCrossEntropyWithLogitsFunction.apply(input, target, weight=None, pos_weight=None, reduction='mean'):
    BCE with logits for input, target, weight and pos_weight all of one shape and dtype (the weights may be None;
    pyengine.functional.binary_cross_entropy_with_logits broadcasts them first); reduction 'none', 'mean' or 'sum'.
    weight and pos_weight are not differentiable."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight=None, pos_weight=None, reduction="mean"):
        for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
            if t is not None and (t.shape != input.shape or t.dtype != input.dtype):
                raise RuntimeError(f"BinaryCrossEntropyWithLogitsFunction: {name} must have the input's shape "
                                   f"{list(input.shape)} and dtype {input.dtype}, got {list(t.shape)} {t.dtype}")
        code = REDUCTIONS[_check_reduction(reduction, None, None)]
        return _backend.kernels(input.device).binary_cross_entropy_with_logits_forward(
            *contiguous(input, target, weight, pos_weight), code)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, pos_weight, reduction = inputs
        ctx.kernels = _backend.kernels(input.device)
        ctx.reduction = REDUCTIONS[reduction]
        ctx.save_for_backward(input, target, weight, pos_weight)  # the inputs themselves, for double backward
        ctx.save_for_forward(input, target, weight, pos_weight)

    @staticmethod
    def backward(ctx, grad_loss):
        input, target, weight, pos_weight = contiguous(*ctx.saved_tensors)
        need_input, need_target, need_weight, need_pos_weight = needs_grad(ctx, 4)[:4]
        if need_weight or need_pos_weight:  # the Function applied directly (the functional raises in the forward,
            raise RuntimeError(NOT_DIFFERENTIABLE.format(  # as torch)
                op="binary_cross_entropy_with_logits", name="weight" if need_weight else "pos_weight"))
        kernels = _backend.backward_kernels(ctx.kernels)
        grad_input, grad_target = kernels.binary_cross_entropy_with_logits_backward(
            grad_loss.contiguous(), input, target, weight, pos_weight, ctx.reduction, need_input, need_target)
        return grad_input, grad_target, None, None, None

    @staticmethod
    def jvp(ctx, input_tangent, target_tangent, weight_tangent, pos_weight_tangent, _):
        if weight_tangent is not None or pos_weight_tangent is not None:
            raise RuntimeError(NOT_DIFFERENTIABLE.format(
                op="binary_cross_entropy_with_logits", name="weight" if weight_tangent is not None else "pos_weight"))
        input, target, weight, pos_weight = contiguous(*ctx.saved_tensors)
        kernels = _backend.backward_kernels(ctx.kernels)
        return elementwise_loss_jvp(
            lambda ones, *need: kernels.binary_cross_entropy_with_logits_backward(ones, input, target, weight,
                                                                                  pos_weight, 0, *need),
            torch.ones_like(input), (input_tangent, target_tangent), ctx.reduction, input.dtype)


_BCE_FOR_COMPILE = jvp_free_twin(BinaryCrossEntropyWithLogitsFunction)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None, reduction="mean",
                                     pos_weight=None):
    """Sigmoid and binary cross-entropy fused and stable: torch.nn.functional.binary_cross_entropy_with_logits.

    loss = -w [pos_weight * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] per element, for logits x = input
    and labels y = target in [0, 1]; computed without overflow for large |x|.

    Args:
        input (Tensor): logits, any shape, floating-point (other dtypes raise NotImplementedError).
        target (Tensor): input's shape (another raises ValueError), floating-point; differentiable.
        weight (Tensor, optional): a rescaling weight per element, broadcast to input's shape. It may not
            require grad (torch's "not differentiable" error), as in torch. Default: None.
        size_average (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        reduce (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        reduction (str): 'none' | 'mean' | 'sum'. Default: 'mean'.
        pos_weight (Tensor, optional): the weight of positive labels, broadcast along input's last (class) dim,
            e.g. of shape (C,). It may not require grad, as in torch. Default: None.

    Shape:
        - input, target: (*); output: a scalar, or (*) for reduction='none'.

    Returns:
        Tensor: in the dtype input and target promote to; under torch.autocast float16/bfloat16 operands become
        float32, as in torch.

    Autograd: input and target are differentiable. Double backward and torch.func (vmap, grad, jacrev, jvp,
    jacfwd) are supported. The backend: pyengine.use_backend, else the environment variable PYENGINE_BACKEND,
    else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.binary_cross_entropy_with_logits(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        tensor(0.6931)
        >>> PF.binary_cross_entropy_with_logits(torch.tensor([1000.0]), torch.tensor([0.0]))  # no overflow
        tensor(1000.)
    """
    if weight is None and pos_weight is None and size_average is None and reduce is None:
        eager = _backend.eager_entries()  # the usual call in one C++ step (csrc/eager.cpp), else None
        result = None if eager is None else eager.binary_cross_entropy_with_logits(input, target, reduction)
        if result is not None:
            return result
    reduction = _check_reduction(reduction, size_average, reduce)
    input, target, weight, pos_weight = autocast("float32", input, target, weight, pos_weight)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    if not input.is_floating_point():
        raise NotImplementedError(f"\"binary_cross_entropy_with_logits\" not implemented for "
                                  f"'{scalar_type_name(input.dtype)}': the input must hold floating-point logits")
    if not target.is_floating_point():
        raise RuntimeError(f"result type {scalar_type_name(result_type(input, target))} can't be cast to the desired "
                           f"output type {scalar_type_name(target.dtype)} (binary_cross_entropy_with_logits takes a "
                           "floating-point target)")
    not_differentiable("binary_cross_entropy_with_logits", weight=weight, pos_weight=pos_weight)
    dtype = result_type(input, target)
    input, target = input.to(dtype), target.to(dtype)
    if weight is not None:
        weight = weight.to(dtype).broadcast_to(input.shape)
    if pos_weight is not None:
        pos_weight = pos_weight.to(dtype).broadcast_to(input.shape)
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        return compiled.binary_cross_entropy_with_logits(input, target, weight, pos_weight, REDUCTIONS[reduction])
    return apply(BinaryCrossEntropyWithLogitsFunction, _BCE_FOR_COMPILE, input, target, weight, pos_weight,
                 reduction)
