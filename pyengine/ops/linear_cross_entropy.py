"""linear_cross_entropy: cross_entropy(linear(x, W, b), t) without ever holding the (N, V) logits.

For x (N, H), W (V, H), b (V) and class targets t (N), over chunks of R rows (R * V logits fit a byte budget):
  z = x_c W^T + b                   the chunk's logits, (R, V), in float32 (float64 for float64 inputs)
  loss_r = cross_entropy(z_r, t_r)  via lse_r = log sum exp z_r, as in cross_entropy.py (label smoothing too)
  dz = p - y'                       the row's gradient (softmax minus the smoothed one-hot), written over z
  dx_c = dz W,  dW += dz^T x_c,  db += dz.sum(0)
For 'mean' and 'sum' the incoming gradient is one number, so the forward (when any input needs a gradient)
runs the whole backward in the same pass, three GEMMs in all like the unfused pair, and saves dx, dW, db of
the loss ('mean' divides them by denom, the count of kept rows, in place); the backward only scales them by
the incoming gradient. For 'none' the incoming gradient differs per row and is known only in
the backward: the forward keeps one lse per row and the backward computes each chunk's logits again (a
fourth GEMM). Ignored rows (t == ignore_index) have loss 0 and gradient 0.
Here (the python reference) the GEMMs run in float32 for float16/bfloat16 inputs. The compiled kernels run them
in the input's own dtype where the device multiplies it faster than float32 (CUDA; a CPU with avx512_bf16 or
AMX for bfloat16, avx512_fp16 or AMX-FP16 for float16; PYENGINE_HALF_GEMM=on/off overrides), float32 inside:
the chunk's logits and dz are then rounded to that dtype, as torch's unfused pair rounds them. Either way the
row pass computes in float32, and dW, db accumulate in float32 and are cast back once at the end.
Chunk budget: the chunk_bytes keyword, else the environment variable PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES,
else 16 MiB; the results do not depend on the thread count.
The kernels take no class weights: the functional linear_cross_entropy (torch 2.14's signature) weights the
kernels' per-row loss in Python, runs K-dimensional losses one position at a time, and sends class
probabilities to linear + cross_entropy (see its docstring).
Kernels: csrc/cpu/linear_cross_entropy.cpp, csrc/cuda/linear_cross_entropy.cu (the chunk loop they share:
csrc/common/linear_cross_entropy_chunks.h).
"""
import contextlib
import math
import os

import torch

from .. import _backend
from ._function import (acc_dtype, apply, autocast, first_order_only, jvp_free_twin, needs_grad, not_differentiable,
                        note_functorch_level, scalar_type_name)
from .cross_entropy import REDUCTIONS, cross_entropy, cross_entropy_backward, cross_entropy_forward
from .linear import check_linear_args, linear

DEFAULT_CHUNK_BYTES = 16 << 20
CHUNK_ENV = "PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES"


def chunk_rows(n, v, dtype, chunk_bytes):
    """Rows per chunk: as many as keep the chunk's logits (in the accumulation type) within chunk_bytes, in whole
    panels of 16 rows where more than 16 fit (the kernels' GEMMs block their rows by 8-16)."""
    rows = chunk_bytes // (max(v, 1) * (8 if dtype == torch.float64 else 4))
    rows = rows - rows % 16 if rows > 16 else rows
    return min(max(rows, 1), max(n, 1))


def _grad_buffers(x, v, acc, need_x, need_weight, need_bias):
    n, h = x.shape
    return (x.new_empty((n, h), dtype=acc) if need_x else None,
            x.new_zeros((v, h), dtype=acc) if need_weight else None,
            x.new_zeros((v,), dtype=acc) if need_bias else None)


