"""Softmax cross-entropy: the loss of logits x against a class index t (or a distribution y over classes).

  p = softmax(x) = exp(x - lse),  lse = log(sum_c exp(x_c))      computed as max + log(sum(exp(x - max)))
  loss = -log p_t = lse - x_t                                    (class index)
  loss = -sum_c y_c log p_c = sum_c y_c (lse - x_c)               (class probabilities)
  dloss/dx = p - y                                                (y = onehot(t) for a class index)
The gradient needs only p, and p = exp(x - lse): the forward saves one lse per row, never the (N, C)
softmax, and the backward rebuilds p in the same pass that writes the gradient.
Class weights w scale each row's loss by w_t (and 'mean' divides by the sum of the w_t of rows kept);
label smoothing eps mixes the target with the uniform distribution: y' = (1 - eps) y + eps / C.
Inputs (C), (N, C) and (N, C, d1, ..., dk) are viewed as (N, C, D) with D = d1 * ... * dk.
Kernels: csrc/cpu/cross_entropy.cpp, csrc/cuda/cross_entropy.cu; formulas: csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import (NOT_DIFFERENTIABLE, acc_dtype, apply, autocast, first_order_only, jvp_free_twin, needs_grad,
                        not_differentiable, note_functorch_level, scalar_type_name)

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@_backend.reference
def cross_entropy_forward(logits, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0):
    """logits (N, C, D); target (N, D) int64 or (N, C, D) probabilities -> (loss, lse (N, D), denom)."""
    n, c, d = logits.shape
    x = logits.to(acc_dtype(logits.dtype))
    m = x.amax(dim=1) if c else x.new_full((n, d), float("-inf"))
    row_max = m
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # an all -inf row: lse = -inf, not NaN
    lse = m + torch.log(torch.exp(x - m.unsqueeze(1)).sum(dim=1))
    lse = lse.masked_fill(row_max == float("inf"), float("nan"))  # a +inf logit: NaN, as torch's log_softmax
    w = None if weight is None else weight.to(x.dtype).view(1, c, 1)
    eps = max(label_smoothing, 0.0)
    if target.is_floating_point():
        y = target.to(x.dtype)
        if eps > 0:
            y = (1 - eps) * y + eps / c
        wy = y if w is None else y * w
        loss = (wy * (lse.unsqueeze(1) - x)).sum(dim=1)
        denom = torch.tensor(float(n * d if c else 0), dtype=x.dtype, device=x.device)  # torch: NaN mean if empty
    else:
        keep = target != ignore_index
        bad = keep & ((target < 0) | (target >= c))
        # under torch.func a batched tensor has no truth value: gather below then rejects a bad index itself
        if not torch._C._are_functorch_transforms_active() and bad.any():
            raise IndexError(f"Target {target[bad][0].item()} is out of bounds.")
        t = torch.where(keep, target, torch.zeros_like(target))
        x_t = x.gather(1, t.unsqueeze(1)).squeeze(1) if c else torch.zeros_like(lse)  # C = 0: every row ignored
        w_t = torch.ones_like(x_t) if w is None else w.view(c)[t]
        w_t = torch.where(keep, w_t, torch.zeros_like(w_t))
        loss = (1 - eps) * w_t * (lse - x_t)
        if eps > 0:
            w_sum = float(c) if w is None else w.sum()
            wx_sum = x.sum(dim=1) if w is None else (w * x).sum(dim=1)
            loss = loss + eps / c * (w_sum * lse - wx_sum)
        loss = torch.where(keep, loss, torch.zeros_like(loss))  # ignored rows: 0 even if their logits are NaN
        denom = w_t.sum()
    if reduction == 0:
        out = loss
    elif reduction == 2:
        out = loss.sum()
    else:
        out = loss.sum() / denom
    return out.to(logits.dtype), lse, denom


@_backend.reference
def cross_entropy_backward(grad_loss, logits, target, weight, lse, denom, ignore_index=-100, reduction=1,
                           label_smoothing=0.0):
    """dlogits (N, C, D) = (p - y') * w * grad_loss [/ denom]."""
    n, c, d = logits.shape
    x = logits.to(acc_dtype(logits.dtype))
    p = torch.exp(x - lse.unsqueeze(1))
    w = None if weight is None else weight.to(x.dtype).view(1, c, 1)
    eps = max(label_smoothing, 0.0)
    if target.is_floating_point():
        y = target.to(x.dtype)
        if eps > 0:
            y = (1 - eps) * y + eps / c
        wy = y if w is None else y * w
        grad = p * wy.sum(dim=1, keepdim=True) - wy
    else:
        keep = target != ignore_index
        t = torch.where(keep, target, torch.zeros_like(target))
        onehot = torch.arange(c, device=x.device).view(1, c, 1) == t.unsqueeze(1)
        w_t = torch.ones_like(lse) if w is None else w.view(c)[t]
        coef_t = (1 - eps) * w_t
        w_sum = float(c) if w is None else w.sum()
        coef_row = coef_t + (eps / c if c else 0.0) * w_sum
        grad = p * coef_row.unsqueeze(1) - onehot * coef_t.unsqueeze(1)
        if eps > 0:
            grad = grad - eps / c * (torch.ones_like(x) if w is None else w)
    g = grad_loss.to(x.dtype)
    g = g.unsqueeze(1) if reduction == 0 else g
    if reduction == 1:
        g = g / denom
    grad = grad * g
    if not target.is_floating_point():  # ignored rows: 0 (even when all are: g = 0/0), NaN where p is, as torch
        grad = torch.where(keep.unsqueeze(1), grad, p * 0)
    return grad.to(logits.dtype)


@_backend.reference
def cross_entropy_forward_with_grad(logits, target, weight=None, ignore_index=-100, reduction=1,
                                    label_smoothing=0.0):
    """The training forward of 'mean'/'sum': (loss, dlogits for an incoming gradient of 1, denom)."""
    loss, lse, denom = cross_entropy_forward(logits, target, weight, ignore_index, reduction, label_smoothing)
    one = torch.ones((), dtype=logits.dtype, device=logits.device)
    grad = cross_entropy_backward(one, logits, target, weight, lse, denom, ignore_index, reduction, label_smoothing)
    return loss, grad, denom


def _flatten(input, target, weight, label_smoothing):
    """Checks the arguments in torch's order, with torch's messages, and views them as (N, C, D) logits and (N, D)
    class indices or (N, C, D) probabilities. As in torch, a target of the input's own shape holds class
    probabilities, any other a class index per row."""
    if not input.is_floating_point():
        raise RuntimeError(f"cross_entropy: input must be a floating-point tensor of logits, got {input.dtype}")
    c = 1 if input.dim() == 0 else input.shape[0] if input.dim() == 1 else input.shape[1]
    if target.shape == input.shape:
        if not target.is_floating_point():
            raise RuntimeError(f"Expected floating point type for target with class probabilities, got "
                               f"{scalar_type_name(target.dtype)}")
        if input.dim() == 0:
            raise RuntimeError("cross_entropy: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ...)")
        if label_smoothing > 1.0:
            raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
        _check_weight(weight, c, "cross_entropy: ")
        logits = _view_logits(input, c)
        return logits, target.reshape(logits.shape)
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if input.dim() == 0:
        raise RuntimeError("cross_entropy: input must have a class dimension: shape (C), (N, C) or (N, C, d1, ...)")
    if input.dim() == 1:
        if target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    elif input.dim() == 2 and target.dim() > 1:
        raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
    elif target.dim() == 0 or target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0] if target.dim() else 0}).")
    elif target.shape != input.shape[:1] + input.shape[2:]:
        raise RuntimeError(f"Expected target size {list(input.shape[:1] + input.shape[2:])}, got {list(target.shape)}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}")
    _check_weight(weight, c, "")
    logits = _view_logits(input, c)
    return logits, target.reshape(logits.shape[0], logits.shape[2]).to(torch.int64)


