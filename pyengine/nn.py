"""torch.nn modules whose forward runs pyengine's kernels.

Each one subclasses its torch.nn twin and changes only forward, so constructor arguments, initialization,
parameters and state_dict keys are torch's: weights load either way, and `convert` swaps a model's layers
in place without touching its parameters (an optimizer built on them keeps working). help() on each class says
what pyengine changes (Linear's activation; ReLU's and LeakyReLU's inplace=True computed out of place;
CrossEntropyLoss without double backward or forward-mode AD) and points to its torch twin for the rest.
FusedMLP, a whole small MLP run as one kernel call each way, has no torch twin.

The backend that runs them: pyengine.use_backend, else the environment variable PYENGINE_BACKEND, else the
tensors' device (see help(pyengine)). torch.jit.script of these modules needs the compiled extension.
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
    """torch.nn.Linear whose forward runs pyengine.functional.linear: y = activation(x @ weight^T + bias).

    What pyengine adds: the activation argument (None, 'relu' or 'sigmoid'), applied in the same pass as the
    bias. It is a plain setting, not a parameter or buffer, so state_dict is torch.nn.Linear's and weights load
    either way. Everything else (constructor arguments, initialization, parameters weight (out_features,
    in_features) and bias (out_features), repr) is torch.nn.Linear's: see help(torch.nn.Linear).

    Args:
        in_features (int): the size of each input sample.
        out_features (int): the size of each output sample.
        bias (bool): whether to learn an additive bias. Default: True.
        device, dtype: of the parameters, as in torch. Default: None (torch's defaults).
        activation (str, optional): None, 'relu' or 'sigmoid'; any other value raises ValueError here.
            Default: None.

    Shape:
        - Input: (*, in_features); Output: (*, out_features).

    Example:
        >>> import torch, pyengine
        >>> layer = pyengine.nn.Linear(3, 2, activation="relu")
        >>> layer
        Linear(in_features=3, out_features=2, bias=True, activation='relu')
        >>> layer(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """

    activation = None  # what a torch.nn.Linear swapped in by `convert` (no __init__ of ours) reads
    __constants__ = [*torch.nn.Linear.__constants__, "activation"]  # TorchScript reads the class default too

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, activation=None):
        """torch.nn.Linear(in_features, out_features, bias, device, dtype), initialized as torch initializes it,
        with activation None, 'relu' or 'sigmoid' (checked here: another value raises ValueError). See
        help(pyengine.nn.Linear)."""
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
    """torch.nn.ReLU whose forward runs pyengine.functional.relu: y = max(x, 0) elementwise.

    What differs from torch.nn.ReLU: inplace=True is accepted for compatibility, but the result is computed out
    of place (the input is left unchanged). The rest is torch.nn.ReLU's: see help(torch.nn.ReLU).

    Args:
        inplace (bool): accepted and shown in the repr; has no effect. Default: False.

    Shape:
        - Input: (*), any shape; Output: (*), the input's shape.

    Example:
        >>> import torch, pyengine
        >>> x = torch.tensor([-1.0, 2.0])
        >>> pyengine.nn.ReLU(inplace=True)(x), x
        (tensor([0., 2.]), tensor([-1.,  2.]))
    """

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.relu_forward(input)
        return F.relu(input)


class Sigmoid(_Scriptable, torch.nn.Sigmoid):
    """torch.nn.Sigmoid whose forward runs pyengine.functional.sigmoid: y = 1 / (1 + exp(-x)) elementwise.

    Nothing else differs from torch.nn.Sigmoid (see help(torch.nn.Sigmoid)); it takes no arguments.

    Shape:
        - Input: (*), any shape; Output: (*), the input's shape.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.Sigmoid()(torch.tensor([0.0]))
        tensor([0.5000])
    """

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.sigmoid_forward(input)
        return F.sigmoid(input)


class Tanh(_Scriptable, torch.nn.Tanh):
    """torch.nn.Tanh whose forward runs pyengine.functional.tanh: the hyperbolic tangent, elementwise.

    Nothing else differs from torch.nn.Tanh (see help(torch.nn.Tanh)); it takes no arguments.

    Shape:
        - Input: (*), any shape; Output: (*), the input's shape.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.Tanh()(torch.tensor([0.0, 1.0]))
        tensor([0.0000, 0.7616])
    """

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.tanh_forward(input)
        return F.tanh(input)


class LeakyReLU(_Scriptable, torch.nn.LeakyReLU):
    """torch.nn.LeakyReLU whose forward runs pyengine.functional.leaky_relu: x where x > 0, else
    negative_slope * x.

    What differs from torch.nn.LeakyReLU: inplace=True is accepted for compatibility, but the result is
    computed out of place (the input is left unchanged). The rest is torch.nn.LeakyReLU's: see
    help(torch.nn.LeakyReLU).

    Args:
        negative_slope (float): the slope for x <= 0. Default: 0.01.
        inplace (bool): accepted and shown in the repr; has no effect. Default: False.

    Shape:
        - Input: (*), any shape, floating-point; Output: (*), the input's shape.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.LeakyReLU(0.5)(torch.tensor([-2.0, 3.0]))
        tensor([-1.,  3.])
    """

    def forward(self, input):
        if torch.jit.is_scripting():
            return torch.ops.pyengine.leaky_relu_forward(input, self.negative_slope)
        return F.leaky_relu(input, self.negative_slope)


class MSELoss(_Scriptable, torch.nn.MSELoss):
    """torch.nn.MSELoss whose forward runs pyengine.functional.mse_loss: the squared error (x - y)^2, reduced.

    Nothing else differs from torch.nn.MSELoss (see help(torch.nn.MSELoss)): its arguments, repr and (empty)
    state_dict are torch's.

    Args:
        size_average (bool, optional): deprecated (see reduction), as in torch. Default: None.
        reduce (bool, optional): deprecated (see reduction), as in torch. Default: None.
        reduction (str): 'none' | 'mean' | 'sum'. Default: 'mean'.

    Shape:
        - Input: (*); Target: (*), the input's shape (another shape broadcasts, with a warning, as in torch).
        - Output: a scalar, or (*) for reduction='none'.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.MSELoss()(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        tensor(2.)
    """

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.mse_loss(input, target, self.reduction)
        return F.mse_loss(input, target, reduction=self.reduction)


class BCEWithLogitsLoss(_Scriptable, torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss whose forward runs pyengine.functional.binary_cross_entropy_with_logits:
    sigmoid and binary cross-entropy fused, stable for large logits.

    Nothing else differs from torch.nn.BCEWithLogitsLoss (see help(torch.nn.BCEWithLogitsLoss)): its arguments,
    buffers weight and pos_weight, and state_dict are torch's.

    Args:
        weight (Tensor, optional): a weight per element, broadcast to the input's shape. Default: None.
        size_average (bool, optional): deprecated (see reduction), as in torch. Default: None.
        reduce (bool, optional): deprecated (see reduction), as in torch. Default: None.
        reduction (str): 'none' | 'mean' | 'sum'. Default: 'mean'.
        pos_weight (Tensor, optional): the weight of positive labels, broadcast along the input's last (class)
            dim. Default: None.
        weight and pos_weight may not require grad (torch's "not differentiable" error), as in torch.

    Shape:
        - Input: (*) logits; Target: (*), the input's shape, labels in [0, 1].
        - Output: a scalar, or (*) for reduction='none'.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.BCEWithLogitsLoss()(torch.zeros(4), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        tensor(0.6931)
    """

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.binary_cross_entropy_with_logits(input, target, self.weight, self.pos_weight,
                                                              self.reduction)
        return F.binary_cross_entropy_with_logits(input, target, self.weight, pos_weight=self.pos_weight,
                                                  reduction=self.reduction)


class CrossEntropyLoss(_Scriptable, torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss whose forward runs pyengine.functional.cross_entropy: softmax and negative
    log-likelihood fused, one log-sum-exp saved per row.

    What differs from torch.nn.CrossEntropyLoss: no double backward (differentiating the loss's gradient again
    raises RuntimeError) and no forward-mode AD (torch.func.jvp, jacfwd raise NotImplementedError). The rest
    (arguments, the weight buffer, state_dict) is torch's: see help(torch.nn.CrossEntropyLoss).

    Args:
        weight (Tensor, optional): a weight per class, (C,). Default: None.
        size_average (bool, optional): deprecated (see reduction), as in torch. Default: None.
        ignore_index (int): class-index targets equal to it are left out of the loss and of 'mean''s divisor.
            Default: -100.
        reduce (bool, optional): deprecated (see reduction), as in torch. Default: None.
        reduction (str): 'none' | 'mean' | 'sum'. Default: 'mean'.
        label_smoothing (float): in [0, 1], mixes the target with the uniform distribution. Default: 0.0.

    Shape:
        - Input: (C), (N, C) or (N, C, d1, ..., dk) logits.
        - Target: class indices of shape (), (N) or (N, d1, ..., dk), or class probabilities of the input's shape.
        - Output: a scalar, or the target's shape without the class dim for reduction='none'.

    Example:
        >>> import torch, pyengine
        >>> pyengine.nn.CrossEntropyLoss()(torch.zeros(2, 3), torch.tensor([0, 2]))
        tensor(1.0986)
    """

    def forward(self, input, target):
        if torch.jit.is_scripting():
            return _scripted.cross_entropy(input, target, self.weight, self.ignore_index, self.reduction,
                                           self.label_smoothing)
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


_TRAINING_LOSSES = {"mse": 0, "bce_with_logits": 1, "cross_entropy": 2}


class FusedMLP(_Scriptable, torch.nn.Module):
    """A whole small MLP whose forward and backward each run as one kernel call (pyengine.functional.fused_mlp).
    Not in torch: FusedMLP([8, 6, 4, 1], activation='sigmoid') computes what
    nn.Sequential(Linear(8, 6), Sigmoid(), Linear(6, 4), Sigmoid(), Linear(4, 1)) does.

    Args:
        sizes (sequence of int): the input, hidden..., output widths n_0 .. n_L: 2 to 17 of them (1 to 16
            layers), each from 1 to 128 (another raises ValueError; use Linear layers for wider networks).
        activation (str or None): between the layers: 'relu', 'sigmoid' or None. Default: 'relu'.
        output_activation (str or None): after the last layer, the same choices. Default: None (raw outputs).
        device, dtype: of the parameters, as for torch.nn.Linear. Default: None (torch's defaults).

    Attributes:
        params (Parameter): every parameter in one tensor: each layer's weight (out, in) row by row, then its
            bias, layer after layer (as tiny-cuda-nn keeps them). A training step then accumulates one gradient
            and updates one parameter, not two per layer, which at small sizes costs more than the layers'
            arithmetic (benchmarks/NOTES.md). Everything elementwise (SGD, Adam, weight decay, clipping by norm)
            behaves as over the separate tensors; per-layer optimizer settings need the unfused Sequential.
        weights, biases: lists of views of params, (n_{l+1}, n_l) and (n_{l+1},) per layer.

    Initialization and state_dict are the Sequential's: the same random draws in the same order (same seed,
    same weights), and its state_dict keys ('0.weight', '0.bias', '2.weight', ...; '1.weight' for the second
    layer when activation is None), so weights load either way (loading copies into params). to_sequential()
    gives that Sequential, with copies of the weights; training_step(input, target, lr, loss) runs a whole SGD
    step as one call.

    Shape:
        - Input: (*, n_0); Output: (*, n_L).

    Differences from the Sequential: no double backward and no forward-mode AD (torch.func.jvp, jacfwd).
    The backend: pyengine.use_backend, else the environment variable PYENGINE_BACKEND, else the device.

    Example:
        >>> import torch, pyengine
        >>> _ = torch.manual_seed(0)
        >>> mlp = pyengine.nn.FusedMLP([8, 6, 4, 1], activation="sigmoid")
        >>> mlp.params.shape, [tuple(w.shape) for w in mlp.weights]
        (torch.Size([87]), [(6, 8), (4, 6), (1, 4)])
        >>> mlp(torch.randn(5, 8)).shape
        torch.Size([5, 1])
        >>> list(mlp.state_dict())
        ['0.weight', '0.bias', '2.weight', '2.bias', '4.weight', '4.bias']
        >>> loss = mlp.training_step(torch.randn(5, 8), torch.ones(5, 1), lr=0.1)  # forward, backward, SGD
    """

    __jit_unused_properties__ = ["weights", "biases"]  # Python views: a scripted forward reads params itself

    def __init__(self, sizes, activation="relu", output_activation=None, device=None, dtype=None):
        """A fused MLP of widths sizes (n_0, hidden..., n_L; 1 to 16 layers, each width 1..128), with activation
        ('relu', 'sigmoid' or None; default 'relu') between the layers and output_activation (the same choices;
        default None) after the last; its parameters are made on device in dtype (None: torch's defaults).
        The weights are drawn as torch.nn.Linear(n_l, n_{l+1}) draws them, layer by layer, and packed into the
        one parameter params. Bad sizes or activation names raise ValueError here. See help(pyengine.nn.FusedMLP).
        """
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


_TORCH_LINEAR_CROSS_ENTROPY_LOSS = getattr(torch.nn, "LinearCrossEntropyLoss", None)  # torch 2.14 and later

if _TORCH_LINEAR_CROSS_ENTROPY_LOSS is not None:
    class LinearCrossEntropyLoss(_TORCH_LINEAR_CROSS_ENTROPY_LOSS):
        """torch.nn.LinearCrossEntropyLoss whose forward runs pyengine.functional.linear_cross_entropy: the loss
        of the input, linearly transformed to logits, against the target, computed over chunks of rows so that
        the (N, C) logits never exist whole. New in torch 2.14: pyengine.nn has it only where torch does.

        Args (torch's constructor, unchanged):
            in_features (int): H, the size of each input sample.
            num_classes (int): C.
            out_features (tuple of int, optional): (d1, ..., dK) for a K-dimensional loss. Default: ().
            bias (bool, optional): a learnable bias of the logits. Default: False.
            device, dtype (optional): of the linear layer's parameters. Default: None.
            reduction (str, optional): 'mean', 'sum' or 'none'. Default: 'mean'.
            weight (Tensor, optional): (C,) class weights, a buffer as in torch. Default: None.
            ignore_index (int, optional): None means -100 for class indices. Default: None.
            label_smoothing (float, optional): in [0.0, 1.0]. Default: 0.0.
            options (torch.nn.LinearCrossEntropyOptions, optional): passed on; pyengine always chunks and reads
                only its batch_chunk_size (the rows per chunk). Default: None.

        Parameters and state_dict are torch's (linear.weight (C * prod(out_features), in_features), linear.bias),
        so weights load either way and pyengine.nn.convert swaps a torch module in place. Shapes, values and
        what differs from torch (leading batch dims accepted, no double backward): see
        pyengine.functional.linear_cross_entropy. torch.jit.script raises (use torch.compile).

        Example:
            >>> import torch, pyengine.nn as pnn
            >>> _ = torch.manual_seed(0)
            >>> loss_fn = pnn.LinearCrossEntropyLoss(4, 10, bias=True, label_smoothing=0.1)
            >>> x, target = torch.randn(8, 4), torch.randint(0, 10, (8,))
            >>> loss_fn(x, target).backward()
            >>> loss_fn.linear.weight.grad.shape
            torch.Size([10, 4])
            >>> list(loss_fn.state_dict())
            ['linear.weight', 'linear.bias']
        """

        def __prepare_scriptable__(self):
            raise RuntimeError("torch.jit.script of pyengine.nn.LinearCrossEntropyLoss is not supported: its forward "
                               "runs pyengine's Python linear_cross_entropy. Use torch.compile instead.")

        def forward(self, input, target):
            linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features,
                                                        self.linear.in_features))
            linear_bias = (None if self.linear.bias is None
                           else self.linear.bias.reshape((self.num_classes, *self.out_features)))
            return F.linear_cross_entropy(input, linear_weight, target, linear_bias=linear_bias, weight=self.weight,
                                          reduction=self.reduction, ignore_index=self.ignore_index,
                                          label_smoothing=self.label_smoothing, options=self.options)


_SWAPS = {torch.nn.Linear: Linear, torch.nn.ReLU: ReLU, torch.nn.Sigmoid: Sigmoid, torch.nn.Tanh: Tanh,
          torch.nn.LeakyReLU: LeakyReLU, torch.nn.CrossEntropyLoss: CrossEntropyLoss, torch.nn.MSELoss: MSELoss,
          torch.nn.BCEWithLogitsLoss: BCEWithLogitsLoss,
          **({} if _TORCH_LINEAR_CROSS_ENTROPY_LOSS is None
             else {_TORCH_LINEAR_CROSS_ENTROPY_LOSS: LinearCrossEntropyLoss})}


def convert(model):
    """Swaps every torch.nn module pyengine has a twin of (Linear, ReLU, Sigmoid, Tanh, LeakyReLU,
    CrossEntropyLoss, MSELoss, BCEWithLogitsLoss, and LinearCrossEntropyLoss where torch has it (2.14 and later))
    inside `model` (and `model` itself) for pyengine's, keeping parameters, buffers and hooks; returns the model.
    Subclasses of those torch modules are left alone, since they may override forward."""
    for module in model.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return model


__all__ = ["BCEWithLogitsLoss", "CrossEntropyLoss", "FusedMLP", "LeakyReLU", "Linear", "MSELoss", "ReLU", "Sigmoid",
           "Tanh", "convert"] + ([] if _TORCH_LINEAR_CROSS_ENTROPY_LOSS is None else ["LinearCrossEntropyLoss"])

_MODULE_ATTRIBUTES = ("__all__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__spec__")


def __dir__():
    """dir(pyengine.nn): the public modules and convert (__all__) and the standard module attributes, not the
    imports and helpers."""
    return sorted([*__all__, *(n for n in _MODULE_ATTRIBUTES if n in globals())])
