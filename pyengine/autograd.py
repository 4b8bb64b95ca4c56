"""The torch.autograd.Function subclasses behind pyengine.functional; each one's forward and backward run
the kernels of the backend chosen by pyengine.use_backend, else the environment variable PYENGINE_BACKEND, else
the tensors' device (see help(pyengine)). On the compiled backends pyengine.functional builds the C++ twins of
linear's, the activations', add's and the two elementwise losses' Functions instead (csrc/autograd.cpp: the same
kernels and saved tensors without a Python Function's per-call cost); calling <Op>Function.apply always runs the
Python one.

Each is called as <Op>Function.apply(...) with its forward's arguments (each class's help lists them). They
skip some of the functional forms' argument handling: tensors only, no Python numbers; the losses take operands
of one shape and dtype (no broadcasting or promotion) and no deprecated size_average / reduce.
SoftmaxCrossEntropyFunction, FusedMLPFunction and LinearCrossEntropyFunction return a tuple whose first element
is the result (the rest is what their backward reads); the others return the result.

Example:
    >>> import torch
    >>> from pyengine.autograd import LinearFunction, ReLUFunction
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> y = ReLUFunction.apply(LinearFunction.apply(x, torch.ones(4, 3), torch.zeros(4)))
    >>> y.sum().backward()
    >>> x.grad
    tensor([[4., 4., 4.],
            [4., 4., 4.]])
"""
from .ops import (BinaryCrossEntropyWithLogitsFunction, BroadcastAddFunction, FusedMLPFunction, LeakyReLUFunction,
                  LinearCrossEntropyFunction, LinearFunction, MSELossFunction, ReLUFunction, SigmoidFunction,
                  SoftmaxCrossEntropyFunction, TanhFunction)

__all__ = ["BinaryCrossEntropyWithLogitsFunction", "BroadcastAddFunction", "FusedMLPFunction", "LeakyReLUFunction",
           "LinearCrossEntropyFunction", "LinearFunction", "MSELossFunction", "ReLUFunction", "SigmoidFunction",
           "SoftmaxCrossEntropyFunction", "TanhFunction"]

_MODULE_ATTRIBUTES = ("__all__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__spec__")


def __dir__():
    """dir(pyengine.autograd): the public Functions (__all__) and the standard module attributes."""
    return sorted([*__all__, *(n for n in _MODULE_ATTRIBUTES if n in globals())])
