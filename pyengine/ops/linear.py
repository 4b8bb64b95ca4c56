"""linear: y = x @ W^T + b, for x of shape (*, in_features), W (out_features, in_features), b (out_features).

The chain rule through y = x W^T + b, with dy the gradient arriving from the layers above:
  dx = dy @ W          each input feature collects the gradient of every output it fed, weighted by W
  dW = dy^T @ x        summed over the batch: every row contributed to the same weights
  db = dy.sum(0)       the bias was broadcast over the batch, so its gradient sums over it
Leading batch dims are flattened into one: (*, in) -> (M, in).

With a fused activation, y = act(z), z = x @ W^T + b (activation 'relu' or 'sigmoid'; the kernels take its
code from ACTIVATIONS). Both derivatives are functions of the output y alone, so y is saved, not z:
  dz = dy * act'(y)    relu: dy where y > 0 (a NaN y passes dy, as torch); sigmoid: dy * y * (1 - y)
and dz takes the place of dy in the three products above.
float16/bfloat16 on a CPU that multiplies the dtype natively (avx512_bf16/AMX for bfloat16, avx512_fp16/AMX-FP16
for float16): the forward is torch's own oneDNN linear, bias and activation applied to the float32 sums before
the one rounding. On any other CPU (or with PYENGINE_HALF_GEMM=off) the products above the small-layer sizes run
in float32 on widened copies, each result rounded to the dtype once: torch's own half products are emulated
there, about 4x float32's time.
Kernels: csrc/cpu/linear.cpp, csrc/cuda/linear.cu.
"""

import torch

from .. import _backend
from ._function import acc_dtype, apply, as_matrix, autocast, needs_grad, jvp_free_twin


# The activation codes of the kernels' `activation` argument.
ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2}
RELU, SIGMOID = ACTIVATIONS["relu"], ACTIVATIONS["sigmoid"]


@_backend.reference
def linear_forward(x, weight, bias=None, activation=0):
    # in float for float16/bfloat16 (the kernels' acc_t), rounded once at the end, as torch's addmm does;
    # integers stay integers (and sigmoid makes them float, as torch.sigmoid does)
    acc = acc_dtype(x.dtype) if x.is_floating_point() else x.dtype
    z = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        z = z + bias.to(acc)
    if activation == RELU:
        z = torch.relu(z)
    elif activation == SIGMOID:
        z = torch.sigmoid(z)
    return z.to(x.dtype) if x.is_floating_point() else z


@_backend.reference
def linear_backward(grad_y, x, weight, need_x=True, need_weight=True, need_bias=True, activation=0, y=None):
    acc = acc_dtype(x.dtype)
    grad_z = grad_y.to(acc)
    if activation == RELU:  # y <= 0 selects the zeros, so a NaN output passes its gradient on
        grad_z = torch.where(y <= 0, torch.zeros((), dtype=acc, device=grad_z.device), grad_z)
    elif activation == SIGMOID:
        y = y.to(acc)
        grad_z = grad_z * y * (1 - y)
    grad_x = (grad_z @ weight.to(acc)).to(x.dtype) if need_x else None
    grad_weight = (grad_z.T @ x.to(acc)).to(x.dtype) if need_weight else None
    grad_bias = grad_z.sum(0).to(x.dtype) if need_bias else None
    return grad_x, grad_weight, grad_bias


def activation_code(activation):
    """The kernels' code of an activation name; ValueError listing the choices for any other value."""
    if not isinstance(activation, (str, type(None))) or activation not in ACTIVATIONS:
        raise ValueError(f"linear: unknown activation {activation!r}; choose one of "
                         f"{', '.join(map(repr, ACTIVATIONS))}")
    return ACTIVATIONS[activation]


