"""fused_mlp: a whole small MLP (every width 1..128) as one op, forward and backward each one kernel call.

For widths n_0 .. n_L, weights W_l of shape (n_{l+1}, n_l) and biases b_l (n_{l+1}):
  a_0 = x,   z_l = a_l @ W_l^T + b_l,   a_{l+1} = act(z_l) for the hidden layers,   y = out_act(z_{L-1})
the same as nn.Sequential(Linear, act, ..., Linear[, out_act]). The forward saves the hidden outputs a_1 ..
a_{L-1}, and the backward runs the chain rule from the top down, each activation's derivative taken from its
output (relu' = (a > 0), sigmoid' = a (1 - a)):
  dz_{L-1} = dy * out_act'(y);   dW_l = dz_l^T @ a_l;   db_l = dz_l.sum(0);   da_l = dz_l @ W_l
  dz_{l-1} = da_l * act'(a_l);   dx = da_0
What fusion saves is the per-layer work around the arithmetic: one autograd node, one kernel call each way,
and (in the kernels) activations that stay in cache or shared memory between layers. Activations are given to
the kernels as codes: 0 none, 1 relu, 2 sigmoid. Leading batch dims are flattened: (*, n_0) -> (M, n_0).
From about 4M multiply-adds a forward, in float32, and in float16/bfloat16 on a CPU that multiplies the dtype
fast (avx512_bf16/AMX for bfloat16), the CPU kernel runs a layer at a time as linear does (oneDNN or BLAS GEMMs,
float32 inside, each layer's output rounded to the dtype, as torch's unfused Sequential has it) instead of its
blocked loop, whose plain multiply-adds lose to the GEMMs there; PYENGINE_HALF_GEMM=on/off overrides the CPU's
rule for the half dtypes. There its results may differ in the last bit between thread counts (the GEMMs' sums),
as torch's do; under torch.use_deterministic_algorithms(True) the blocked loop, whose sums do not depend on the
thread count, runs at every size.
Kernels: csrc/cpu/fused_mlp.cpp, csrc/cuda/fused_mlp.cu; shared contract: csrc/common/fused_mlp.h.
"""

import torch

from .. import _backend
from ._function import (acc_dtype, apply, as_matrix, autocast, first_order_only, jvp_free_twin,
                        note_functorch_level)

MAX_WIDTH = 128  # csrc/common/fused_mlp.h kMaxWidth: a block of rows keeps every layer's activations on chip
MAX_LAYERS = 16  # kMaxLayers: the CUDA kernels take the layer table as a fixed-size kernel argument
ACTIVATIONS = {None: 0, "none": 0, "relu": 1, "sigmoid": 2}


def _activate(z, code):
    return torch.relu(z) if code == 1 else torch.sigmoid(z) if code == 2 else z


def _activation_grad(da, a, code):
    return da * (a > 0) if code == 1 else da * a * (1 - a) if code == 2 else da


@_backend.reference
def fused_mlp_forward(x, weights, biases, activation=1, output_activation=0):
    check_network(x, weights, biases, activation, output_activation)
    # Accumulated in float for float16/bfloat16 and rounded once per saved output, as the kernels do; the next
    # layer reads the unrounded value.
    acc = acc_dtype(x.dtype)
    a, hidden = x.to(acc), []
    for i, (w, b) in enumerate(zip(weights, biases)):
        z = a @ w.to(acc).T + b.to(acc)
        if i == len(weights) - 1:
            return [_activate(z, output_activation).to(x.dtype), *hidden]
        a = _activate(z, activation)
        hidden.append(a.to(x.dtype))


@_backend.reference
def fused_mlp_backward(grad_y, x, weights, hidden, y, activation=1, output_activation=0, need_x=True,
                       need_weights=True, need_biases=True):
    acc = acc_dtype(x.dtype)
    inputs = [x.to(acc)] + [h.to(acc) for h in hidden]  # a_0 .. a_{L-1}: what each layer read
    dz = _activation_grad(grad_y.to(acc), y.to(acc), output_activation)
    grad_w, grad_b, grad_x = [None] * len(weights), [None] * len(weights), None
    for i in reversed(range(len(weights))):
        if need_weights:
            grad_w[i] = (dz.T @ inputs[i]).to(x.dtype)
        if need_biases:
            grad_b[i] = dz.sum(0).to(x.dtype)
        if i == 0 and not need_x:
            break
        da = dz @ weights[i].to(acc)
        if i == 0:
            grad_x = da.to(x.dtype)
        else:
            dz = _activation_grad(da, inputs[i], activation)
    return [grad_x, *grad_w, *grad_b]


