"""relu: y = max(x, 0).

Its derivative is 1 where x > 0 and 0 elsewhere, and since y > 0 exactly where x > 0 the backward needs only
the output: dx = dy * (y > 0)  (NaN y: dy, as torch). Saving y instead of x lets the input be freed after the forward.
Kernels: csrc/cpu/relu.cpp, csrc/cuda/relu.cu; formula: relu_*_math in csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import apply, jvp_free_twin, output_saving_function


@_backend.reference
def relu_forward(x):
    # where(x < 0, 0, x) rather than x * (x > 0): NaN stays NaN and -inf gives 0, not NaN.
    return torch.where(x < 0, torch.zeros((), dtype=x.dtype, device=x.device), x)


@_backend.reference
def relu_backward(grad_y, y):
    # y <= 0 rather than y > 0 selects the zeros: a NaN output passes its gradient on, as in torch.
    return torch.where(y <= 0, torch.zeros((), dtype=grad_y.dtype, device=grad_y.device), grad_y)


ReLUFunction = output_saving_function("relu", "ReLUFunction")
_RELU_FOR_COMPILE = jvp_free_twin(ReLUFunction)


def relu(input):
    """Elementwise max(input, 0): torch.relu, and torch.nn.functional.relu without its inplace argument.

    Args:
        input (Tensor): any shape, floating-point (float16, bfloat16, float32, float64) on the CPU or a GPU.
            Integer tensors, which carry no gradient, are computed by the python reference; bool raises
            NotImplementedError, as torch.relu does.

    Returns:
        Tensor: input's shape and dtype. A NaN input gives NaN.

    Autograd: the backward reads only the saved output (dx = dy where y > 0). Double backward and torch.func
    (vmap, grad, jacrev, jvp, jacfwd) are supported. The backend: pyengine.use_backend, else the environment
    variable PYENGINE_BACKEND, else the tensor's device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.relu(torch.tensor([-1.0, 0.5, 2.0]))
        tensor([0.0000, 0.5000, 2.0000])
    """
    eager = _backend.eager_entries()
    result = None if eager is None else eager.relu(input)
    if result is not None:
        return result
    if input.dtype == torch.bool:
        raise NotImplementedError("Boolean inputs not supported for relu")
    if not input.is_floating_point():
        return relu_forward(input)
    compiled = _backend.compiled_autograd(input)
    return compiled.relu(input) if compiled is not None else apply(ReLUFunction, _RELU_FOR_COMPILE, input)