def check_linear_args(x, weight, bias):
    """torch's checks of F.linear's arguments, in its order and with its messages (linear_cross_entropy's
    linear part runs them too). A 1-D weight must have been made (1, in) before; bias must be (out,)."""
    if x.dim() < 1 or weight.dim() < 1:
        raise RuntimeError(f"both arguments to linear need to be at least 1D, but they are {x.dim()}D and "
                           f"{weight.dim()}D")
    if weight.dim() > 2:
        raise RuntimeError(f"t() expects a tensor with <= 2 dimensions, but self is {weight.dim()}D (linear's weight "
                           "is (out_features, in_features))")
    if x.shape[-1] != weight.shape[1]:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied ({rows}x{x.shape[-1]} and "
                           f"{weight.shape[1]}x{weight.shape[0]})")
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        raise RuntimeError(f"linear: expected input, weight and bias to have the same dtype, but got {x.dtype}, "
                           f"{weight.dtype} and {None if bias is None else bias.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        out = [*x.shape[:-1], weight.shape[0]]
        raise RuntimeError(f"The expanded size of the tensor ({weight.shape[0]}) must match the existing size "
                           f"({bias.shape[-1] if bias.dim() else 1}) at non-singleton dimension {len(out) - 1}.  "
                           f"Target sizes: {out}.  Tensor sizes: {list(bias.shape)} (linear's bias is (out_features,))")


class LinearFunction(torch.autograd.Function):
    """y = act(x @ weight^T + bias) for x (*, in), weight (out, in), bias (out) or None, activation a name or code
    of ACTIVATIONS (0: none). Forward-mode AD: dz = dx W^T + x dW^T + db, dy = act'(y) dz."""
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias=None, activation=0):
        activation = activation if isinstance(activation, int) else activation_code(activation)
        check_linear_args(x, weight, bias)
        y = _backend.kernels(x.device).linear_forward(as_matrix(x), weight, bias, activation)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        ctx.kernels = _backend.kernels(x.device)
        ctx.x_shape = x.shape
        ctx.activation = activation if isinstance(activation, int) else activation_code(activation)
        # x itself, not a (M, K) view of it, and y as returned (this node's output): double backward must reach the
        # input through both x and act'(z), which comes from y
        ctx.save_for_backward(x, weight, *([output] if ctx.activation else []))
        ctx.save_for_forward(x, weight, *([output] if ctx.activation else []))
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *y = ctx.saved_tensors
        x2 = as_matrix(x)
        y = [t.reshape(x2.shape[0], weight.shape[0]) for t in y]
        need_x, need_w, need_b = needs_grad(ctx, 3)[:3]
        grad_x, grad_w, grad_b = _backend.backward_kernels(ctx.kernels).linear_backward(
            grad_y.reshape(x2.shape[0], weight.shape[0]), x2, weight, need_x, need_w, need_b and ctx.has_bias,
            ctx.activation, *y)
        if grad_x is not None and len(ctx.x_shape) != 2:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, None

    @staticmethod
    def jvp(ctx, x_tangent, weight_tangent, bias_tangent, _):
        x, weight, *y = ctx.saved_tensors
        kernels = _backend.backward_kernels(ctx.kernels)
        x2 = as_matrix(x)
        out = (x2.shape[0], weight.shape[0])
        dz = None  # the products by the kernels' own linear_forward; the bias tangent joins the first of them
        if x_tangent is not None:
            dz = kernels.linear_forward(as_matrix(x_tangent), weight, bias_tangent, 0)
        if weight_tangent is not None:
            term = kernels.linear_forward(x2, weight_tangent, None if dz is not None else bias_tangent, 0)
            dz = term if dz is None else dz + term
        if dz is None:
            dz = bias_tangent.expand(out).contiguous()
        if ctx.activation == RELU:
            dz = kernels.relu_backward(dz.contiguous(), y[0].reshape(out))
        elif ctx.activation == SIGMOID:
            dz = kernels.sigmoid_backward(dz.contiguous(), y[0].reshape(out))
        return dz if len(ctx.x_shape) == 2 else dz.reshape(*ctx.x_shape[:-1], weight.shape[0])


_LINEAR_FOR_COMPILE = jvp_free_twin(LinearFunction)


def linear(input, weight, bias=None, activation=None):
    """activation(input @ weight^T + bias): torch.nn.functional.linear, plus an optional fused activation.

    Args:
        input (Tensor): (*, in_features), at least 1-D.
        weight (Tensor): (out_features, in_features), of input's dtype. A 1-D weight (in_features,) gives one
            output feature with that dim squeezed (and then takes no bias), as torch allows.
        bias (Tensor, optional): (out_features,), of input's dtype; a single element is expanded to
            (out_features,), as torch allows. Default: None.
        activation (str, optional): not in torch: None, 'relu' or 'sigmoid', applied in the same pass as the
            bias; the same values as torch.relu / torch.sigmoid of F.linear, with the activation's derivative
            taken from the saved output. Any other value raises ValueError. Default: None.

    Shape:
        - input: (*, in_features); output: (*, out_features).

    Returns:
        Tensor: input's dtype. Integer inputs are multiplied by the python reference (no gradient). Under
        torch.autocast the operands take the autocast dtype, as torch's linear does.

    Autograd: dx = dy W, dW = dy^T x, db = dy summed over rows. Double backward and torch.func (vmap, grad,
    jacrev, jvp, jacfwd) are supported. The backend: pyengine.use_backend, else the environment variable
    PYENGINE_BACKEND, else the tensors' device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.tensor([-4.0, 0.0, 1.0, 2.0])
        >>> PF.linear(x, w, b)
        tensor([[-1.,  3.,  4.,  5.],
                [-1.,  3.,  4.,  5.]])
        >>> PF.linear(x, w, b, activation="relu")
        tensor([[0., 3., 4., 5.],
                [0., 3., 4., 5.]])
    """
    act = activation_code(activation)
    input, weight, bias = autocast("lower", input, weight, bias)
    if weight.dim() == 1 and input.dim() >= 1:
        if bias is not None:
            raise RuntimeError("mat2 must be a matrix, got 1-D tensor (linear: a 1-D weight takes no bias)")
        return linear(input, weight.unsqueeze(0), activation=activation).squeeze(-1)
    if not input.is_floating_point():
        check_linear_args(input, weight, bias)
        return linear_forward(input, weight, bias, act)  # integer matmul: torch supports it, nothing to differentiate
    if bias is not None and bias.dim() <= 1 and bias.numel() == 1 and weight.shape[0] != 1:
        bias = bias.reshape(1).expand(weight.shape[0])
    compiled = _backend.compiled_autograd(input)
    if compiled is not None:
        check_linear_args(input, weight, bias)
        return compiled.linear(input, weight, bias, act)
    return apply(LinearFunction, _LINEAR_FOR_COMPILE, input, weight, bias, act)