def _chunks(x, weight, bias, target, chunk_bytes):
    """Yields (rows, logits z, targets, x rows, W) per chunk of rows, all in the accumulation type."""
    n, v = x.shape[0], weight.shape[0]
    acc = acc_dtype(x.dtype)
    w = weight.to(acc)
    b = None if bias is None else bias.to(acc)
    step = chunk_rows(n, v, x.dtype, chunk_bytes)
    for r0 in range(0, n, step):
        rows = slice(r0, min(r0 + step, n))
        xc = x[rows].to(acc)
        z = xc @ w.T if b is None else torch.addmm(b, xc, w.T)
        yield rows, z, target[rows], xc, w


class _Gradients:
    """dx, dW, db summed over chunks. Built from new tensors (dx row blocks joined at the end, dW and db added up)
    rather than written into buffers in place: under torch.func.vmap a chunk's values are batched and a fresh
    buffer is not, so an in-place write into it would fail."""

    def __init__(self, x, v, need_x, need_weight, need_bias):
        acc = acc_dtype(x.dtype)
        self.dx = [] if need_x else None
        self.dw = x.new_zeros((v, x.shape[1]), dtype=acc) if need_weight else None
        self.db = x.new_zeros((v,), dtype=acc) if need_bias else None
        self.empty_dx = x.new_empty((0, x.shape[1]), dtype=acc)

    def add(self, dz, xc, w):
        if self.dx is not None:
            self.dx.append(dz @ w)
        if self.dw is not None:
            self.dw = self.dw + dz.T @ xc
        if self.db is not None:
            self.db = self.db + dz.sum(0)

    def result(self):
        dx = None if self.dx is None else torch.cat(self.dx) if self.dx else self.empty_dx
        return dx, self.dw, self.db


