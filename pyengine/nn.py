"""torch.nn modules whose forward runs pyengine's kernels.

Each one subclasses its torch.nn twin and changes only forward, so constructor arguments, initialization,
parameters and state_dict keys are torch's: weights load either way, and `convert` swaps a model's layers
in place without touching its parameters (an optimizer built on them keeps working).
"""
import torch

from . import _backend, _scripted
from . import functional as F
from .ops.fused_mlp import activation_code as mlp_activation_code
from .ops.fused_mlp import check_sizes, fused_mlp_packed, unpack
from .ops.linear import activation_code


class _Scriptable:
    """torch.jit.script of pyengine.nn modules: their forwards take pyengine/_scripted.py under scripting, which calls
    the registered operators of the compiled extension; without it, scripting says so at once."""

    def __prepare_scriptable__(self):
        if _backend._C is None:
            raise RuntimeError(f"torch.jit.script of pyengine.nn.{type(self).__name__} needs pyengine's compiled "
                               f"extension, which is not available ({_backend._C_IMPORT_ERROR}); "
                               f"{_backend.BUILD_HINT}. Or use torch.compile, or torch.jit.trace (which records "
                               "the python backend's torch operations).")
        return self


class Linear(_Scriptable, torch.nn.Linear):
    """activation=None, 'relu' or 'sigmoid': applied in the same pass as the bias (F.linear's activation).
    A plain setting, not a parameter or buffer: state_dict is torch.nn.Linear's."""

    activation = None  # what a torch.nn.Linear swapped in by `convert` (no __init__ of ours) reads
    __constants__ = [*torch.nn.Linear.__constants__, "activation"]  # TorchScript reads the class default too

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        activation_code(activation)  # a bad name fails here, not at the first forward
        super().__init__(in_features, out_features, bias, device, dtype)
        self.activation = activation

    def forward(self, input):
        if torch.jit.is_scripting():
            return _scripted.linear(input, self.weight, self.bias, self.activation)
        return F.linear(input, self.weight, self.bias, activation=self.activation)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.activation is None else f", activation={self.activation!r}")


