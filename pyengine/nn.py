"""torch.nn modules whose forward runs pyengine's kernels.

Each one subclasses its torch.nn twin and changes only forward, so constructor arguments, initialization,
parameters and state_dict keys are torch's: weights load either way, and `convert` swaps a model's layers
in place without touching its parameters (an optimizer built on them keeps working).
"""
import torch

from . import functional as F
from .ops.linear import activation_code


class Linear(torch.nn.Linear):
    """activation=None, 'relu' or 'sigmoid': applied in the same pass as the bias (F.linear's activation).
    A plain setting, not a parameter or buffer: state_dict is torch.nn.Linear's."""

    activation = None  # what a torch.nn.Linear swapped in by `convert` (no __init__ of ours) reads

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        activation_code(activation)  # a bad name fails here, not at the first forward
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, input):
        return F.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation!r}")


class ReLU(torch.nn.ReLU):
    """inplace=True is accepted for compatibility; the result is computed out of place."""

    def forward(self, input):
        return F.relu(input)


class Sigmoid(torch.nn.Sigmoid):
    def forward(self, input):
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    def forward(self, input):
        return F.tanh(input)


class LeakyReLU(torch.nn.LeakyReLU):
    """inplace=True is accepted for compatibility; the result is computed out of place."""

    def forward(self, input):
        return F.leaky_relu(input, self.negative_slope)


class MSELoss(torch.nn.MSELoss):
    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


_SWAPS = {torch.nn.Linear: Linear, torch.nn.ReLU: ReLU, torch.nn.Sigmoid: Sigmoid, torch.nn.Tanh: Tanh,
          torch.nn.LeakyReLU: LeakyReLU, torch.nn.CrossEntropyLoss: CrossEntropyLoss, torch.nn.MSELoss: MSELoss,
          torch.nn.BCEWithLogitsLoss: BCEWithLogitsLoss}


def convert(model):
    """Swaps every torch.nn module pyengine has a twin of (Linear, ReLU, Sigmoid, Tanh, LeakyReLU,
    CrossEntropyLoss, MSELoss, BCEWithLogitsLoss) inside `model` (and `model` itself) for
    pyengine's, keeping parameters, buffers and hooks; returns the model. Subclasses of those torch modules
    are left alone, since they may override forward."""
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model


__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "LeakyReLU", "Linear", "MSELoss", "ReLU", "Sigmoid", "Tanh",
           "convert"]