@_backend.reference
def linear_cross_entropy_forward(x, weight, bias, target, ignore_index=-100, reduction=1, label_smoothing=0.0,
                                 need_x=True, need_weight=True, need_bias=True, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """x (N, H), weight (V, H), bias (V) or None, target (N) -> (loss, lse (N), denom, dx, dweight, dbias);
    the gradients (of the loss returned: for 'mean' divided by denom, the count of kept rows) only for reduction
    mean/sum and the flags set, else None."""
    v = weight.shape[0]
    acc = acc_dtype(x.dtype)
    need_bias = need_bias and bias is not None
    grad = reduction != 0 and (need_x or need_weight or need_bias)
    grads = _Gradients(x, v, need_x, need_weight, need_bias) if grad else None
    lse, rows_loss = [x.new_empty((0,), dtype=acc)], [x.new_empty((0,), dtype=acc)]
    for _, z, t, xc, w in _chunks(x, weight, bias, target, chunk_bytes):
        z3, t2 = z.unsqueeze(2), t.unsqueeze(1)
        loss_c, lse_c, _ = cross_entropy_forward(z3, t2, None, ignore_index, 0, label_smoothing)
        lse.append(lse_c.squeeze(1))
        rows_loss.append(loss_c.squeeze(1))
        if grad:
            ones = torch.ones_like(lse_c)
            grads.add(cross_entropy_backward(ones, z3, t2, None, lse_c, None, ignore_index, 0,
                                             label_smoothing).squeeze(2), xc, w)
    lse, rows_loss = torch.cat(lse), torch.cat(rows_loss)
    denom = (target != ignore_index).sum().to(acc)  # a device tensor: never read by the host
    loss = rows_loss if reduction == 0 else rows_loss.sum() if reduction == 2 else rows_loss.sum() / denom
    dx, dw, db = grads.result() if grad else (None, None, None)
    if reduction == 1 and grad:
        dx, dw, db = (None if d is None else d / _mean_divisor(denom) for d in (dx, dw, db))
    return loss.to(x.dtype), lse, denom, dx, dw, db


@_backend.reference
def linear_cross_entropy_backward(grad_loss, x, weight, bias, target, lse, ignore_index=-100, label_smoothing=0.0,
                                  need_x=True, need_weight=True, need_bias=True, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """reduction none: grad_loss (N) -> (dx, dweight, dbias) of sum_r grad_loss_r loss_r, recomputing each
    chunk's logits from x."""
    need_bias = need_bias and bias is not None
    grads = _Gradients(x, weight.shape[0], need_x, need_weight, need_bias)
    if need_x or need_weight or need_bias:
        for rows, z, t, xc, w in _chunks(x, weight, bias, target, chunk_bytes):
            g = grad_loss[rows].unsqueeze(1)
            grads.add(cross_entropy_backward(g, z.unsqueeze(2), t.unsqueeze(1), None, lse[rows].unsqueeze(1), None,
                                             ignore_index, 0, label_smoothing).squeeze(2), xc, w)
    return grads.result()


def _flatten(input, weight, bias, target, label_smoothing):
    """Checks the arguments as torch's linear + cross_entropy would and views them as x (N, H), target (N)."""
    if weight.dim() == 1 and input.dim() >= 1:
        raise RuntimeError("mat2 must be a matrix, got 1-D tensor (linear_cross_entropy's weight is (V, H))")
    if bias is not None and bias.dim() <= 1 and bias.numel() == 1 and weight.dim() == 2:
        bias = bias.reshape(1).expand(weight.shape[0])  # one element broadcasts, as torch's linear allows
    check_linear_args(input, weight, bias)
    if not input.is_floating_point():
        raise NotImplementedError(f"\"linear_cross_entropy\" not implemented for '{scalar_type_name(input.dtype)}' "
                                  "(torch: log_softmax is not implemented for integer types)")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}")
    if input.dim() == 1 and target.dim() != 0:
        raise RuntimeError(f"cross_entropy: for input of shape (H) the target is a 0-dim class index, "
                           f"got shape {list(target.shape)}")
    if input.dim() > 1 and target.shape != input.shape[:-1]:
        raise ValueError(f"Expected input batch_size ({math.prod(input.shape[:-1])}) to match target batch_size "
                         f"({target.numel()}): target must have shape {list(input.shape[:-1])}, got "
                         f"{list(target.shape)}")
    n, h = math.prod(input.shape[:-1]), input.shape[-1]
    return input.reshape(n, h).contiguous(), bias, target.reshape(n).to(torch.int64).contiguous()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """cross_entropy(linear(input, weight, bias), target, ...) as one autograd node, chunked over rows:
    apply(input (*, H), weight (V, H), bias (V) or None, target (*) int64, ignore_index=-100, reduction='mean',
    label_smoothing=0.0, chunk_bytes=None) with the arguments of cross_entropy, no class weights, and chunk_bytes
    the logits budget per chunk (None: PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES, else 16 MiB).
    apply(...) returns (loss, lse, denom, dx, dweight, dbias): the loss and, not differentiable, what the backward
    reads (the loss's gradients where the forward computed them, else None); the functional
    pyengine.functional.linear_cross_entropy returns the loss alone."""
    generate_vmap_rule = True

    @staticmethod
    def forward(input, weight, bias, target, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                chunk_bytes=None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"{reduction} is not a valid value for reduction")
        x, b, t = _flatten(input, weight, bias, target, label_smoothing)
        red = REDUCTIONS[reduction]
        # mean/sum when training: the whole backward in the forward's pass, for the inputs that require grad (the
        # forward does not see ctx). Not under torch.func, whose forward sees unwrapped tensors: the backward
        # computes what it needs then.
        early = red != 0 and not torch._C._are_functorch_transforms_active()
        need = (early and input.requires_grad, early and weight.requires_grad,
                early and bias is not None and bias.requires_grad)
        # the gradients of the loss itself (the mean's divided by the kernel): the backward of an incoming 1 is
        # these tensors, with no weight-sized copy
        loss, lse, denom, dx, dw, db = _backend.kernels(x.device).linear_cross_entropy_forward(
            x, weight, b, t, ignore_index, red, float(label_smoothing), *need, _chunk_bytes(chunk_bytes))
        return loss.reshape(input.shape[:-1]) if red == 0 else loss, lse, denom, dx, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_bytes = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
        # no zeros made for the gradients of those outputs: dweight's would be a weight-sized block at every
        # backward (141 MiB transient at the LM head)
        ctx.set_materialize_grads(False)
        note_functorch_level(ctx)
        ctx.kernels = _backend.kernels(input.device)
        ctx.red = REDUCTIONS[reduction]
        ctx.args = (ignore_index, float(label_smoothing))
        ctx.chunk_bytes = _chunk_bytes(chunk_bytes)
        ctx.shapes = (input.shape, input.dtype, None if bias is None else bias.shape)
        # the inputs themselves: read by the backward of 'none' (and wherever the forward computed no gradient),
        # and linked to the double-backward error node otherwise, so a second derivative asked of them raises
        # instead of finding them unused
        ctx.save_for_backward(input, weight, bias, target, *output[1:])

    @staticmethod
    @first_order_only("linear_cross_entropy", instead="cross_entropy(linear(...)) from torch.nn.functional")
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return None, None, None, None, None, None, None, None
        input_shape, dtype, bias_shape = ctx.shapes
        input, weight, bias, target, lse, denom, dx, dw, db = ctx.saved_tensors
        need = needs_grad(ctx, 3)[:3]
        need = (need[0], need[1], need[2] and bias is not None)
        if ctx.red != 0 and all(d is not None for d, n in zip((dx, dw, db), need) if n):
            # the forward's gradients are those of the loss (mean already divided): the usual incoming 1 takes
            # them as they are, with no weight-sized copy (read only from a plain CPU tensor: on a GPU reading
            # it would wait for the device, and a traced or batched one has no value)
            one = (type(grad_loss) is torch.Tensor and grad_loss.is_cpu
                   and not torch._C._are_functorch_transforms_active() and grad_loss.item() == 1.0)
            scale = grad_loss.to(denom.dtype)
            dx, dw, db = ((d if one else d * scale) if d is not None and n else None
                          for d, n in zip((dx, dw, db), need))
        else:  # each row's incoming gradient, and the chunks' logits computed again
            x, b, t = _flatten(input, weight, bias, target, ctx.args[1])
            g = grad_loss.reshape(-1).to(lse.dtype)
            if ctx.red != 0:
                g = (g / _mean_divisor(denom) if ctx.red == 1 else g).expand(x.shape[0])
            dx, dw, db = _backend.backward_kernels(ctx.kernels).linear_cross_entropy_backward(
                g.contiguous(), x, weight, b, t, lse, *ctx.args, *need, ctx.chunk_bytes)
        dx = None if dx is None else dx.to(dtype).reshape(input_shape)
        dw = None if dw is None else dw.to(dtype)
        db = None if db is None else db.to(dtype).sum_to_size(bias_shape)
        return dx, dw, db, None, None, None, None, None

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("pyengine.linear_cross_entropy has no forward-mode AD (jvp, torch.func.jacfwd); "
                                  "use torch.func.jacrev or vjp, or cross_entropy(linear(...)) from "
                                  "torch.nn.functional")


_LCE_FOR_COMPILE = jvp_free_twin(LinearCrossEntropyFunction)


def _chunk_bytes(chunk_bytes):
    return int(os.environ.get(CHUNK_ENV, DEFAULT_CHUNK_BYTES) if chunk_bytes is None else chunk_bytes)



def _check_api_args(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing):
    """torch.nn.functional.linear_cross_entropy's checks, in its order and with its messages, plus the leading
    batch dims pyengine allows. Returns (lead, out_features, probabilities): input is (*lead, H), linear_weight
    (C, *out_features, H), and the target holds class probabilities when its shape is the logits' (*lead, C,
    *out_features) (torch's rule), class indices otherwise."""
    if input.dim() < 1:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()} (pyengine also takes "
                           "leading batch dims: (*, in_features))")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError("expected equal input and linear_weight last dimensions (in_features), "
                           f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively")
    lead, num_classes, out = tuple(input.shape[:-1]), linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out)}, got {tuple(linear_bias.shape)}")
    if out and not lead:
        raise RuntimeError(f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
                           f" batched input, (N, {input.shape[-1]}), got unbatched input with shape "
                           f"{tuple(input.shape)}")
    probabilities = tuple(target.shape) == (*lead, num_classes, *out)
    if probabilities and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if label_smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if probabilities:
        return lead, out, True  # pyengine's cross_entropy checks the rest, as torch's does
    if tuple(target.shape) != (*lead, *out):
        if not lead:
            if target.dim() > 1:
                raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
            if target.dim() == 1 and target.shape[0] != 1:
                raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
        elif out or len(lead) > 1:
            raise RuntimeError(f"Expected target size {[*lead, *out]}, got {list(target.shape)} (class indices; "
                               f"class probabilities have the logits' shape {[*lead, num_classes, *out]})")
        elif target.dim() > 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        else:
            raise ValueError(f"Expected input batch_size ({lead[0]}) to match target batch_size "
                             f"({target.shape[0] if target.dim() else 0}).")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {scalar_type_name(target.dtype)}")
    if weight is not None and (weight.dim() != 1 or weight.numel() != num_classes):
        raise RuntimeError("weight tensor should be defined either for all or no classes" if out else
                           f"weight tensor should be defined either for all {num_classes} classes or no classes "
                           f"but got weight tensor of shape: {list(weight.shape)}")
    return lead, out, False


