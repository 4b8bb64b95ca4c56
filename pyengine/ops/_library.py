"""torch.ops.pyengine: the compiled kernels as torch.library custom operators.

csrc/bindings.cpp defines each kernel's schema and registers its CPU and CUDA implementations, the same
functions pybind11 exposes as pyengine._C.<name>. This module adds what the C++ side cannot say:
  - a fake implementation per operator: the shape, dtype and strides of its outputs, computed without running
    it, which torch.compile, torch.export and FakeTensor tracing need;
  - autograd for every forward operator, so torch.ops.pyengine.<op>_forward is differentiable on its own (the
    backward calls the matching torch.ops.pyengine.<op>_backward).
The autograd Functions in pyengine/ops/*.py call these operators (instead of pyengine._C) while torch.compile
traces them, so a compiled model keeps pyengine's kernels inside one graph.
Check them with torch.library.opcheck (tests/test_library.py does, for every operator).

It also gives them what torch.func and torch.jit.trace need:
  - vmap rules for the elementwise operators and linear_forward: the kernels run once over the whole batch (the
    others take torch's per-sample fallback);
  - TRACED, the interface of pyengine._C.autograd written with these differentiable operators: while
    torch.jit.trace records, pyengine.functional calls it (pyengine/_backend.py compiled_autograd), so the trace
    holds pyengine::<op>_forward calls, which run, differentiate, save and load (after `import pyengine`).
"""
import types

import torch

from .. import _backend
from ._function import acc_dtype, contiguous, first_order_only

NAMESPACE = "pyengine"
REDUCTION_NONE = 0


def _fake(name):
    def register(fn):
        torch.library.register_fake(f"{NAMESPACE}::{name}", fn)
        return fn

    return register


def _autograd(name, setup_context):
    def register(backward):
        torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context)
        return backward

    return register


def _with_defaults(inputs, defaults):
    """The inputs setup_context receives, completed with the schema's defaults (a traced call may drop trailing
    arguments left at their defaults); `defaults` has one entry per schema argument."""
    return tuple(inputs) + tuple(defaults[len(inputs):])


def _contiguous_like(t):
    return t.new_empty(t.shape)


def _grads(kernel_name, *args):
    """Runs the backward kernel; with create_graph=True the python reference, which autograd can differentiate."""
    return getattr(_backend.backward_kernels(torch.ops.pyengine), kernel_name)(*args)


