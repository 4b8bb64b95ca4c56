"""Drop-in replacements for torch's functional ops, with torch's signatures, defaults, shapes and dtypes, running
pyengine's kernels forward and backward:

    relu, sigmoid, tanh, leaky_relu      elementwise activations (torch.relu, torch.sigmoid, torch.tanh, F.leaky_relu)
    add                                  torch.add: broadcasting and type promotion
    linear                               F.linear, with an optional fused activation='relu' or 'sigmoid'
    mse_loss                             F.mse_loss (no weight argument)
    binary_cross_entropy_with_logits     F.binary_cross_entropy_with_logits
    cross_entropy                        F.cross_entropy: class indices or probabilities, weight, label smoothing
    linear_cross_entropy                 F.cross_entropy(F.linear(...)) without ever holding the whole logits
    fused_mlp                            a whole small MLP (widths up to 128) as one op; not in torch

What differs from torch, besides the kernels:
  - cross_entropy, linear_cross_entropy and fused_mlp have no double backward (differentiating their gradient
    again raises) and no forward-mode AD (torch.func.jvp, jacfwd raise); the other ops support both.
  - every op works under torch.func vmap, grad, vjp and jacrev, and takes torch's dtypes under torch.autocast;
    the kernels are registered operators (torch.ops.pyengine), so torch.compile(fullgraph=True) keeps them.
  - leaky_relu's inplace=True is accepted but computed out of place; relu has no inplace argument;
    mse_loss has no weight; add has no out.

Environment variables: PYENGINE_BACKEND picks the backend (read at import; pyengine.use_backend overrides it;
see help(pyengine)); PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES is linear_cross_entropy's default chunk budget;
PYENGINE_CPU_CACHE_BYTES caps the cpp backend's cache of large outputs.

Example:
    >>> import torch, pyengine.functional as PF
    >>> x, w, b = torch.randn(4, 3), torch.randn(5, 3), torch.randn(5)
    >>> y = PF.relu(PF.linear(x, w, b))
    >>> loss = PF.cross_entropy(y, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1)
    >>> loss.shape
    torch.Size([])
"""
from .ops import (add, binary_cross_entropy_with_logits, cross_entropy, fused_mlp, leaky_relu, linear,
                  linear_cross_entropy, mse_loss, relu, sigmoid, tanh)

__all__ = ["add", "binary_cross_entropy_with_logits", "cross_entropy", "fused_mlp", "leaky_relu", "linear",
           "linear_cross_entropy", "mse_loss", "relu", "sigmoid", "tanh"]

_MODULE_ATTRIBUTES = ("__all__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__spec__")


def __dir__():
    """dir(pyengine.functional): the public ops (__all__) and the standard module attributes, not the helpers."""
    return sorted([*__all__, *(n for n in _MODULE_ATTRIBUTES if n in globals())])
