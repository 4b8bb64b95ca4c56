"""What relu, sigmoid and tanh share: an autograd Function that saves the activation's output y and runs the
chosen backend's <op>_forward(x) and <op>_backward(dy, y) kernels, and torch's int -> float promotion."""
import torch

from .. import _backend


def output_saving_function(op, class_name):
    """A torch.autograd.Function named class_name: y = <op>_forward(x), dx = <op>_backward(dy, y)."""
    forward_name, backward_name = f"{op}_forward", f"{op}_backward"

    def forward(ctx, x):
        ctx.kernels = _backend.kernels(x.device)
        y = getattr(ctx.kernels, forward_name)(x)
        ctx.save_for_backward(y)
        return y

    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return getattr(ctx.kernels, backward_name)(grad_y, y)

    return type(class_name, (torch.autograd.Function,), {
        "__doc__": f"y = {op}(x); the backward reads only the saved output y.", "__module__": f"pyengine.ops.{op}",
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


def promote_to_float(input, op):
    """Integer and bool inputs become the default float dtype, as torch.sigmoid and torch.tanh do."""
    if input.is_floating_point():
        return input
    if input.is_complex():
        raise NotImplementedError(f"pyengine.{op} supports real tensors only")
    return input.to(torch.get_default_dtype())