class ReLU(_Scriptable, torch.nn.ReLU):
    """inplace=True is accepted for compatibility; the result is computed out of place."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.relu_forward(input)
        return F.relu(input)


class Sigmoid(_Scriptable, torch.nn.Sigmoid):
    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.sigmoid_forward(input)
        return F.sigmoid(input)


class Tanh(_Scriptable, torch.nn.Tanh):
    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.tanh_forward(input)
        return F.tanh(input)


class LeakyReLU(_Scriptable, torch.nn.LeakyReLU):
    """inplace=True is accepted for compatibility; the result is computed out of place."""

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.leaky_relu_forward(input, self.negative_slope)
        return F.leaky_relu(input, self.negative_slope)


class MSELoss(_Scriptable, torch.nn.MSELoss):
    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.mse_loss(input, target, self.reduction)
        return F.mse_loss(input, target, reduction=self.reduction)


class BCEWithLogitsLoss(_Scriptable, torch.nn.BCEWithLogitsLoss):
    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.binary_cross_entropy_with_logits(input, target, self.weight, self.pos_weight,
                                                              self.reduction)
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class CrossEntropyLoss(_Scriptable, torch.nn.CrossEntropyLoss):
    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                           self.label_smoothing)
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


_TRAINING_LOSSES = {"mse": 0, "bce_with_logits": 1, "cross_entropy": 2}


class FusedMLP(_Scriptable, torch.nn.Module):
    """A whole MLP whose forward and backward each run as one kernel call (pyengine.functional.fused_mlp):
    FusedMLP([8, 6, 4, 1], activation='sigmoid') computes what
    nn.Sequential(Linear(8, 6), Sigmoid(), Linear(6, 4), Sigmoid(), Linear(4, 1)) does.

    sizes: input, hidden..., output widths, each 1..128. activation: 'relu', 'sigmoid' or None between layers;
    output_activation: the same after the last layer (default None: raw outputs).

    Its parameters are one tensor, `params`: each layer's weight (out, in) row by row, then its bias, layer after
    layer (as tiny-cuda-nn keeps them). A training step then accumulates one gradient and updates one parameter,
    not two per layer, which at small sizes costs more than the layers' arithmetic (benchmarks/NOTES.md).
    Everything elementwise (SGD, Adam, weight decay, clipping by norm) behaves as over the separate tensors;
    per-layer optimizer settings need the unfused Sequential. `weights` and `biases` are views of `params`.

    Initialization and state_dict are the Sequential's: the same random draws in the same order (same seed,
    same weights), and state_dict keys '0.weight', '0.bias', '2.weight', ... so weights load either way
    (loading copies into `params`). `to_sequential()` gives that Sequential, with copies of the weights."""

    __jit_unused_properties__ = ["weights", "biases"]  # Python views: a scripted forward reads params itself

    def __init__(self, sizes, activation="relu", output_activation=None, device=None, dtype=None):
        super().__init__()
        self.sizes = tuple(check_sizes(sizes))
        self.activation, self.output_activation = activation, output_activation
        self._codes = (mlp_activation_code(activation),
                       mlp_activation_code(output_activation, "output_activation"))
        layers = [torch.nn.Linear(n_in, n_out, device=device, dtype=dtype)
                  for n_in, n_out in zip(self.sizes, self.sizes[1:])]
        self.params = torch.nn.Parameter(torch.cat([t.detach().reshape(-1) for m in layers
                                                    for t in (m.weight, m.bias)]))

    def forward(self, input):
        if torch.jit.is_scripting():
            return _scripted.fused_mlp_packed(input, self.params, list(self.sizes), self._codes[0], self._codes[1])
        # _parameters[...]: nn.Module's __getattr__ costs a microsecond a call, a share of a small network's step
        return fused_mlp_packed(input, self._parameters["params"], self.sizes, *self._codes)

    def training_step(self, input, target, lr, loss="bce_with_logits"):
        """One step of plain SGD on the mean loss, params <- params - lr * grad: what

            self.params.grad = None
            loss_fn(self(input), target).backward()
            torch.optim.SGD(self.parameters(), lr).step()

        computes, run as one call without an autograd graph when the compiled kernels run (the python backend
        takes those three lines). For small networks, where the per-call costs of autograd and torch.optim
        exceed the network's own arithmetic. loss: 'bce_with_logits' or 'mse' (target shaped like the output),
        'cross_entropy' (the output's last dim holds the class scores; target: one int64 class index per row,
        -100 ignored); each the mean, torch's default reduction. Leaves this batch's gradient in params.grad
        (replacing what was there) and returns the loss, a 0-dim tensor. The one-call path does not go through
        the module's __call__, so forward hooks do not run in it."""
        code = _TRAINING_LOSSES.get(loss)
        if code is None:
            raise ValueError(f"FusedMLP.training_step: loss must be one of {sorted(_TRAINING_LOSSES)}, got {loss!r}")
        if not lr >= 0:
            raise ValueError(f"Invalid learning rate: {lr}")  # torch.optim.SGD's words
        if input.dim() < 1:
            raise RuntimeError("fused_mlp: input must be at least 1-D")
        rows = input.shape[:-1]
        if code == 2:
            if target.dtype != torch.int64 or target.shape != rows:
                raise ValueError(f"FusedMLP.training_step: cross_entropy takes one int64 class index per row, a "
                                 f"target of shape {tuple(rows)}; got {target.dtype} of shape {tuple(target.shape)}")
        elif target.shape[:-1] != rows or target.shape[-1:] != self.sizes[-1:] or target.dtype != input.dtype:
            raise ValueError(f"FusedMLP.training_step: {loss} takes a target shaped like the output, "
                             f"{tuple(rows) + (self.sizes[-1],)}, of the input's dtype {input.dtype}; got "
                             f"{target.dtype} of shape {tuple(target.shape)}")
        params = self._parameters["params"]
        step = getattr(_backend.compiled_autograd(input), "fused_mlp_training_step", None)  # none while tracing
        if step is not None:
            return step(input, params, self.sizes, *self._codes, target, code, lr)
        with torch.enable_grad():
            out = self(input)
            if code == 2:  # the classes are the output's last dim, whatever the leading dims
                value = F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
            else:
                value = (F.mse_loss if code == 0 else F.binary_cross_entropy_with_logits)(out, target)
            (grad,) = torch.autograd.grad(value, params)
        with torch.no_grad():
            params.sub_(grad, alpha=lr)
        params.grad = grad
        return value.detach()

    @property
    def weights(self):
        return unpack(self.params, self.sizes)[0]

    @property
    def biases(self):
        return unpack(self.params, self.sizes)[1]

    def _sequential_keys(self):
        """(state_dict key, view of params) per tensor, keyed as in the Sequential, whose activation modules
        between the Linear layers take an index each."""
        step = 2 if self._codes[0] else 1
        weights, biases = unpack(self.params, self.sizes)
        for layer, (w, b) in enumerate(zip(weights, biases)):
            yield f"{layer * step}.weight", w
            yield f"{layer * step}.bias", b

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, view in self._sequential_keys():
            destination[prefix + key] = view if keep_vars else view.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        expected = dict(self._sequential_keys())
        for key, view in expected.items():
            if prefix + key not in state_dict:
                missing_keys.append(prefix + key)
                continue
            value = state_dict[prefix + key]
            if not torch.is_tensor(value):
                error_msgs.append(f'While copying the parameter named "{prefix + key}", expected torch.Tensor or '
                                  f"Tensor-like object from checkpoint but received {type(value)}")
            elif value.shape != view.shape:
                error_msgs.append(f"size mismatch for {prefix + key}: copying a param with shape {value.shape} from "
                                  f"checkpoint, the shape in current model is {view.shape}.")
            else:
                with torch.no_grad():
                    view.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in expected)

    def to_sequential(self):
        """The unfused torch.nn.Sequential(Linear, act, ..., Linear[, output_activation]) with a copy of the
        weights."""
        kinds = {1: torch.nn.ReLU, 2: torch.nn.Sigmoid}
        layers = []
        for i, (n_in, n_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            layers.append(torch.nn.Linear(n_in, n_out, device=self.params.device, dtype=self.params.dtype))
            code = self._codes[0] if i < len(self.sizes) - 2 else self._codes[1]
            if code:
                layers.append(kinds[code]())
        sequential = torch.nn.Sequential(*layers)
        sequential.load_state_dict(self.state_dict())
        return sequential

    def extra_repr(self):
        return (f"sizes={list(self.sizes)}, activation={self.activation!r}, "
                f"output_activation={self.output_activation!r}")


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