def _mean_divisor(denom):
    """The count of kept rows that 'mean' divides the gradients by, 0 taken as 1: where every row is ignored the
    gradients are 0 and stay 0 (torch's, for its NaN mean)."""
    return torch.where(denom == 0, torch.ones_like(denom), denom)


def _kept_mean(total, denom, kept):
    """total / denom, as torch's 'mean'; where no row is kept, NaN (torch's 0 / 0) with zero gradients."""
    none_kept = kept == 0
    value = total / torch.where(none_kept, torch.ones_like(denom), denom)
    return torch.where(none_kept, torch.full_like(value, float("nan")), value)


def _weighted_rows(x, w, b, t, class_weight, ignore_index, label_smoothing, chunk_bytes):
    """Class-weighted cross_entropy(linear(x, w, b), t) per row, as torch's (for x (N, H), w (C, H), b (C) or None,
    t (N) int64), from the kernels' unweighted per-row loss l0 = lse - z_t: returns (nll, smooth, w_t) with
      nll_r = w_{t_r} l0_r                                      torch's nll_loss term
      smooth_r = sum_c w_c (lse_r - z_rc) = W lse_r - x_r . (w^T cw) - b . cw    (W = sum_c cw_c)
    where lse_r = l0_r + z_{r,t_r} (z_{r,t_r} = x_r . w_{t_r} + b_{t_r}); both 0 on ignored rows, smooth None
    without label smoothing. No (N, C) tensor is formed: the kernels chunk the logits, the rest is (N, H) at most.
    Differentiable by autograd (the kernels' 'none' backward, then gathers and products)."""
    l0 = apply(LinearCrossEntropyFunction, _LCE_FOR_COMPILE, x, w, b, t, ignore_index, "none", 0.0, chunk_bytes)[0]
    keep = t != ignore_index
    safe = torch.where(keep, t, torch.zeros_like(t))
    kept = keep.to(x.dtype)
    w_t = class_weight[safe] * kept
    nll = w_t * l0
    if label_smoothing <= 0:
        return nll, None, w_t
    z_t = (x * w[safe]).sum(-1) + (0 if b is None else b[safe])
    lin = x @ (w.T @ class_weight) + (0 if b is None else (b * class_weight).sum())
    smooth = (class_weight.sum() * (l0 + z_t) - lin) * kept
    return nll, smooth, w_t


