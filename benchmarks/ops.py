"""What is benchmarked: one entry per op (named like the op) and the end-to-end training steps.

Each op entry knows its sizes, how to make its inputs, the pyengine and torch calls, and its floor: the bytes
that must cross memory and the flops that must be done, per mode (see NOTES.md for the reasoning per op).
Sizes: tiny is the origin notes' 8 -> 6 -> 4 -> 1 MLP at a batch of 759 rows, large is 16M-element
activations, a 4096x1024 -> 1024 linear, a 4096x32000 cross-entropy and an LM head (4096x1024 -> 32000 classes).
"""
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import pyengine.functional as PF
import pyengine.nn as pnn

SIZES = ("tiny", "medium", "large")
NO_GRAD = "forward (no grad)"
# forward: on inputs that require grad (training's forward, saving what backward needs); NO_GRAD: the same call on
# detached inputs, nothing recorded for autograd (an inference call: the row that judges cross_entropy's forward)
MODES = ("forward", NO_GRAD, "backward", "forward+backward")
# op -> the dtypes in which pyengine's forward computes the gradient for an incoming 1 in the same pass as the
# loss (training's case), its backward only scaling or returning it: there a backward-only time is not comparable
# with torch's, whose backward does that work, and only forward+backward compares like with like. cross_entropy
# keeps float16/bfloat16 out (a saved gradient would be rounded twice).
GRAD_IN_FORWARD = {"cross_entropy": ("float32", "float64"),
                   "linear_cross_entropy": ("float32", "float64", "float16", "bfloat16"),
                   "linear_cross_entropy_lm_head": ("float32", "float64", "float16", "bfloat16")}
TINY_ROWS = 759  # the notes' batch


@dataclass
class Op:
    name: str
    sizes: dict  # size name -> shape parameters
    make: Callable  # (params, dtype, device) -> (inputs that take a gradient, other arguments)
    pyengine: Callable
    torch: Callable
    floor: Callable  # (params, element bytes) -> {mode: (bytes, flops or None)}; NO_GRAD's is forward's
    describe: Callable = field(default=lambda p: "x".join(map(str, p)))
    # torch's own chunked implementation of the op, timed beside the composition in `torch` (peer "torch_chunked"):
    # (*inputs, allow_retain_graph) -> output
    torch_chunked: Callable = None


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_()


def _unary(p, dtype, device):
    return [_randn(p, dtype, device)], []


def _unary_floor(p, s):
    n = math.prod(p)
    # forward reads x and writes y; backward reads dy and the saved x (or y) and writes dx
    return {"forward": (2 * n * s, None), "backward": (3 * n * s, None), "forward+backward": (5 * n * s, None)}


ELEMENTWISE = {"tiny": (TINY_ROWS, 6), "medium": (1024, 1024), "large": (4096, 4096)}


def _add_make(p, dtype, device):
    rows, cols = p
    return [_randn((rows, cols), dtype, device), _randn((cols,), dtype, device)], []


def _add_floor(p, s):
    n, c = math.prod(p), p[1]
    # forward: read x and the bias row, write out. backward: d x is dy itself (it may alias it: no bytes),
    # d bias is dy summed over rows: read dy once, write one row.
    fwd, bwd = (2 * n + c) * s, (n + c) * s
    return {"forward": (fwd, None), "backward": (bwd, None), "forward+backward": (fwd + bwd, None)}


def _linear_make(p, dtype, device):
    m, k, n = p
    w = torch.randn(n, k, dtype=dtype, device=device) / math.sqrt(k)
    return [_randn((m, k), dtype, device), w.requires_grad_(), _randn((n,), dtype, device)], []


def _linear_floor(p, s):
    m, k, n = p
    fwd_b = (m * k + n * k + n + m * n) * s  # read x, W, b; write y
    bwd_b = (m * n + m * k + n * k + m * k + n * k + n) * s  # read dy, x, W; write dx, dW, db
    fwd_f, bwd_f = 2 * m * n * k + m * n, 4 * m * n * k + m * n  # dx = dy W and dW = dy^T x; db sums dy
    return {"forward": (fwd_b, fwd_f), "backward": (bwd_b, bwd_f), "forward+backward": (fwd_b + bwd_b, fwd_f + bwd_f)}


