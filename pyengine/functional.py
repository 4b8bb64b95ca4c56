"""Drop-in replacements for torch's functional ops, with torch's signatures, defaults, shapes and dtypes:

    import pyengine.functional as PF
    y = PF.relu(PF.linear(x, w, b))
    loss = PF.cross_entropy(y, target, label_smoothing=0.1)
"""
from .ops import (add, binary_cross_entropy_with_logits, cross_entropy, fused_mlp, leaky_relu, linear,
                  linear_cross_entropy, mse_loss, relu, sigmoid, tanh)

__all__ = ["add", "binary_cross_entropy_with_logits", "cross_entropy", "fused_mlp", "leaky_relu", "linear",
           "linear_cross_entropy", "mse_loss", "relu", "sigmoid", "tanh"]