def activation_code(name, what="activation"):
    if name not in ACTIVATIONS:
        raise ValueError(f"fused_mlp: {what} must be 'relu', 'sigmoid' or None, got {name!r}")
    return ACTIVATIONS[name]


def check_sizes(sizes):
    """sizes n_0 .. n_L: at least two, each 1..MAX_WIDTH, at most MAX_LAYERS layers."""
    sizes = list(sizes)
    if len(sizes) < 2 or len(sizes) > MAX_LAYERS + 1:
        raise ValueError(f"fused_mlp: needs 2 to {MAX_LAYERS + 1} sizes (input, hidden..., output), got {sizes}")
    if not all(isinstance(n, int) and 1 <= n <= MAX_WIDTH for n in sizes):
        raise ValueError(f"fused_mlp: every width must be an int from 1 to {MAX_WIDTH}, got {sizes}; "
                         "use pyengine.nn.Linear layers for wider networks")
    return sizes


def check_network(x, weights, biases, activation, output_activation):
    """The python backend's contract checks, with the errors of the kernels' (csrc/common/fused_mlp.h): the
    compiled backends check in C++, so the hot path pays for no Python loop over the layers."""
    if not 1 <= len(weights) <= MAX_LAYERS:
        raise ValueError(f"fused_mlp: takes 1 to {MAX_LAYERS} layers, got {len(weights)}")
    if len(weights) != len(biases):
        raise ValueError(f"fused_mlp: one bias per weight, got {len(biases)} biases for {len(weights)} weights")
    if activation not in ACTIVATIONS.values() or output_activation not in ACTIVATIONS.values():
        raise ValueError(f"fused_mlp: activation codes must be 0 (none), 1 (relu) or 2 (sigmoid), got "
                         f"{activation} and {output_activation}")
    width = x.shape[-1]
    sizes = [width]
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2 or w.shape[1] != width or b.shape != w.shape[:1]:
            raise RuntimeError(f"fused_mlp: layer {i} takes {width} features: its weight must be (out, {width}) and "
                               f"its bias (out,), got {tuple(w.shape)} and {tuple(b.shape)}")
        if w.dtype != x.dtype or b.dtype != x.dtype:
            raise RuntimeError(f"fused_mlp: input, weights and biases must have one dtype, got {x.dtype}, "
                               f"{w.dtype} and {b.dtype} (layer {i})")
        width = w.shape[0]
        sizes.append(width)
    if not all(1 <= n <= MAX_WIDTH for n in sizes):
        raise ValueError(f"fused_mlp: every width must be 1 to {MAX_WIDTH}, got widths {sizes}; use "
                         "pyengine.nn.Linear layers for wider networks")