def _class_index_loss(x, lw, lb, t, class_weight, ignore_index, reduction, label_smoothing, chunk_bytes):
    """x (N, H), lw (C, D, H), lb (C, D) or None, t (N, D) int64: torch's cross_entropy of the (N, C, D) logits,
    one position d at a time (each a chunked (N, C) problem); 'none' gives (N, D)."""
    c, d = lw.shape[0], lw.shape[1]
    per_row = reduction == "none" or class_weight is not None
    kept = (t != ignore_index).sum()
    losses, nlls, smooths, w_ts = [], [], [], []
    for j in range(d):
        wj, bj, tj = lw[:, j], None if lb is None else lb[:, j], t[:, j]
        if class_weight is None:
            losses.append(apply(LinearCrossEntropyFunction, _LCE_FOR_COMPILE, x, wj, bj, tj, ignore_index,
                                "none" if per_row else "sum", label_smoothing, chunk_bytes)[0])
            continue
        nll, smooth, w_t = _weighted_rows(x, wj, bj, tj, class_weight, ignore_index, label_smoothing, chunk_bytes)
        nlls.append(nll)
        w_ts.append(w_t)
        if smooth is not None:
            smooths.append(smooth)
        losses.append((1 - label_smoothing) * nll + label_smoothing / c * smooth if smooth is not None else nll)
    if reduction == "none":
        return torch.stack(losses, 1) if losses else x.new_zeros((x.shape[0], 0))
    if class_weight is None:
        total = sum(loss.sum() for loss in losses) if losses else x.new_zeros(())
        return total if reduction == "sum" else _kept_mean(total, kept.to(total.dtype), kept)
    if reduction == "sum":
        return sum(loss.sum() for loss in losses) if losses else x.new_zeros(())
    # torch's weighted mean: the nll and smoothing sums, each over the sum of w_t of the kept rows
    denom = sum(w_t.sum() for w_t in w_ts) if w_ts else x.new_zeros(())
    loss = _kept_mean((1 - label_smoothing) * sum(n.sum() for n in nlls), denom, kept) if nlls else x.new_zeros(())
    if smooths:
        loss = loss + label_smoothing / c * _kept_mean(sum(s.sum() for s in smooths), denom, kept)
    return loss


