"""The torch.autograd.Function subclasses behind pyengine.functional; each one's forward and backward run
the kernels of the backend chosen in pyengine._backend."""
from .ops import (BinaryCrossEntropyWithLogitsFunction, BroadcastAddFunction, FusedMLPFunction, LeakyReLUFunction,
                  LinearCrossEntropyFunction, LinearFunction, MSELossFunction, ReLUFunction, SigmoidFunction,
                  SoftmaxCrossEntropyFunction, TanhFunction)

__all__ = ["BinaryCrossEntropyWithLogitsFunction", "BroadcastAddFunction", "FusedMLPFunction", "LeakyReLUFunction",
           "LinearCrossEntropyFunction", "LinearFunction", "MSELossFunction", "ReLUFunction", "SigmoidFunction",
           "SoftmaxCrossEntropyFunction", "TanhFunction"]