def _register():
    ops = torch.ops.pyengine

    # linear: x (M, K), weight (N, K), bias (N) -> act(x W^T + b) (M, N); with an activation the backward reads y
    @_fake("linear_forward")
    def _(x, weight, bias=None, activation=0):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @_fake("linear_backward")
    def _(grad_y, x, weight, need_x=True, need_weight=True, need_bias=True, activation=0, y=None):
        return (x.new_empty(x.shape) if need_x else None, weight.new_empty(weight.shape) if need_weight else None,
                weight.new_empty(weight.shape[:1]) if need_bias else None)

    def linear_setup(ctx, inputs, output):
        x, weight, bias, ctx.activation = _with_defaults(inputs, (None, None, None, 0))
        ctx.save_for_backward(x, weight, *([output] if ctx.activation else []))
        ctx.has_bias = bias is not None

    @_autograd("linear_forward", linear_setup)
    def _(ctx, grad_y):
        x, weight, *y = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        grads = _grads("linear_backward", grad_y.contiguous(), x, weight, need_x, need_w, need_b, ctx.activation, *y)
        return (*grads, None)

    # relu, sigmoid, tanh: any shape; the backward reads the saved output y. The kernels lay their outputs out as
    # torch lays out its own (csrc/common/layout.h), so the fakes take the layout of torch's ops.
    torch_backward = {"relu": lambda grad_y, y: torch.ops.aten.threshold_backward(grad_y, y, 0),
                      "sigmoid": torch.ops.aten.sigmoid_backward, "tanh": torch.ops.aten.tanh_backward}
    for op in ("relu", "sigmoid", "tanh"):
        _fake(f"{op}_forward")(lambda x: torch.empty_like(x))
        _fake(f"{op}_backward")(lambda grad_y, y, op=op: torch_backward[op](grad_y, y))

        def output_setup(ctx, inputs, output):
            ctx.save_for_backward(output)

        def output_backward(ctx, grad_y, op=op):
            (y,) = ctx.saved_tensors
            return _grads(f"{op}_backward", grad_y, y)

        _autograd(f"{op}_forward", output_setup)(output_backward)

    # leaky_relu: the backward reads the saved input
    _fake("leaky_relu_forward")(lambda x, negative_slope=0.01: torch.empty_like(x))
    _fake("leaky_relu_backward")(lambda grad_y, x, negative_slope=0.01: torch.ops.aten.leaky_relu_backward(
        grad_y, x, negative_slope, False))

    def leaky_relu_setup(ctx, inputs, output):
        x, ctx.negative_slope = _with_defaults(inputs, (None, 0.01))
        ctx.save_for_backward(x)

    @_autograd("leaky_relu_forward", leaky_relu_setup)
    def _(ctx, grad_y):
        (x,) = ctx.saved_tensors
        return _grads("leaky_relu_backward", grad_y, x, ctx.negative_slope), None

    # add: input + alpha * other, broadcast; the backward sums over the broadcast dims down to `shape`
    @_fake("add_forward")
    def _(input, other, alpha=1):
        return torch.add(input, other)  # alpha does not change the layout

    # grad * scale, laid out as grad, when nothing is summed; torch's sum_to's contiguous sum otherwise
    _fake("add_backward")(lambda grad, shape, scale=1: torch.empty_like(grad) if grad.shape == tuple(shape)
                          else grad.new_empty(shape))

    def add_setup(ctx, inputs, output):
        input, other, alpha = _with_defaults(inputs, (None, None, 1))
        ctx.shapes, ctx.alpha = (list(input.shape), list(other.shape)), alpha

    @_autograd("add_forward", add_setup)
    def _(ctx, grad):
        grads = [_grads("add_backward", grad, shape, scale) if need else None
                 for shape, scale, need in zip(ctx.shapes, (1, ctx.alpha), ctx.needs_input_grad)]
        return grads[0], grads[1], None

    # cross_entropy: logits (N, C, D); -> loss, lse (N, D) in the accumulation type, denom (0-dim)
    @_fake("cross_entropy_forward")
    def _(logits, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0):
        n, d = logits.shape[0], logits.shape[2]
        acc = acc_dtype(logits.dtype)
        loss = logits.new_empty((n, d) if reduction == REDUCTION_NONE else ())
        return loss, logits.new_empty((n, d), dtype=acc), logits.new_empty((), dtype=acc)

    @_fake("cross_entropy_backward")
    def _(grad_loss, logits, target, weight, lse, denom, ignore_index=-100, reduction=1, label_smoothing=0.0):
        return _contiguous_like(logits)

    def cross_entropy_setup(ctx, inputs, output):
        logits, target, weight, *ctx.args = _with_defaults(inputs, (None, None, None, -100, 1, 0.0))
        ctx.save_for_backward(logits, target, weight, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    @_autograd("cross_entropy_forward", cross_entropy_setup)
    @first_order_only("cross_entropy")
    def _(ctx, grad_loss, grad_lse, grad_denom):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return None, None, None, None, None, None
        logits, target, weight, lse, denom = ctx.saved_tensors
        grad = ops.cross_entropy_backward(grad_loss.contiguous(), logits, target, weight, lse, denom, *ctx.args)
        return grad, None, None, None, None, None

    # mse_loss and binary_cross_entropy_with_logits: operands of one shape; a 0-dim loss unless reduction is none
    def loss_fake(input, reduction):
        return input.new_empty(input.shape if reduction == REDUCTION_NONE else ())

    def loss_grads_fake(input, target, need_input, need_target):
        return (input.new_empty(input.shape) if need_input else None,
                target.new_empty(target.shape) if need_target else None)

    @_fake("mse_loss_forward")
    def _(input, target, reduction=1):
        return loss_fake(input, reduction)

    @_fake("mse_loss_backward")
    def _(grad_loss, input, target, reduction=1, need_input=True, need_target=True):
        return loss_grads_fake(input, target, need_input, need_target)

    @_fake("binary_cross_entropy_with_logits_forward")
    def _(input, target, weight=None, pos_weight=None, reduction=1):
        return loss_fake(input, reduction)

    @_fake("binary_cross_entropy_with_logits_backward")
    def _(grad_loss, input, target, weight=None, pos_weight=None, reduction=1, need_input=True, need_target=True):
        return loss_grads_fake(input, target, need_input, need_target)

    # the training forward of a reduced loss: the loss and the input's gradient for an incoming 1
    @_fake("binary_cross_entropy_with_logits_forward_with_grad")
    def _(input, target, weight=None, pos_weight=None, reduction=1):
        return input.new_empty(()), input.new_empty(input.shape)

    @_fake("mse_loss_forward_with_grad")
    def _(input, target, reduction=1):
        return input.new_empty(()), input.new_empty(input.shape)

    def mse_setup(ctx, inputs, output):
        input, target, ctx.reduction = _with_defaults(inputs, (None, None, 1))
        ctx.save_for_backward(input, target)

    @_autograd("mse_loss_forward", mse_setup)
    def _(ctx, grad_loss):
        input, target = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        grads = _grads("mse_loss_backward", grad_loss.contiguous(), input, target, ctx.reduction, need_input,
                       need_target)
        return grads[0], grads[1], None

    def bce_setup(ctx, inputs, output):
        *operands, ctx.reduction = _with_defaults(inputs, (None, None, None, None, 1))
        ctx.save_for_backward(*operands)

    @_autograd("binary_cross_entropy_with_logits_forward", bce_setup)
    def _(ctx, grad_loss):
        input, target, weight, pos_weight = ctx.saved_tensors
        need_input, need_target = ctx.needs_input_grad[:2]
        grads = _grads("binary_cross_entropy_with_logits_backward", grad_loss.contiguous(), input, target,
                       weight, pos_weight, ctx.reduction, need_input, need_target)
        return grads[0], grads[1], None, None, None

    # fused_mlp: x (M, in), weights (out_i, in_i), biases (out_i) -> [y (M, out_last), hidden outputs (M, out_i)...]
    @_fake("fused_mlp_forward")
    def _(x, weights, biases, activation=1, output_activation=0):
        return [x.new_empty((x.shape[0], w.shape[0])) for w in weights[-1:] + weights[:-1]]

    @_fake("fused_mlp_backward")
    def _(grad_y, x, weights, hidden, y, activation, output_activation, need_x=True, need_weights=True,
          need_biases=True):
        return ([x.new_empty(x.shape) if need_x else None]
                + [w.new_empty(w.shape) if need_weights else None for w in weights]
                + [w.new_empty(w.shape[:1]) if need_biases else None for w in weights])

    def fused_mlp_setup(ctx, inputs, output):
        x, weights, _, *ctx.activations = _with_defaults(inputs, (None, None, None, 1, 0))
        ctx.save_for_backward(x, *output, *weights)
        ctx.layers = len(weights)

    @_autograd("fused_mlp_forward", fused_mlp_setup)
    @first_order_only("fused_mlp", instead="an unfused torch.nn.Sequential of Linear and activation layers")
    def _(ctx, grad_outputs):
        x, y, *rest = ctx.saved_tensors
        hidden, weights = rest[:ctx.layers - 1], rest[ctx.layers - 1:]
        need_x, need_w, need_b = (any(n) if isinstance(n, (list, tuple)) else n for n in ctx.needs_input_grad[:3])
        grads = ops.fused_mlp_backward(grad_outputs[0].contiguous(), x, weights, hidden, y, *ctx.activations,
                                       need_x, need_w, need_b)
        n = ctx.layers
        # one entry per weight and bias even where none is needed: AOT autograd (torch 2.11) wants the inputs' shape
        return (grads[0], list(grads[1:1 + n]) if need_w else [None] * n, list(grads[1 + n:]) if need_b else [None] * n,
                None, None)[:len(ctx.needs_input_grad)]  # one per input given: a traced call drops defaults

    # linear_cross_entropy: x (N, H), weight (V, H), bias (V), target (N) -> loss, lse (N), denom, and for
    # mean/sum the loss's gradients (the mean's divided by denom), in the accumulation type, where their flags
    # are set
    @_fake("linear_cross_entropy_forward")
    def _(x, weight, bias, target, ignore_index, reduction, label_smoothing, need_x, need_weight, need_bias,
          chunk_bytes):
        acc, n = acc_dtype(x.dtype), x.shape[0]
        grads = reduction != REDUCTION_NONE
        return (x.new_empty((n,) if reduction == REDUCTION_NONE else ()), x.new_empty((n,), dtype=acc),
                x.new_empty((), dtype=acc), x.new_empty(x.shape, dtype=acc) if grads and need_x else None,
                x.new_empty(weight.shape, dtype=acc) if grads and need_weight else None,
                x.new_empty(weight.shape[:1], dtype=acc) if grads and need_bias else None)

    @_fake("linear_cross_entropy_backward")
    def _(grad_loss, x, weight, bias, target, lse, ignore_index, label_smoothing, need_x, need_weight, need_bias,
          chunk_bytes):
        acc = acc_dtype(x.dtype)
        return (x.new_empty(x.shape, dtype=acc) if need_x else None,
                x.new_empty(weight.shape, dtype=acc) if need_weight else None,
                x.new_empty(weight.shape[:1], dtype=acc) if need_bias else None)

    def lce_setup(ctx, inputs, output):
        x, weight, bias, target, *ctx.args = inputs
        ctx.save_for_backward(x, weight, bias, target, *output[1:])
        ctx.mark_non_differentiable(*(o for o in output[1:] if o is not None))
        ctx.set_materialize_grads(False)  # no weight-sized zeros for dweight's gradient at every backward

    @_autograd("linear_cross_entropy_forward", lce_setup)
    @first_order_only("linear_cross_entropy", instead="cross_entropy(linear(...)) from torch.nn.functional")
    def _(ctx, grad_loss, *unused):
        if grad_loss is None:  # no gradient reached the loss (grads are not materialized)
            return (None,) * 11
        x, weight, bias, target, lse, denom, dx, dw, db = ctx.saved_tensors
        ignore_index, reduction, smoothing, need_x, need_w, need_b, chunk_bytes = ctx.args
        if reduction == REDUCTION_NONE:
            dx, dw, db = ops.linear_cross_entropy_backward(grad_loss.to(lse.dtype).contiguous(), x, weight, bias,
                                                           target, lse, ignore_index, smoothing, need_x, need_w,
                                                           need_b, chunk_bytes)
        else:
            scale = grad_loss.to(denom.dtype)
            dx, dw, db = (None if d is None else d * scale for d in (dx, dw, db))
        grads = [None if d is None else d.to(x.dtype) for d in (dx, dw, db)]
        return (*grads, None, None, None, None, None, None, None, None)

    # cross_entropy_forward_with_grad: cross_entropy_forward's loss and denom, and the logits' gradient for 1
    @_fake("cross_entropy_forward_with_grad")
    def _(logits, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0):
        return logits.new_empty(()), _contiguous_like(logits), logits.new_empty((), dtype=acc_dtype(logits.dtype))


def _batch_first(info, tensor, dim):
    """A vmapped argument with its batch dim first: moved there, or repeated along a new one if unbatched."""
    return tensor.movedim(dim, 0) if dim is not None else tensor.expand(info.batch_size, *tensor.shape)


def _register_vmap():
    ops = torch.ops.pyengine

    # elementwise forward: one call over the whole batch, which keeps its place in the output
    for op in ("relu", "sigmoid", "tanh", "leaky_relu"):
        def forward_rule(info, in_dims, x, *scalars, op=op):
            return getattr(ops, f"{op}_forward")(x, *scalars), in_dims[0]

        torch.library.register_vmap(f"{NAMESPACE}::{op}_forward", forward_rule)

        def backward_rule(info, in_dims, grad, saved, *scalars, op=op):
            grad, saved = _batch_first(info, grad, in_dims[0]), _batch_first(info, saved, in_dims[1])
            return getattr(ops, f"{op}_backward")(grad, saved, *scalars), 0

        torch.library.register_vmap(f"{NAMESPACE}::{op}_backward", backward_rule)

    # linear_forward, x batched: the batch is more rows. Batched weights (an ensemble) run one call per member.
    @torch.library.register_vmap(f"{NAMESPACE}::linear_forward")
    def _(info, in_dims, x, weight, bias=None, activation=0):
        x_dim, weight_dim, bias_dim = (*in_dims, None, None)[:3]  # a call may leave defaults out
        if weight_dim is None and bias_dim is None:
            rows = x.movedim(x_dim, 0)
            y = ops.linear_forward(rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[2]), weight, bias,
                                   activation)
            return y.reshape(rows.shape[0], rows.shape[1], weight.shape[0]), 0
        xs, ws = _batch_first(info, x, x_dim), _batch_first(info, weight, weight_dim)
        bs = [None] * info.batch_size if bias is None else _batch_first(info, bias, bias_dim)
        return torch.stack([ops.linear_forward(*member, activation) for member in zip(xs, ws, bs)]), 0

    # fused_mlp_forward, x batched: more rows, as linear's; anything else (an ensemble of MLPs), one call per member
    @torch.library.register_vmap(f"{NAMESPACE}::fused_mlp_forward")
    def _(info, in_dims, x, weights, biases, activation=1, output_activation=0):
        if any(d is not None for d in (*in_dims[1], *in_dims[2])):
            return _per_member(ops.fused_mlp_forward)(info, in_dims, x, weights, biases, activation,
                                                      output_activation)
        rows = x.movedim(in_dims[0], 0)
        outputs = ops.fused_mlp_forward(rows.reshape(rows.shape[0] * rows.shape[1], rows.shape[2]), weights, biases,
                                        activation, output_activation)
        return [o.reshape(rows.shape[0], rows.shape[1], o.shape[1]) for o in outputs], [0] * len(outputs)

    # add_forward: both operands batch-first at one rank, so broadcasting lines up their own dims as without vmap
    @torch.library.register_vmap(f"{NAMESPACE}::add_forward")
    def _(info, in_dims, input, other, alpha=1):
        rank = max(input.dim() - (in_dims[0] is not None), other.dim() - (in_dims[1] is not None))

        def aligned(t, dim):
            t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0)
            return t.reshape(t.shape[0], *([1] * (rank + 1 - t.dim())), *t.shape[1:])

        return ops.add_forward(aligned(input, in_dims[0]), aligned(other, in_dims[1]), alpha), 0

    # the rest (losses, backwards, Tensor[] arguments): one call per batch member, as torch's fallback would, which
    # does not take Tensor[] and asks the user to file an issue with PyTorch for each operator it runs
    for name in ("linear_backward", "add_backward", "mse_loss_forward", "mse_loss_backward",
                 "mse_loss_forward_with_grad", "binary_cross_entropy_with_logits_forward",
                 "binary_cross_entropy_with_logits_backward", "binary_cross_entropy_with_logits_forward_with_grad",
                 "cross_entropy_forward", "cross_entropy_backward", "cross_entropy_forward_with_grad",
                 "fused_mlp_backward", "linear_cross_entropy_forward", "linear_cross_entropy_backward"):
        torch.library.register_vmap(f"{NAMESPACE}::{name}", _per_member(getattr(ops, name)))


