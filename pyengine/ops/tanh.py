"""tanh: y = (e^x - e^-x) / (e^x + e^-x), from the origin notes' table of activation functions.

dy/dx = 1 - y^2, a function of the output alone, so the backward needs only y. Like sigmoid it saturates
(|x| large: y -> +-1 and the gradient vanishes), but it is centred on 0.
Kernels: csrc/cpu/tanh.cpp, csrc/cuda/tanh.cu; formula: tanh_*_math in csrc/common/math.h.
"""
import torch

from .. import _backend
from ._function import acc_dtype, apply, jvp_free_twin, output_saving_function, promote_to_float
from ._layout import widen


@_backend.reference
def tanh_forward(x):
    # tanh(|x|) = t / (2 - t) with t = 1 - e^{-2|x|} = -expm1(-2|x|): no overflow for large |x|, no
    # cancellation for tiny |x|; the sign comes back with copysign. Computed in float for float16/bfloat16.
    xa = x.to(acc_dtype(x.dtype))
    t = -torch.expm1(-2.0 * xa.abs())
    return torch.copysign(t / (2.0 - t), xa).to(x.dtype)


@_backend.reference
def tanh_backward(grad_y, y):
    ya = y.to(acc_dtype(y.dtype))
    return (widen(grad_y, ya.dtype) * (1.0 - ya * ya)).to(y.dtype)  # widen: laid out as torch's (_layout.py)


TanhFunction = output_saving_function("tanh", "TanhFunction")
_TANH_FOR_COMPILE = jvp_free_twin(TanhFunction)


def tanh(input):
    """Elementwise hyperbolic tangent: torch.tanh (torch.nn.functional.tanh).

    Args:
        input (Tensor): any shape, on the CPU or a GPU. Integer and bool inputs are promoted to the default
            float dtype, as torch does; complex inputs raise NotImplementedError. float16 and bfloat16 are
            computed in float32 and rounded once.

    Returns:
        Tensor: input's shape, in input's (floating-point) dtype, each value in [-1, 1].

    Autograd: the backward reads only the saved output (dx = dy * (1 - y^2)). Double backward and torch.func
    (vmap, grad, jacrev, jvp, jacfwd) are supported. The backend: pyengine.use_backend, else the environment
    variable PYENGINE_BACKEND, else the tensor's device (see help(pyengine)).

    Example:
        >>> import torch, pyengine.functional as PF
        >>> PF.tanh(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7616])
    """
    eager = _backend.eager_entries()
    result = None if eager is None else eager.tanh(input)
    if result is not None:
        return result
    input = promote_to_float(input, "tanh")
    compiled = _backend.compiled_autograd(input)
    return compiled.tanh(input) if compiled is not None else apply(TanhFunction, _TANH_FOR_COMPILE, input)
