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


class FusedMLP(torch.nn.Sequential):
    """A whole MLP whose forward and backward each run as one kernel call (pyengine.functional.fused_mlp):
    FusedMLP([8, 6, 4, 1], activation='sigmoid') computes what
    nn.Sequential(Linear(8, 6), Sigmoid(), Linear(6, 4), Sigmoid(), Linear(4, 1)) does, and holds exactly those
    modules, so initialization, parameters, their order and the state_dict keys are that Sequential's: weights
    load either way. sizes: input, hidden..., output widths, each 1..128. activation: 'relu', 'sigmoid' or None
    between layers; output_activation: the same after the last layer (default None: raw outputs). The layers
    are fixed at construction; a slice gives the plain, unfused torch.nn.Sequential of those modules."""

    def __init__(self, sizes, activation="relu", output_activation=None, device=None, dtype=None):
        from .ops.fused_mlp import activation_code, check_sizes

        sizes = check_sizes(sizes)
        codes = activation_code(activation), activation_code(output_activation, "output_activation")
        kinds = {1: torch.nn.ReLU, 2: torch.nn.Sigmoid}
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(torch.nn.Linear(n_in, n_out, device=device, dtype=dtype))
            code = codes[0] if i < len(sizes) - 2 else codes[1]
            if code:
                layers.append(kinds[code]())
        super().__init__(*layers)
        self.activation, self.output_activation = activation, output_activation

    def forward(self, input):
        # weight and bias of each Linear in turn (the activations hold none), read straight from the modules'
        # parameter dicts: the step's per-call Python cost is what this module exists to cut
        params = [p for m in self._modules.values() for p in m._parameters.values()]
        return F.fused_mlp(input, params[0::2], params[1::2], self.activation, self.output_activation)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return torch.nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def extra_repr(self):
        return f"activation={self.activation!r}, output_activation={self.output_activation!r}"


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


__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "FusedMLP", "LeakyReLU", "Linear", "MSELoss", "ReLU", "Sigmoid",
           "Tanh", "convert"]
