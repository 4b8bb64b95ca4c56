"""pyengine.nn's forwards as TorchScript compiles them (torch.jit.script of a model with pyengine.nn modules).

TorchScript cannot compile the Python autograd Functions, so under scripting each module calls these functions,
which call the registered operators torch.ops.pyengine.<op>_forward directly: the same kernels, differentiable
through the autograd that pyengine/ops/_library.py registers for them (a scripted model trains and saves;
loading it in another process needs `import pyengine` first, which registers the operators). What stays in
Python is not in a scripted model: pyengine.use_backend and PYENGINE_BACKEND (the tensors' device decides),
autocast's dtypes, and integer inputs promoted to float (the kernels refuse them instead).
"""
from typing import List, Optional

import torch
from torch import Tensor


def reduction_code(reduction: str) -> int:
    if reduction == "none":
        return 0
    if reduction == "mean":
        return 1
    if reduction == "sum":
        return 2
    raise ValueError(reduction + " is not a valid value for reduction")


def activation_code(activation: Optional[str]) -> int:
    if activation is None:
        return 0
    if activation == "relu":
        return 1
    if activation == "sigmoid":
        return 2
    raise ValueError("linear: unknown activation " + activation + "; choose one of None, 'relu', 'sigmoid'")


def rows(x: Tensor) -> Tensor:
    """x as (M, K): its leading dims flattened (M computed, not -1, which is ambiguous when K = 0)."""
    m = 1
    for n in x.shape[:-1]:
        m *= n
    return x.reshape(m, x.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str]) -> Tensor:
    y = torch.ops.pyengine.linear_forward(rows(x), weight, bias, activation_code(activation))
    return y.reshape(x.shape[:-1] + [weight.shape[0]])


def mse_loss(input: Tensor, target: Tensor, reduction: str) -> Tensor:
    if input.shape != target.shape:
        input, target = torch.broadcast_tensors(input, target)
    return torch.ops.pyengine.mse_loss_forward(input.contiguous(), target.contiguous(), reduction_code(reduction))


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor],
                                     pos_weight: Optional[Tensor], reduction: str) -> Tensor:
    if weight is not None:
        weight = weight.broadcast_to(input.shape).contiguous()
    if pos_weight is not None:
        pos_weight = pos_weight.broadcast_to(input.shape).contiguous()
    return torch.ops.pyengine.binary_cross_entropy_with_logits_forward(
        input.contiguous(), target.contiguous(), weight, pos_weight, reduction_code(reduction))


def cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                  label_smoothing: float) -> Tensor:
    """Logits (C), (N, C) or (N, C, d1, ...) viewed as (N, C, D); a target of the input's shape holds class
    probabilities, any other one class index per row."""
    if input.dim() == 1:
        logits = input.reshape(1, input.shape[0], 1)
    else:
        d = 1
        for n in input.shape[2:]:
            d *= n
        logits = input.reshape(input.shape[0], input.shape[1], d)
    if target.shape == input.shape:
        tgt = target.reshape(logits.shape)
    else:
        tgt = target.reshape(logits.shape[0], logits.shape[2]).to(torch.int64)
    code = reduction_code(reduction)
    loss = torch.ops.pyengine.cross_entropy_forward(logits.contiguous(), tgt.contiguous(), weight, ignore_index, code,
                                                    label_smoothing)[0]
    if code != 0:
        return loss
    if input.dim() == 1:
        return loss.reshape([])
    return loss.reshape(input.shape[:1] + input.shape[2:])


def fused_mlp_packed(x: Tensor, params: Tensor, sizes: List[int], activation: int, output_activation: int) -> Tensor:
    """pyengine.nn.FusedMLP's packed parameters (per layer the weight row by row, then the bias) as views."""
    weights: List[Tensor] = []
    biases: List[Tensor] = []
    at = 0
    for i in range(len(sizes) - 1):
        n_in, n_out = sizes[i], sizes[i + 1]
        weights.append(params[at:at + n_out * n_in].view(n_out, n_in))
        biases.append(params[at + n_out * n_in:at + n_out * (n_in + 1)])
        at += n_out * (n_in + 1)
    y = torch.ops.pyengine.fused_mlp_forward(rows(x), weights, biases, activation, output_activation)[0]
    return y.reshape(x.shape[:-1] + [y.shape[1]])