def _linear_act_floor(p, s):
    # linear's, plus the backward's read of the saved output y (the activation's derivative comes from it)
    m, _, n = p
    floor = _linear_floor(p, s)
    (bwd_b, bwd_f), (both_b, both_f) = floor["backward"], floor["forward+backward"]
    return {**floor, "backward": (bwd_b + m * n * s, bwd_f), "forward+backward": (both_b + m * n * s, both_f)}


def _linear_relu(x, w, b):
    return PF.linear(x, w, b, activation="relu")


def _torch_linear_relu(x, w, b):
    return F.relu(F.linear(x, w, b))


def _loss_make(p, dtype, device, labels=False):
    target = torch.rand(p, dtype=dtype, device=device)
    if labels:
        target = (target > 0.5).to(dtype)
    return [_randn(p, dtype, device)], [target]


def _pointwise_loss_floor(p, s):
    n = math.prod(p)
    # forward reads input and target to one scalar; backward reads them again and writes d input
    return {"forward": (2 * n * s, None), "backward": (3 * n * s, None), "forward+backward": (5 * n * s, None)}


def _ce_make(p, dtype, device):
    n, c = p
    return [_randn((n, c), dtype, device)], [torch.randint(0, c, (n,), device=device)]


def _ce_floor(p, s):
    n, c = p
    # forward reads the logits and the int64 targets (and may keep one log-sum-exp per row); backward reads
    # the logits and targets again and writes d logits: softmax is recomputed, never stored
    fwd, bwd = n * c * s + 8 * n + 4 * n, 2 * n * c * s + 8 * n + 4 * n
    return {"forward": (fwd, None), "backward": (bwd, None), "forward+backward": (fwd + bwd, None)}


def _fused_mlp_make(p, dtype, device):
    rows, widths = p
    weights = [(torch.randn(b, a, dtype=dtype, device=device) / math.sqrt(a)).requires_grad_()
               for a, b in zip(widths, widths[1:])]
    biases = [_randn((b,), dtype, device) for b in widths[1:]]
    return [_randn((rows, widths[0]), dtype, device), *weights, *biases], []


def _fused_mlp_pyengine(x, *params):
    layers = len(params) // 2
    return PF.fused_mlp(x, params[:layers], params[layers:], "relu")


def _fused_mlp_torch(x, *params):
    layers = len(params) // 2
    for i, (w, b) in enumerate(zip(params[:layers], params[layers:])):
        x = F.linear(x, w, b)
        if i < layers - 1:
            x = F.relu(x)
    return x


def _fused_mlp_floor(p, s):
    rows, widths = p
    macs = sum(a * b for a, b in zip(widths, widths[1:]))
    params = macs + sum(widths[1:])
    hidden = rows * sum(widths[1:-1])
    # forward reads x and the parameters, writes the hidden outputs it saves and y; backward reads dy, x, the
    # saved hidden outputs, y and the weights, writes dx and the parameter gradients
    fwd = (rows * widths[0] + params + hidden + rows * widths[-1]) * s
    bwd = (2 * rows * widths[-1] + rows * widths[0] + hidden + macs + rows * widths[0] + params) * s
    return {"forward": (fwd, 2 * rows * macs), "backward": (bwd, 4 * rows * macs),
            "forward+backward": (fwd + bwd, 6 * rows * macs)}


FUSED_MLP_SIZES = {"tiny": (TINY_ROWS, (8, 6, 4, 1)), "medium": (4096, (32, 64, 64, 1)),
                   "large": (65536, (64, 128, 128, 1))}