class FusedMLPFunction(torch.autograd.Function):
    """The whole MLP as one autograd node: apply(x, activation, output_activation, *weights, *biases) with
    activation codes 0 none, 1 relu, 2 sigmoid. Returns (y, *hidden): the output and, not differentiable, the
    hidden layers' outputs the backward reads; pyengine.functional.fused_mlp returns y alone."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, activation, output_activation, *params):
        layers = len(params) // 2
        weights, biases = params[:layers], params[layers:]
        y, *hidden = _backend.kernels(x.device).fused_mlp_forward(as_matrix(x), weights, biases, activation,
                                                                  output_activation)
        return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1]), *hidden)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, activation, output_activation, *params = inputs
        y, *hidden = output
        ctx.mark_non_differentiable(*hidden)
        ctx.set_materialize_grads(False)  # no zeros for the hidden activations' gradients, one per layer
        note_functorch_level(ctx)
        ctx.kernels = _backend.kernels(x.device)
        ctx.activations = activation, output_activation
        # without an output activation the backward does not read y's values: an alias outside the saved tensors
        # (no version check), so changing the output in place does not fail the backward, as for torch's Linear
        ctx.y_alias = y.detach() if output_activation == 0 else None
        ctx.save_for_backward(x, None if output_activation == 0 else y, *params[:len(params) // 2], *hidden)

    @staticmethod
    @first_order_only("fused_mlp", instead="an unfused torch.nn.Sequential of Linear and activation layers")
    def backward(ctx, grad_y, *unused):
        if grad_y is None:  # no gradient reached y (grads are not materialized)
            return (None,) * len(ctx.needs_input_grad)
        x, y, *rest = ctx.saved_tensors
        y = ctx.y_alias if y is None else y
        layers = (len(rest) + 1) // 2
        weights, hidden = rest[:layers], rest[layers:]
        need_w = any(ctx.needs_input_grad[3:3 + layers])
        need_b = any(ctx.needs_input_grad[3 + layers:])
        x2 = as_matrix(x)
        grad_x, *grads = _backend.backward_kernels(ctx.kernels).fused_mlp_backward(
            grad_y.reshape(x2.shape[0], grad_y.shape[-1]), x2, weights, hidden, y.reshape(x2.shape[0], y.shape[-1]),
            *ctx.activations, ctx.needs_input_grad[0], need_w, need_b)
        if grad_x is not None and x.dim() != 2:
            grad_x = grad_x.reshape(x.shape)
        return grad_x, None, None, *grads

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("pyengine.fused_mlp has no forward-mode AD (jvp, torch.func.jacfwd); use "
                                  "torch.func.jacrev or vjp, or an unfused torch.nn.Sequential of Linear layers")


_FUSED_MLP_FOR_COMPILE = jvp_free_twin(FusedMLPFunction)


def fused_mlp(input, weights, biases, activation="relu", output_activation=None):
    """A whole small MLP as one op: nn.Sequential(Linear, act, ..., Linear[, output_activation]) with the given
    weights and biases, its forward and its backward each one kernel call. Not in torch.

    Args:
        input (Tensor): (*, n_0), floating-point, at least 1-D.
        weights (sequence of Tensor): W_l of shape (n_{l+1}, n_l) for layers l = 0 .. L-1, input's dtype;
            1 to 16 layers, every width n_0 .. n_L from 1 to 128.
        biases (sequence of Tensor): b_l of shape (n_{l+1},), one per weight (no None), input's dtype.
        activation (str or None): between the layers: 'relu', 'sigmoid' or None ('none'). Default: 'relu'.
        output_activation (str or None): after the last layer, the same choices. Default: None (raw outputs).

    Shape:
        - input: (*, n_0); output: (*, n_L).

    Returns:
        Tensor: input's dtype; under torch.autocast the operands take the autocast dtype, as torch's Linear
        layers do. pyengine.nn.FusedMLP holds such a network's parameters as one tensor.

    Autograd: input, weights and biases are differentiable; the forward saves the hidden layers' outputs.
    Differences from torch's Sequential: no double backward (differentiating the gradient again raises
    RuntimeError) and no forward-mode AD (torch.func.jvp and jacfwd raise NotImplementedError); torch.func
    vmap, grad, vjp and jacrev are supported. The backend: pyengine.use_backend, else the environment
    variable PYENGINE_BACKEND, else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> weights = [torch.ones(4, 3), torch.ones(1, 4)]
        >>> biases = [torch.tensor([-1.0, -2.0, -3.0, -4.0]), torch.zeros(1)]
        >>> PF.fused_mlp(torch.ones(2, 3), weights, biases)  # relu between the layers: 2 + 1 + 0 + 0
        tensor([[3.],
                [3.]])
    """
    if input.dim() < 1:
        raise RuntimeError("fused_mlp: input must be at least 1-D")
    if len(weights) != len(biases):  # the Function tells weights from biases by position: check before it splits
        raise ValueError(f"fused_mlp: one bias per weight, got {len(biases)} biases for {len(weights)} weights")
    codes = activation_code(activation), activation_code(output_activation, "output_activation")
    # under torch.autocast: the dtype torch's Linear layers take (and so their activations)
    input, *params = autocast("lower", input, *weights, *biases)
    weights, biases = params[:len(weights)], params[len(weights):]
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        return compiled.fused_mlp(input, list(weights), list(biases), *codes)
    return apply(FusedMLPFunction, _FUSED_MLP_FOR_COMPILE, input, *codes, *weights, *biases)[0]


def unpack(params, sizes):
    """pyengine.nn.FusedMLP's packed parameters as views: ([W_0 (n_1, n_0), ...], [b_0 (n_1), ...]). Per layer
    the weight row by row, then the bias (csrc/autograd_fused_mlp.cpp unpack_mlp_params reads the same layout)."""
    weights, biases, at = [], [], 0
    for n_in, n_out in zip(sizes, sizes[1:]):
        weights.append(params[at:at + n_out * n_in].view(n_out, n_in))
        biases.append(params[at + n_out * n_in:at + n_out * (n_in + 1)])
        at += n_out * (n_in + 1)
    return weights, biases


def fused_mlp_packed(input, params, sizes, activation, output_activation):
    """fused_mlp with the parameters packed as unpack() reads them and the activations as codes: one autograd
    node whose gradient is one tensor like params (in C++ when the compiled kernels run eagerly; else the
    Function over views of params, which autograd sums back into params' gradient)."""
    input, params = autocast("lower", input, params)
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        return compiled.fused_mlp_packed(input, params, sizes, activation, output_activation)
    if input.dim() < 1:
        raise RuntimeError("fused_mlp: input must be at least 1-D")
    weights, biases = unpack(params, sizes)
    return apply(FusedMLPFunction, _FUSED_MLP_FOR_COMPILE, input, activation, output_activation, *weights, *biases)[0]
