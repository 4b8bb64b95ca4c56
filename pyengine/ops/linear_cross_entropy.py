"""linear_cross_entropy: cross_entropy(linear(x, W, b), t) without ever holding the (N, V) logits.

For x (N, H), W (V, H), b (V) and class targets t (N), over chunks of R rows (R * V logits fit a byte budget):
  z = x_c W^T + b                   the chunk's logits, (R, V), in float32 (float64 for float64 inputs)
  loss_r = cross_entropy(z_r, t_r)  via lse_r = log sum exp z_r, as in cross_entropy.py (label smoothing too)
  dz = p - y'                       the row's gradient (softmax minus the smoothed one-hot), written over z
  dx_c = dz W,  dW += dz^T x_c,  db += dz.sum(0)
For 'mean' and 'sum' the incoming gradient is one number, so the forward (when any input needs a gradient)
runs the whole backward in the same pass, three GEMMs in all like the unfused pair, and saves dx, dW, db of
the summed loss; the backward only scales them by grad / denom (denom: the count of kept rows, a device
tensor: the host never waits for it). For 'none' the incoming gradient differs per row and is known only in
the backward: the forward keeps one lse per row and the backward computes each chunk's logits again (a
fourth GEMM). Ignored rows (t == ignore_index) have loss 0 and gradient 0.
The GEMMs and dW, db accumulate in float32 for float16/bfloat16 inputs, which are cast back at the end.
Chunk budget: the chunk_bytes keyword, else the environment variable PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES,
else 128 MiB; the results do not depend on the thread count.
Kernels: csrc/cpu/linear_cross_entropy.cpp, csrc/cuda/linear_cross_entropy.cu (the chunk loop they share:
csrc/common/linear_cross_entropy_chunks.h).
"""
import math
import os

import torch

from .. import _backend
from ._function import (acc_dtype, apply, autocast, first_order_only, jvp_free_twin, needs_grad, note_functorch_level,
                        scalar_type_name)
from .cross_entropy import REDUCTIONS, cross_entropy_backward, cross_entropy_forward
from .linear import check_linear_args

DEFAULT_CHUNK_BYTES = 128 << 20
CHUNK_ENV = "PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES"


def chunk_rows(n, v, dtype, chunk_bytes):
    """Rows per chunk: as many as keep the chunk's logits (in the accumulation type) within chunk_bytes."""
    row = max(v, 1) * (8 if dtype == torch.float64 else 4)
    return min(max(chunk_bytes // row, 1), max(n, 1))


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
    the gradients (of the summed loss) only for reduction mean/sum and the flags set, else None."""
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
    """cross_entropy(linear(input, weight, bias), target, ...) as one autograd node, chunked over rows.
    apply(...) returns (loss, lse, denom, dx, dweight, dbias): the loss and, not differentiable, what the backward
    reads (the gradients of the summed loss where the forward computed them, else None); the functional
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
        loss, lse, denom, dx, dw, db = _backend.kernels(x.device).linear_cross_entropy_forward(
            x, weight, b, t, ignore_index, red, float(label_smoothing), *need, _chunk_bytes(chunk_bytes))
        return loss.reshape(input.shape[:-1]) if red == 0 else loss, lse, denom, dx, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, target, ignore_index, reduction, label_smoothing, chunk_bytes = inputs
        ctx.mark_non_differentiable(*(t for t in output[1:] if t is not None))
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
        input_shape, dtype, bias_shape = ctx.shapes
        input, weight, bias, target, lse, denom, dx, dw, db = ctx.saved_tensors
        need = needs_grad(ctx, 3)[:3]
        need = (need[0], need[1], need[2] and bias is not None)
        if ctx.red != 0 and all(d is not None for d, n in zip((dx, dw, db), need) if n):
            scale = grad_loss.to(denom.dtype)
            if ctx.red == 1:  # every row ignored: the saved gradients are 0 and stay 0, as torch's
                scale = scale / torch.where(denom == 0, torch.ones_like(denom), denom)
            dx, dw, db = (d * scale if d is not None and n else None for d, n in zip((dx, dw, db), need))
        else:  # each row's incoming gradient, and the chunks' logits computed again
            x, b, t = _flatten(input, weight, bias, target, ctx.args[1])
            g = grad_loss.reshape(-1).to(lse.dtype)
            if ctx.red != 0:
                g = (g / torch.where(denom == 0, torch.ones_like(denom), denom) if ctx.red == 1 else g).expand(
                    x.shape[0])
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


def linear_cross_entropy(input, weight, bias, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                         chunk_bytes=None):
    """cross_entropy(linear(input, weight, bias).reshape(-1, V), target.reshape(-1), ...) for input (*, H),
    weight (V, H), bias (V) or None, target (*) class indices; 'none' gives the loss in target's shape. The
    logits are computed chunk by chunk, at most chunk_bytes of them at a time (default: see the module doc).
    Under torch.autocast it takes the dtypes of torch's composition: the products in the autocast dtype, the loss
    in float32."""
    autocasting = torch.is_tensor(input) and torch.is_autocast_enabled(input.device.type)
    if autocasting:
        input, weight, bias = autocast("lower", input, weight, bias)
    loss = apply(LinearCrossEntropyFunction, _LCE_FOR_COMPILE, input, weight, bias, target, ignore_index, reduction,
                 label_smoothing, chunk_bytes)[0]
    return loss.float() if autocasting and loss.dtype in (torch.float16, torch.bfloat16) else loss