OPS = {
    op.name: op
    for op in [
        Op("linear", {"tiny": (TINY_ROWS, 8, 6), "medium": (1024, 512, 512), "large": (4096, 1024, 1024)},
           _linear_make, PF.linear, F.linear, _linear_floor, lambda p: f"{p[0]}x{p[1]}->{p[2]}"),
        Op("linear_relu", {"tiny": (TINY_ROWS, 8, 6), "medium": (1024, 512, 512), "large": (4096, 1024, 1024)},
           _linear_make, _linear_relu, _torch_linear_relu, _linear_act_floor, lambda p: f"{p[0]}x{p[1]}->{p[2]}"),
        Op("relu", ELEMENTWISE, _unary, PF.relu, F.relu, _unary_floor),
        Op("sigmoid", ELEMENTWISE, _unary, PF.sigmoid, torch.sigmoid, _unary_floor),
        Op("tanh", ELEMENTWISE, _unary, PF.tanh, torch.tanh, _unary_floor),
        Op("leaky_relu", ELEMENTWISE, _unary, PF.leaky_relu, F.leaky_relu, _unary_floor),
        Op("add", ELEMENTWISE, _add_make, PF.add, torch.add, _add_floor, lambda p: f"{p[0]}x{p[1]}+{p[1]}"),
        Op("mse_loss", ELEMENTWISE, _loss_make, PF.mse_loss, F.mse_loss, _pointwise_loss_floor),
        Op("binary_cross_entropy_with_logits", ELEMENTWISE, lambda p, d, dev: _loss_make(p, d, dev, labels=True),
           PF.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, _pointwise_loss_floor),
        Op("cross_entropy", {"tiny": (TINY_ROWS, 10), "medium": (1024, 1000), "large": (4096, 32000)},
           _ce_make, PF.cross_entropy, F.cross_entropy, _ce_floor),
        Op("fused_mlp", FUSED_MLP_SIZES, _fused_mlp_make, _fused_mlp_pyengine, _fused_mlp_torch, _fused_mlp_floor,
           lambda p: f"{p[0]}x" + "->".join(map(str, p[1]))),
    ]
}



def _lce_make(p, dtype, device, bias=True):
    n, h, v = p
    w = torch.randn(v, h, dtype=dtype, device=device) / math.sqrt(h)
    params = [_randn((n, h), dtype, device), w.requires_grad_()] + ([_randn((v,), dtype, device)] if bias else [])
    return params, [torch.randint(0, v, (n,), device=device)]


def _lce_pyengine(x, w, b, t):
    return PF.linear_cross_entropy(x, w, t, linear_bias=b)


def _lce_torch(x, w, b, t):
    return F.cross_entropy(F.linear(x, w, b), t)


def chunked_options(allow_retain_graph=False):
    """torch's LinearCrossEntropyOptions (torch 2.14 and later), or an error that names what this torch lacks:
    the row says so and the run goes on."""
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is None or not hasattr(F, "linear_cross_entropy"):
        raise RuntimeError(f"torch {torch.__version__} has no chunked linear_cross_entropy "
                           "(F.linear_cross_entropy with torch.nn.LinearCrossEntropyOptions, torch 2.14 and later)")
    # allow_retain_graph: the chunked backward consumes gradients computed in the forward, in place, so a second
    # backward of one graph raises unless asked for (which costs an extra gradient-sized copy per call); only
    # the backward-only timing, which reruns one retained graph, asks
    return options(allow_retain_graph=allow_retain_graph)


def _lce_chunked(x, w, b, t, allow_retain_graph=False):
    options = chunked_options(allow_retain_graph)  # first: on a torch without it, F has no linear_cross_entropy
    return F.linear_cross_entropy(x, w, t, linear_bias=b, options=options)


def _lce_floor(p, s, bias=True):
    n, h, v = p
    b = v if bias else 0
    # forward reads x, W, b and the targets; backward writes dx, dW, db; the (N, V) logits need never touch
    # memory (a fused kernel keeps each tile on chip). Flops: the logits GEMM, then dx = dz W and dW = dz^T x.
    fwd_b, bwd_b = (n * h + v * h + b) * s + 8 * n, (n * h + v * h + b) * s
    fwd_f, bwd_f = 2 * n * h * v, 4 * n * h * v
    return {"forward": (fwd_b, fwd_f), "backward": (bwd_b, bwd_f), "forward+backward": (fwd_b + bwd_b, fwd_f + bwd_f)}


def _lm_head_pyengine(x, w, t):
    return PF.linear_cross_entropy(x, w, t)


def _lm_head_torch(x, w, t):
    return F.cross_entropy(F.linear(x, w), t)


def _lm_head_chunked(x, w, t, allow_retain_graph=False):
    options = chunked_options(allow_retain_graph)
    return F.linear_cross_entropy(x, w, t, options=options)