def _member(arg, dim, i):
    """Batch member i of a vmapped argument: a tensor, a list of tensors (in_dims a list too), or as it is."""
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [_member(a, d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i)


def _stack(results):
    """The members' outputs, batched along dim 0: a tensor, None, or a list of either."""
    first = results[0]
    if isinstance(first, (list, tuple)):
        return [_stack([r[j] for r in results]) for j in range(len(first))]
    return None if first is None else torch.stack(results)


def _dims_of(result):
    return [_dims_of(r) for r in result] if isinstance(result, (list, tuple)) else None if result is None else 0


def _per_member(op):
    """A vmap rule that runs op once per batch member: for the operators with Tensor[] arguments or results,
    which torch's own fallback does not take."""
    def rule(info, in_dims, *args):
        results = [op(*(_member(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
        out = _stack(results)
        return out, _dims_of(out)

    return rule


def _traced_namespace():
    """pyengine._C.autograd's functions, same arguments, as calls of the differentiable registered operators."""
    ops = torch.ops.pyengine

    # leading dims flattened by flatten/unflatten, never skipped for 2-D input: the trace then takes any batch dims
    def linear(x, weight, bias=None, activation=0):
        rows = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)
        y = ops.linear_forward(rows, weight, bias, activation)
        return y.unflatten(0, x.shape[:-1]) if x.dim() > 1 else y.squeeze(0)

    def cross_entropy(input, target, weight=None, ignore_index=-100, reduction=1, label_smoothing=0.0):
        n, c = input.shape  # (N, C) logits and N class indices: the calls the C++ Function takes
        loss = ops.cross_entropy_forward(input.reshape(n, c, 1).contiguous(), target.reshape(n, 1).contiguous(),
                                         weight, ignore_index, reduction, label_smoothing)[0]
        return loss.reshape(n) if reduction == REDUCTION_NONE else loss

    def fused_mlp(x, weights, biases, activation=1, output_activation=0):
        rows = x.flatten(0, -2) if x.dim() > 1 else x.unsqueeze(0)
        y = ops.fused_mlp_forward(rows, list(weights), list(biases), activation, output_activation)[0]
        return y.unflatten(0, x.shape[:-1]) if x.dim() > 1 else y.squeeze(0)

    def fused_mlp_packed(x, params, widths, activation=1, output_activation=0):
        from .fused_mlp import unpack
        return fused_mlp(x, *unpack(params, widths), activation, output_activation)

    return types.SimpleNamespace(
        linear=linear, relu=ops.relu_forward, sigmoid=ops.sigmoid_forward, tanh=ops.tanh_forward,
        leaky_relu=ops.leaky_relu_forward, add=ops.add_forward, cross_entropy=cross_entropy,
        mse_loss=lambda input, target, reduction=1: ops.mse_loss_forward(*contiguous(input, target), reduction),
        binary_cross_entropy_with_logits=lambda input, target, weight=None, pos_weight=None, reduction=1: (
            ops.binary_cross_entropy_with_logits_forward(*contiguous(input, target, weight, pos_weight), reduction)),
        fused_mlp=fused_mlp, fused_mlp_packed=fused_mlp_packed)


TRACED = None
if _backend._C is not None:
    _register()
    _register_vmap()
    TRACED = _traced_namespace()
