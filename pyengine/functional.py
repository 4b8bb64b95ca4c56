"""Drop-in replacements for torch's functional ops, with torch's signatures, defaults, shapes and dtypes:

    import pyengine.functional as PF
    y = PF.relu(PF.linear(x, w, b))
    loss = PF.cross_entropy(y, target, label_smoothing=0.1)
"""
from .ops import add, cross_entropy, linear, relu, sigmoid

__all__ = ["add", "cross_entropy", "linear", "relu", "sigmoid"]