def _lce_shape(p):
    return f"{p[0]}x{p[1]}->{p[2]}"


OPS["linear_cross_entropy"] = Op(
    "linear_cross_entropy", {"tiny": (TINY_ROWS, 8, 10), "medium": (1024, 512, 8000), "large": (4096, 1024, 32000)},
    _lce_make, _lce_pyengine, _lce_torch, _lce_floor, _lce_shape, torch_chunked=_lce_chunked)
# A language model's output layer and loss: 4096 tokens of width 1024 into a 32000-token vocabulary, no bias (as in
# GPT-2 and Llama heads). The torch composition materializes the 4096x32000 logits (500 MB in float32) and their
# gradient; pyengine and torch's chunked path never hold them whole. Large only: it is the large sweep's biggest case.
OPS["linear_cross_entropy_lm_head"] = Op(
    "linear_cross_entropy_lm_head", {"large": (4096, 1024, 32000)},
    lambda p, dtype, device: _lce_make(p, dtype, device, bias=False), _lm_head_pyengine, _lm_head_torch,
    lambda p, s: _lce_floor(p, s, bias=False), _lce_shape, torch_chunked=_lm_head_chunked)


@dataclass
class Model:
    """An end-to-end training step: forward, loss, backward, SGD update, for the same model in pyengine.nn
    and torch.nn (same initial weights, same batch)."""
    name: str
    sizes: dict  # size name -> (batch, layer widths)
    build: Callable  # (widths, lib) -> (torch.nn.Module, loss module)
    data: Callable  # (batch, widths, dtype, device) -> (x, y)
    # (net, x, y, lr) -> pyengine's step, where it is not the usual zero_grad / loss.backward() / SGD step
    pyengine_step: Callable = None

    def describe(self, p):
        return f"{p[0]}x" + "->".join(map(str, p[1]))

    def floor(self, p, s):
        """Flops of one step: 2 per multiply-add forward, 4 backward, for each linear layer."""
        batch, widths = p
        flops = 6 * batch * sum(a * b for a, b in zip(widths, widths[1:]))
        return {"step": (None, flops)}


def _notes_mlp(widths, lib):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(lib.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(lib.Sigmoid())
    # the last sigmoid is fused into the loss (BCE with logits), as `pyengine train mlp` does
    return torch.nn.Sequential(*layers), lib.BCEWithLogitsLoss()


def _classifier(widths, lib):
    layers = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(lib.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(lib.ReLU())
    return torch.nn.Sequential(*layers), lib.CrossEntropyLoss()


def _binary_data(batch, widths, dtype, device):
    x = torch.randn(batch, widths[0], dtype=dtype, device=device)
    return x, (torch.rand(batch, 1, device=device) > 0.5).to(dtype)


def _class_data(batch, widths, dtype, device):
    return torch.randn(batch, widths[0], dtype=dtype, device=device), torch.randint(0, widths[-1], (batch,),
                                                                                   device=device)


def _notes_mlp_fused(widths, lib):
    """The notes' MLP as one pyengine.nn.FusedMLP (its state_dict keys are the Sequential's); torch's side is
    the usual nn.Sequential."""
    if lib is not pnn:
        return _notes_mlp(widths, lib)
    return pnn.FusedMLP(widths, activation="sigmoid"), pnn.BCEWithLogitsLoss()


MODELS = {
    m.name: m
    for m in [
        Model("mlp_notes", {"tiny": (TINY_ROWS, (8, 6, 4, 1))}, _notes_mlp, _binary_data),
        Model("mlp_notes_fused", {"tiny": (TINY_ROWS, (8, 6, 4, 1))}, _notes_mlp_fused, _binary_data),
        Model("mlp_notes_fused_step", {"tiny": (TINY_ROWS, (8, 6, 4, 1))}, _notes_mlp_fused, _binary_data,
              lambda net, x, y, lr: lambda: net.training_step(x, y, lr, loss="bce_with_logits")),
        Model("mlp_classifier", {"tiny": (64, (64, 32, 10)), "medium": (256, (784, 512, 10)),
                                 "large": (4096, (1024, 1024, 1000))}, _classifier, _class_data),
    ]
}

LIBS = {"pyengine": pnn, "torch": torch.nn}
