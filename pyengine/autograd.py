"""The torch.autograd.Function subclasses behind pyengine.functional; each one's forward and backward run
the kernels of the backend chosen in pyengine._backend."""
from .ops import BroadcastAddFunction, LinearFunction, ReLUFunction, SigmoidFunction, SoftmaxCrossEntropyFunction

__all__ = ["BroadcastAddFunction", "LinearFunction", "ReLUFunction", "SigmoidFunction", "SoftmaxCrossEntropyFunction"]
