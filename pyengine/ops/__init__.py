"""One module per op: its python-backend reference kernels, its autograd Function and its functional form."""
from .add import BroadcastAddFunction, add
from .cross_entropy import SoftmaxCrossEntropyFunction, cross_entropy
from .linear import LinearFunction, linear
from .relu import ReLUFunction, relu
from .sigmoid import SigmoidFunction, sigmoid

__all__ = ["BroadcastAddFunction", "LinearFunction", "ReLUFunction", "SigmoidFunction", "SoftmaxCrossEntropyFunction",
           "add", "cross_entropy", "linear", "relu", "sigmoid"]
