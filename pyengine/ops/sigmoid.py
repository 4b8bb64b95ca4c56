"""sigmoid: y = 1 / (1 + exp(-x)).

dy/dx = y * (1 - y), so the backward needs only the output. For |x| large y saturates at 0 or 1 and
y * (1 - y) vanishes: the vanishing gradient that makes deep sigmoid networks hard to train.
Kernels: csrc/cpu/sigmoid.cpp, csrc/cuda/sigmoid.cu; formula: sigmoid_*_math in csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import acc_dtype, apply, jvp_free_twin, output_saving_function, promote_to_float
from ._layout import widen


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
    return (widen(grad_y, acc) * y_acc * (1.0 - y_acc)).to(y.dtype)  # widen: laid out as torch's (_layout.py)


SigmoidFunction = output_saving_function("sigmoid", "SigmoidFunction")
_SIGMOID_FOR_COMPILE = jvp_free_twin(SigmoidFunction)


def sigmoid(input):
    """Elementwise 1 / (1 + exp(-input)): torch.sigmoid (torch.nn.functional.sigmoid).

    Args:
        input (Tensor): any shape, on the CPU or a GPU. Integer and bool inputs are promoted to the default
            float dtype, as torch does; complex inputs raise NotImplementedError. float16 and bfloat16 are
            computed in float32 and rounded once.

    Returns:
        Tensor: input's shape, in input's (floating-point) dtype.

    Autograd: the backward reads only the saved output (dx = dy * y * (1 - y)). Double backward and torch.func
    (vmap, grad, jacrev, jvp, jacfwd) are supported. The backend: pyengine.use_backend, else the environment
    variable PYENGINE_BACKEND, else the tensor's device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.sigmoid(torch.tensor([0.0, 2.0]))
        tensor([0.5000, 0.8808])
        >>> PF.sigmoid(torch.tensor([0]))  # an integer tensor: promoted to float
        tensor([0.5000])
    """
    eager = _backend.eager_entries()
    result = None if eager is None else eager.sigmoid(input)
    if result is not None:
        return result
    input = promote_to_float(input, "sigmoid")
    compiled = _backend.compiled_autograd(input)
    return compiled.sigmoid(input) if compiled is not None else apply(SigmoidFunction, _SIGMOID_FOR_COMPILE, input)
