"""The torch.autograd.Function subclasses behind pyengine.functional; each one's forward and backward run
the kernels of the backend chosen in pyengine._backend. On the compiled backends pyengine.functional builds the
C++ twins of linear's, the activations', add's and the two elementwise losses' Functions instead (csrc/autograd.cpp:
the same kernels and saved tensors without a Python Function's per-call cost); calling <Op>Function.apply
always runs the Python one."""
from .ops import (BinaryCrossEntropyWithLogitsFunction, BroadcastAddFunction, FusedMLPFunction, LeakyReLUFunction,
                  LinearCrossEntropyFunction, LinearFunction, MSELossFunction, ReLUFunction, SigmoidFunction,
                  SoftmaxCrossEntropyFunction, TanhFunction)

__all__ = ["BinaryCrossEntropyWithLogitsFunction", "BroadcastAddFunction", "FusedMLPFunction", "LeakyReLUFunction",
           "LinearCrossEntropyFunction", "LinearFunction", "MSELossFunction", "ReLUFunction", "SigmoidFunction",
           "SoftmaxCrossEntropyFunction", "TanhFunction"]
