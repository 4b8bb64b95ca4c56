"""One module per op: its python-backend reference kernels, its autograd Function and its functional form.
_library registers the compiled kernels as torch.ops.pyengine operators."""
from . import _library  # noqa: F401  (registers torch.ops.pyengine fake functions and autograd)
from .add import BroadcastAddFunction, add
from .binary_cross_entropy_with_logits import BinaryCrossEntropyWithLogitsFunction, binary_cross_entropy_with_logits
from .cross_entropy import SoftmaxCrossEntropyFunction, cross_entropy
from .fused_mlp import FusedMLPFunction, fused_mlp
from .leaky_relu import LeakyReLUFunction, leaky_relu
from .linear import LinearFunction, linear
from .linear_cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy
from .mse_loss import MSELossFunction, mse_loss
from .relu import ReLUFunction, relu
from .sigmoid import SigmoidFunction, sigmoid
from .tanh import TanhFunction, tanh

__all__ = ["BinaryCrossEntropyWithLogitsFunction", "BroadcastAddFunction", "FusedMLPFunction", "LeakyReLUFunction",
           "LinearCrossEntropyFunction", "LinearFunction", "MSELossFunction", "ReLUFunction", "SigmoidFunction",
           "SoftmaxCrossEntropyFunction", "TanhFunction", "add", "binary_cross_entropy_with_logits", "cross_entropy",
           "fused_mlp", "leaky_relu", "linear", "linear_cross_entropy", "mse_loss", "relu", "sigmoid", "tanh"]