def _probability_loss(input, lw, lb, target, class_weight, reduction, label_smoothing, lead, out):
    """Class probabilities: pyengine's linear, then pyengine's cross_entropy, as torch's reference path. The
    (N, C, *out_features) logits are formed whole, as the target already is."""
    h, c = input.shape[-1], lw.shape[0]
    classes = math.prod(out, start=c)
    x = input if input.dim() == 1 else input.reshape(math.prod(lead), h)
    logits = linear(x, lw.reshape(classes, h), None if lb is None else lb.reshape(classes))
    if input.dim() > 1:
        logits, target = logits.reshape(x.shape[0], c, *out), target.reshape(x.shape[0], c, *out)
    loss = cross_entropy(logits, target, class_weight, reduction=reduction, label_smoothing=label_smoothing)
    return loss.reshape((*lead, *out)) if reduction == "none" else loss


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0, options=None, chunk_bytes=None):
    """cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without ever holding the whole
    (N, C) logits: torch.nn.functional.linear_cross_entropy (new in torch 2.14), with its signature, defaults,
    values and gradients, computed over chunks of rows. pyengine's own implementation: it works on any torch.

    Args:
        input (Tensor): (N, H) or (H), H = in_features. Not in torch: leading batch dims (*, H), which give torch's
            result for input.reshape(-1, H) with the target flattened to match ('none' reshaped back).
        linear_weight (Tensor): (C, H), C classes; or (C, d1, ..., dK, H) for torch's K-dimensional loss (the
            logits are then (N, C, d1, ..., dK); input must be batched).
        target (Tensor): class indices, int64 or uint8, of shape (*, d1, ..., dK) (() for a 1-D input); or class
            probabilities, floating, of the logits' shape (*, C, d1, ..., dK) (torch's rule: equal shapes mean
            probabilities).
        linear_bias (Tensor, optional): (C, d1, ..., dK) exactly (no broadcasting, as torch). Default: None.
        weight (Tensor, optional): (C,) class weights, of input's dtype: each row's loss is scaled by
            weight[target] and 'mean' divides by the sum of weight[target] over the rows kept; with label
            smoothing every class's term is weighted (torch's values). As torch, a weight that requires grad is
            an error with class indices (RuntimeError: not differentiable) and is differentiated with
            probabilities. Default: None.
        reduction (str, optional): 'mean', 'sum' or 'none' (the loss per row, in the target's shape less the
            class dim). Default: 'mean'.
        ignore_index (int, optional): None means -100 with class indices (torch's default); rows whose target
            is ignore_index have loss 0 and gradient 0, and 'mean' skips them (every row ignored: NaN with zero
            gradients, as torch's 0 / 0). Must be None with probabilities (torch's error). Default: None.
        label_smoothing (float, optional): in [0.0, 1.0]; mixes the target with the uniform distribution
            (a negative value smooths nothing, as torch). Default: 0.0.
        options (torch.nn.LinearCrossEntropyOptions, optional): accepted for compatibility. torch runs its
            unchunked reference path for None and its chunked path otherwise; pyengine always chunks, with the
            same values either way. Only options.batch_chunk_size is read: when set (and chunk_bytes is not),
            it is the rows per chunk. chunking_method, acc_policy, acc_dtype and allow_retain_graph are ignored:
            pyengine accumulates in float32 (float64 for float64 inputs) and backward may run again with
            retain_graph=True. Default: None.
        chunk_bytes (int, optional): not in torch, keyword-only: the bytes one chunk's logits may take (rows per
            chunk = chunk_bytes // (C * 4), or // (C * 8) for float64; at least one row). Default: the
            environment variable PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES, else 16 MiB. The results do not
            depend on it.

    Shape:
        - input (*, H) or (H); linear_weight (C, *out_features, H); target (*, *out_features) of class indices
          or (*, C, *out_features) of probabilities; output: a scalar, or with reduction='none' the target's
          shape ((*, *out_features), () for a 1-D input).

    Returns:
        Tensor: input's dtype (float32 under torch.autocast, whose dtype the products take, as torch's
        composition).

    How: class indices without class weights or K dims run the fused kernels ('mean'/'sum' compute the
    gradients in the forward's pass: three GEMMs). Class weights take the kernels' unweighted per-row loss and
    weight it in Python by autograd (still no (N, C) tensor; one (N, H) gather; the backward computes the
    chunks' logits again). K dims run one chunked (N, C) problem per position. Those two paths compute
    float16/bfloat16 inputs in float32 and round the loss once. Class probabilities run pyengine's linear then
    pyengine's cross_entropy: the logits are formed whole, as the target already is.

    Autograd: first derivatives for input, linear_weight, linear_bias (and a probability target and its class
    weight). Not as torch: no double backward and no forward-mode AD (torch.func.jvp, jacfwd) on the kernel
    paths (a clear error; torch's chunked path has neither); no __torch_function__ dispatch.

    Example:
        >>> import torch, pyengine.functional as PF
        >>> x, w = torch.ones(3, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> target = torch.tensor([0, 1, -100])
        >>> PF.linear_cross_entropy(x, w, target)
        tensor(0.8620)
        >>> PF.linear_cross_entropy(x, w, target, weight=torch.tensor([1.0, 3.0, 1.0]), reduction="none",
        ...                         label_smoothing=0.3)
        tensor([1.1344, 2.3412, 0.0000])
    """
    lead, out, probabilities = _check_api_args(input, linear_weight, target, linear_bias, weight, reduction,
                                               ignore_index, label_smoothing)
    label_smoothing = label_smoothing if label_smoothing > 0 else 0.0
    autocasting = torch.is_autocast_enabled(input.device.type)
    if autocasting:
        input, linear_weight, linear_bias = autocast("lower", input, linear_weight, linear_bias)
    if chunk_bytes is None and getattr(options, "batch_chunk_size", None):
        chunk_bytes = options.batch_chunk_size * max(linear_weight.shape[0], 1) * (
            8 if input.dtype == torch.float64 else 4)
    if probabilities:
        loss = _probability_loss(input, linear_weight, linear_bias, target, weight, reduction, label_smoothing,
                                 lead, out)
        return loss.float() if autocasting and loss.dtype in (torch.float16, torch.bfloat16) else loss
    ignore_index = -100 if ignore_index is None else ignore_index
    if input.dim() == 1 and target.dim() == 1:
        target = target.reshape(())  # a 1-D input's one-element target: torch takes it as the class index
    if weight is None and not out:  # the fused kernels
        # the usual call, x (N, H) and class indices (N) of one device and dtype, as a C++ node (eagerly, on the
        # compiled backends; csrc/autograd_linear_cross_entropy.cpp); the Python Function takes every other call
        compiled = None if autocasting else getattr(_backend.compiled_autograd(input), "linear_cross_entropy", None)
        if (compiled is not None and input.dim() == 2 and target.dim() == 1 and target.dtype == torch.int64
                and input.is_floating_point() and linear_weight.dtype == input.dtype
                and linear_weight.device == input.device and target.device == input.device
                and (linear_bias is None or (linear_bias.dtype == input.dtype
                                             and linear_bias.device == input.device))):
            return compiled(input, linear_weight, linear_bias, target, ignore_index, REDUCTIONS[reduction],
                            float(label_smoothing), _chunk_bytes(chunk_bytes))
        loss = apply(LinearCrossEntropyFunction, _LCE_FOR_COMPILE, input, linear_weight, linear_bias, target,
                     ignore_index, reduction, label_smoothing, chunk_bytes)[0]
        return loss.float() if autocasting and loss.dtype in (torch.float16, torch.bfloat16) else loss
    not_differentiable("nll_loss_forward", weight=weight)
    if weight is not None and weight.dtype != input.dtype and not autocasting:
        raise RuntimeError(f"expected scalar type {scalar_type_name(input.dtype)} but found "
                           f"{scalar_type_name(weight.dtype)}")
    h, c, d = input.shape[-1], linear_weight.shape[0], math.prod(out)
    n = math.prod(lead)
    x, lw = input.reshape(n, h), linear_weight.reshape(c, d, h)
    lb = None if linear_bias is None else linear_bias.reshape(c, d)
    check_linear_args(x, lw.reshape(c * d, h), None if lb is None else lb.reshape(c * d))
    if not x.is_floating_point():
        raise NotImplementedError(f"\"linear_cross_entropy\" not implemented for '{scalar_type_name(x.dtype)}' "
                                  "(torch: log_softmax is not implemented for integer types)")
    acc = acc_dtype(x.dtype)
    x, lw = x.to(acc), lw.to(acc)
    lb = None if lb is None else lb.to(acc)
    cw = None if weight is None else weight.to(acc)
    # in acc throughout: autocast would round the weighting's own products to its dtype
    with torch.autocast(input.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        loss = _class_index_loss(x, lw, lb, target.reshape(n, d).to(torch.int64), cw, ignore_index, reduction,
                                 label_smoothing, chunk_bytes)
    loss = loss.reshape((*lead, *out)) if reduction == "none" else loss
    half = input.dtype in (torch.float16, torch.bfloat16)
    return loss.to(torch.float32 if autocasting and half else input.dtype)