def _check_weight(weight, c, prefix):
    if weight is not None and (weight.dim() != 1 or weight.numel() != c):
        raise RuntimeError(f"{prefix}weight tensor should be defined either for all {c} classes or no classes but got "
                           f"weight tensor of shape: {list(weight.shape)}")


def _view_logits(input, c):
    d = 1
    for size in input.shape[2:]:
        d *= size
    return input.reshape(1, c, 1) if input.dim() == 1 else input.reshape(input.shape[0], c, d)  # not -1: N may be 0


def _prepare(input, target, weight, ignore_index, reduction, label_smoothing):
    """The checked (N, C, D) logits and targets the kernels take, promoted and contiguous."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    logits, tgt = _flatten(input, target, weight, label_smoothing)
    if tgt.is_floating_point() and ignore_index >= 0:
        raise RuntimeError("ignore_index is not supported for floating point target")
    if tgt.is_floating_point() and tgt.dtype != logits.dtype:  # torch promotes input and probabilities
        dtype = torch.promote_types(logits.dtype, tgt.dtype)
        logits, tgt = logits.to(dtype), tgt.to(dtype)
    if weight is not None and weight.dtype != logits.dtype:
        raise RuntimeError(f"expected scalar type {logits.dtype} but found {weight.dtype} (weight)")
    return logits.contiguous(), tgt.contiguous()


def _fuse(input, target, weight, reduction, dtype):
    """Whether the forward computes the gradient too. Training with a reduced loss: the incoming gradient is one
    number, so the gradient for 1 is computed in the same pass as the loss (one read of the logits instead of two)
    and the backward only scales it. Not for float16/bfloat16, whose saved gradient would be rounded twice when the
    incoming one is not 1; not while torch.compile traces (the backward reads the incoming gradient on the host) or
    under torch.func (its forward sees unwrapped tensors, and nothing is saved by being computed early); nor when
    the target's probabilities or the weight want a gradient too. Read from the inputs' requires_grad, since a
    forward does not see ctx."""
    return (input.requires_grad and not target.requires_grad and not (weight is not None and weight.requires_grad)
            and reduction != "none" and dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())


class SoftmaxCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing) as one autograd node:
    softmax and the negative log-likelihood fused, with the gradient p - y computed in one pass.
    apply(...) returns (loss, lse, denom, grad): the loss and, not differentiable, what the backward reads (lse the
    log-sum-exp per row, denom the mean's divisor, grad the gradient for 1 where the forward computed it; the
    other of lse and grad is None). pyengine.functional.cross_entropy returns the loss alone."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
        logits, tgt = _prepare(input, target, weight, ignore_index, reduction, label_smoothing)
        kernels = _backend.kernels(logits.device)
        args = (ignore_index, REDUCTIONS[reduction], float(label_smoothing))
        if _fuse(input, target, weight, reduction, logits.dtype):
            loss, grad, denom = kernels.cross_entropy_forward_with_grad(logits, tgt, weight, *args)
            return loss, None, denom, grad
        loss, lse, denom = kernels.cross_entropy_forward(logits, tgt, weight, *args)
        if reduction == "none":
            loss = loss.reshape(() if input.dim() == 1 else input.shape[:1] + input.shape[2:])
        return loss, lse, denom, None

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, target, weight, ignore_index, reduction, label_smoothing = inputs
        _, lse, denom, grad = output
        ctx.mark_non_differentiable(*(t for t in (lse, denom, grad) if t is not None))
        ctx.set_materialize_grads(False)  # no logits-sized zeros for the saved gradient's own gradient
        note_functorch_level(ctx)
        ctx.kernels = _backend.kernels(input.device)
        ctx.inputs = (ignore_index, reduction, label_smoothing)
        ctx.args = (ignore_index, REDUCTIONS[reduction], float(label_smoothing))
        ctx.input_shape, ctx.input_dtype, ctx.target_dtype = input.shape, input.dtype, target.dtype
        ctx.fused = grad is not None
        # input, for the double-backward error to link to: not saved by the fused path (no version check), since its
        # backward does not read it and torch's cross_entropy does not fail when the logits change in place
        ctx.error_links = (input,)
        ctx.save_for_backward(*((grad,) if ctx.fused else (input, target, weight, lse, denom)))

    @staticmethod
    @first_order_only("cross_entropy")
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return None, None, None, None, None, None
        kernels = _backend.backward_kernels(ctx.kernels)
        if ctx.fused:
            (grad,) = ctx.saved_tensors
            # The usual incoming 1 returns the saved gradient as it is (on the CPU reading it costs nothing; on a
            # GPU it would wait for the device, so there it is always multiplied; a batched one is never read).
            if (grad_loss.device.type != "cpu" or torch._C._are_functorch_transforms_active()
                    or grad_loss.item() != 1):
                grad = grad * grad_loss
            return grad.reshape(ctx.input_shape).to(ctx.input_dtype), None, None, None, None, None
        input, target, weight, lse, denom = ctx.saved_tensors
        logits, tgt = _prepare(input, target, weight, *ctx.inputs)
        grad = None
        need = needs_grad(ctx, 3)
        if need[0]:
            g = grad_loss.reshape(lse.shape) if ctx.args[1] == 0 else grad_loss
            grad = kernels.cross_entropy_backward(g.contiguous(), logits, tgt, weight, lse, denom, *ctx.args)
            grad = grad.reshape(ctx.input_shape).to(ctx.input_dtype)
        grad_target = None
        if need[1]:  # class probabilities are differentiable: d loss / d t_c = -(1 - eps) w_c log p_c
            _, reduction, smoothing = ctx.args
            log_p = logits.to(lse.dtype) - lse.unsqueeze(1)
            g = grad_loss.reshape(lse.shape).unsqueeze(1) if reduction == 0 else grad_loss
            if reduction == 1:
                g = g / denom
            w = 1.0 if weight is None else weight.to(lse.dtype).view(1, -1, 1)
            grad_target = (-(1.0 - smoothing) * w * log_p * g).reshape(ctx.input_shape).to(ctx.target_dtype)
        grad_weight = None
        if need[2] and not tgt.is_floating_point():  # the Function applied directly (the functional
            raise RuntimeError(NOT_DIFFERENTIABLE.format(op="nll_loss_forward", name="weight"))  # raises before)
        if need[2]:  # probability targets (torch differentiates their weight): d loss / d w_c
            _, reduction, smoothing = ctx.args  # = sum over rows of g y'_c (lse - x_c) [/ denom]
            c = logits.shape[1]
            y = tgt.to(lse.dtype) * (1.0 - smoothing) + smoothing / c
            g = grad_loss.reshape(lse.shape).unsqueeze(1) if reduction == 0 else grad_loss
            if reduction == 1:
                g = g / denom
            grad_weight = (y * (lse.unsqueeze(1) - logits.to(lse.dtype)) * g).sum(dim=(0, 2)).to(weight.dtype)
        return grad, grad_target, grad_weight, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("pyengine.cross_entropy has no forward-mode AD (jvp, torch.func.jacfwd); use "
                                  "torch.func.jacrev or vjp, or torch.nn.functional.cross_entropy")


_CE_FOR_COMPILE = jvp_free_twin(SoftmaxCrossEntropyFunction)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """Softmax and negative log-likelihood fused: torch.nn.functional.cross_entropy, with the same arguments.

    Args:
        input (Tensor): floating-point logits, (C), (N, C) or (N, C, d1, ..., dk).
        target (Tensor): class indices (int64 or uint8), of input's shape without the class dim, each in
            [0, C) or ignore_index; or class probabilities, floating-point and of input's own shape.
        weight (Tensor, optional): a weight per class, (C,), of input's dtype. With class-index targets it may
            not require grad (torch's "not differentiable" error); with probabilities it gets a gradient, as in
            torch. Default: None.
        size_average (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        ignore_index (int): class-index targets equal to it add nothing to the loss or to 'mean''s divisor,
            and their gradient is 0. Default: -100.
        reduce (bool, optional): deprecated (see reduction); honored as torch honors it. Default: None.
        reduction (str): 'none' | 'mean' | 'sum'. With class indices 'mean' divides by the summed class weights
            of the rows kept (their count without weight); with probabilities by the row count. Default: 'mean'.
        label_smoothing (float): in [0, 1]: the target is mixed with the uniform distribution,
            (1 - label_smoothing) * target + label_smoothing / C. Default: 0.0.

    Shape:
        - input: (C), (N, C) or (N, C, d1, ..., dk); target: (), (N) or (N, d1, ..., dk), or input's shape.
        - output: a scalar, or target's shape without the class dim for reduction='none'.

    Returns:
        Tensor: input's dtype; under torch.autocast float16/bfloat16 logits become float32, as in torch.

    Autograd: the forward saves one log-sum-exp per row, not the softmax; when training with 'mean' or 'sum' in
    float32/float64 it computes the gradient in the same pass and the backward only scales it. Differences
    from torch: no double backward (the first derivative works under create_graph=True; differentiating it
    again raises RuntimeError) and no forward-mode AD (torch.func.jvp and jacfwd raise NotImplementedError);
    torch.func vmap, grad, vjp and jacrev are supported. The backend: pyengine.use_backend, else the
    environment variable PYENGINE_BACKEND, else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> logits = torch.zeros(2, 3, requires_grad=True)
        >>> loss = PF.cross_entropy(logits, torch.tensor([0, 2]))  # log(3) per row
        >>> loss
        tensor(1.0986, grad_fn=<...>)
        >>> loss.backward()
        >>> logits.grad  # (softmax - onehot) / N
        tensor([[-0.3333,  0.1667,  0.1667],
                [ 0.1667,  0.1667, -0.3333]])
        >>> PF.cross_entropy(torch.zeros(2, 3), torch.tensor([0, -100]), reduction="sum")  # -100: ignored
        tensor(1.0986)
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    input, target, weight = autocast("float32", input, target, weight)
    if weight is not None and torch.is_tensor(target) and target.shape != input.shape:  # class indices: torch
        not_differentiable("nll_loss_forward", weight=weight)  # refuses a weight that requires grad
    compiled = _backend.compiled_autograd(input)
    # the common case, (N, C) logits and class indices, as a C++ node; the Python Function checks and runs the rest
    if (compiled is not None and input.dim() == 2 and target.dim() == 1 and target.dtype == torch.int64
            and input.is_floating_point() and target.shape[0] == input.shape[0] and reduction in REDUCTIONS
            and label_smoothing <= 1.0 and (weight is None or (weight.dtype == input.dtype
                                                               and weight.shape == input.shape[1:]))):
        return compiled.cross_entropy(input, target, weight, ignore_index, REDUCTIONS[reduction],
                                      float(label_smoothing))
    return apply(SoftmaxCrossEntropyFunction, _CE_FOR_COMPILE, input, target, weight, ignore_index, reduction,
                 label_smoothing)[0]
