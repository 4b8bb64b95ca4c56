"""sigmoid: y = 1 / (1 + exp(-x)).

dy/dx = y * (1 - y), so the backward needs only the output. For |x| large y saturates at 0 or 1 and
y * (1 - y) vanishes: the vanishing gradient that makes deep sigmoid networks hard to train.
Kernels: csrc/cpu/sigmoid.cpp, csrc/cuda/sigmoid.cu; formula: sigmoid_*_math in csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import acc_dtype, apply, jvp_free_twin, output_saving_function, promote_to_float


@_backend.reference
def sigmoid_forward(x):
    # Computed in float for float16/bfloat16 and rounded once, as the kernels do. exp(-x) overflows to inf
    # for very negative x and 1 / inf = 0, the right limit.
    acc = acc_dtype(x.dtype)
    return (1.0 / (1.0 + torch.exp(-x.to(acc)))).to(x.dtype)


@_backend.reference
def sigmoid_backward(grad_y, y):
    acc = acc_dtype(y.dtype)
    y_acc = y.to(acc)
    return (grad_y.to(acc) * y_acc * (1.0 - y_acc)).to(y.dtype)


SigmoidFunction = output_saving_function("sigmoid", "SigmoidFunction")
_SIGMOID_FOR_COMPILE = jvp_free_twin(SigmoidFunction)


def sigmoid(input):
    """torch.sigmoid. Integer and bool inputs are promoted to the default float dtype, as torch does."""
    input = promote_to_float(input, "sigmoid")
    compiled = _backend.compiled_autograd(input)
    return compiled.sigmoid(input) if compiled is not None else apply(SigmoidFunction, _SIGMOID_FOR_COMPILE, input)
