"""What the autograd Functions share: the output-saving Function of relu, sigmoid and tanh, torch's int -> float
promotion, and the error an op without a second derivative raises.

Double backward (torch.autograd.grad(..., create_graph=True), then differentiating the gradient again): while
autograd records the backward itself, grad mode is on inside it, and the backward kernels come from
_backend.backward_kernels: the python reference, whose torch operations autograd can differentiate once more.
Every op whose reference backward is a formula of its saved tensors supports it (linear, relu, sigmoid, tanh,
leaky_relu, add, mse_loss, binary_cross_entropy_with_logits). cross_entropy does not: its backward reads the
saved log-sum-exp as a constant, so a second derivative through it would be silently wrong; it raises instead.
"""
import functools
import math

import torch
from torch._C import _functions

from .. import _backend


def output_saving_function(op, class_name):
    """A torch.autograd.Function named class_name: y = <op>_forward(x), dx = <op>_backward(dy, y). The derivative is
    elementwise, so forward-mode AD (jvp) runs the same formula on the tangent: dy = <op>_backward(dx, y)."""
    forward_name, backward_name = f"{op}_forward", f"{op}_backward"

    def forward(x):
        return getattr(_backend.kernels(x.device), forward_name)(x)

    def setup_context(ctx, inputs, output):
        ctx.kernels = _backend.kernels(output.device)
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        return getattr(_backend.backward_kernels(ctx.kernels), backward_name)(grad_y, y)

    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return getattr(_backend.backward_kernels(ctx.kernels), backward_name)(tangent, y)

    return type(class_name, (torch.autograd.Function,), {
        "__doc__": f"y = {op}(x); the backward reads only the saved output y.", "__module__": f"pyengine.ops.{op}",
        "generate_vmap_rule": True, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(jvp)})


def jvp_free_twin(function):
    """A subclass of an autograd Function without its jvp, for torch.compile, which refuses to trace a Function that
    defines one (inside a compiled graph forward-mode AD is not available anyway). Kept in a module global beside the
    Function: dynamo can read a global class, not an attribute set on one."""
    return type(function.__name__, (function,), {
        "jvp": torch.autograd.Function.jvp, "__module__": function.__module__, "__doc__": function.__doc__})


def apply(function, twin, *args):
    """Applies an op's autograd Function: its jvp_free_twin while torch.compile traces, the Function itself under
    torch.func transforms, and otherwise its eager twin (below) with the forward's defaults filled in."""
    if torch.compiler.is_compiling():
        return twin.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    eager, argcount, defaults = _EAGER_TWINS.get(function) or _eager_twin(function)
    if len(args) < argcount:  # the defaults the setup_context form would have bound
        args = args + defaults[len(defaults) - (argcount - len(args)):]
    return eager.apply(*args)


_EAGER_TWINS = {}


def _eager_twin(function):
    """The Function in torch's older form, forward(ctx, *inputs), which runs setup_context itself: the same
    forward, saved tensors, backward and jvp. A Function with a separate setup_context (the form torch.func needs)
    pays inspect.signature on every apply, to bind its forward's defaults: measured 86 us against 8 us a call for
    the older form (benchmarks/NOTES.md, "Per-call cost"), which no op on a small tensor can afford. Made once per
    Function; returns (twin, the forward's positional argument count, its defaults)."""
    forward, setup_context = function.forward, function.setup_context

    def eager_forward(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    attributes = {"forward": staticmethod(eager_forward), "backward": staticmethod(function.backward),
                  "__module__": function.__module__, "__doc__": function.__doc__}
    if function.jvp is not torch.autograd.Function.jvp:
        attributes["jvp"] = staticmethod(function.jvp)
    code = forward.__code__
    entry = (type(function.__name__, (torch.autograd.Function,), attributes), code.co_argcount,
             forward.__defaults__ or ())
    _EAGER_TWINS[function] = entry
    return entry


def needs_grad(ctx, count):
    """ctx.needs_input_grad padded with False to `count` entries: a Function applied with its optional
    arguments left out (LinearFunction.apply(x, w)) has fewer inputs than its signature."""
    return tuple(ctx.needs_input_grad) + (False,) * (count - len(ctx.needs_input_grad))


def as_matrix(x):
    """x as the (M, K) matrix the kernels take: leading dims flattened (M computed, not -1, which is ambiguous when
    K = 0), as csrc/autograd_common.h as_matrix."""
    return x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def contiguous(*tensors):
    """Each tensor contiguous, None kept: the kernels' optional operands."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def acc_dtype(dtype):
    """The dtype the reference formulas compute in: float64 for float64, float32 for the rest (float16 and
    bfloat16 included), as the kernels' acc_t in csrc/common/math.h."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def promote_to_float(input, op):
    """Integer and bool inputs become the default float dtype, as torch.sigmoid and torch.tanh do."""
    if input.is_floating_point():
        return input
    if input.is_complex():
        raise NotImplementedError(f"pyengine.{op} supports real tensors only")
    return input.to(torch.get_default_dtype())


def first_order_only(op, instead=None):
    """Like torch.autograd.function.once_differentiable, with an error that names the op and the way out: the
    backward runs without recording, and differentiating its result again raises."""
    message = (f"pyengine.{op} has no double backward (its backward is not differentiable); use "
               f"{instead or f'torch.nn.functional.{op}'} where a second derivative is needed").encode()

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():  # create_graph=False: nobody can differentiate the result
                return outputs
            if torch._C._are_functorch_transforms_active():
                # torch.func differentiates with the graph always recorded, so only a grad or jvp transform outside
                # the one that recorded this node (jacrev(jacrev(f)), hessian) can differentiate the result;
                # functorch's tensors take no error node, so raise now
                if _differentiable_outside(getattr(ctx, "functorch_level", None)):
                    raise RuntimeError(message.decode())
                return outputs
            single = not isinstance(outputs, tuple)
            outputs = (outputs,) if single else outputs
            # a registered op's gradient for a Tensor[] input is a list: its tensors are linked one by one
            flat = [t for o in outputs for t in (o if isinstance(o, list) else [o])]
            marked = [None if o is None else o.detach().requires_grad_() for o in flat]
            # the saved inputs (and ctx.error_links: inputs kept outside the saved tensors, whose versions autograd
            # does not check) join the error node too, so a gradient asked of them runs it (and raises) instead of
            # finding them unused
            saved = [t for t in (*ctx.saved_tensors, *getattr(ctx, "error_links", ()))
                     if t is not None and t.requires_grad]
            linked = _functions.DelayedError(message, len(marked) + len(saved))(*marked, *saved)
            linked = iter(linked if isinstance(linked, tuple) else (linked,))
            rebuilt = tuple([next(linked) for _ in o] if isinstance(o, list) else next(linked) for o in outputs)
            return rebuilt[0] if single else rebuilt

        return wrapper

    return decorate


def _differentiating_levels():
    """The levels of the torch.func grad and jvp transforms (vjp, jacrev, jacfwd, hessian) now active."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return [i.level() for i in retrieve_all_functorch_interpreters() if i.key() in kinds]


def note_functorch_level(ctx):
    """Called in setup_context: the innermost torch.func grad or jvp level that records this node, if any (a
    first-order-only backward raises when a transform outside it is active, see first_order_only)."""
    levels = _differentiating_levels() if torch._C._are_functorch_transforms_active() else []
    ctx.functorch_level = max(levels) if levels else None


def _differentiable_outside(level):
    """Whether a grad or jvp transform outside `level` (any, for a node recorded outside torch.func) is active."""
    return any(level is None or outer < level for outer in _differentiating_levels())


def autocast(policy, *tensors):
    """The dtypes torch.autocast gives torch's own ops: policy 'lower' (linear) casts floating inputs to the
    autocast dtype, 'float32' (the losses) to float32; float64 tensors, and everything outside an autocast
    region, are left alone. Elementwise ops and add are not listed by autocast and keep their dtypes."""
    first = tensors[0] if torch.is_tensor(tensors[0]) else next((t for t in tensors if torch.is_tensor(t)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):  # on every call: kept cheap
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type) if policy == "lower" else torch.float32
    return tuple(t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _category(dtype):
    return 3 if dtype.is_complex else 2 if dtype.is_floating_point else 0 if dtype == torch.bool else 1


def _combine(higher, lower):
    """c10's combine_categories: a lower-priority operand matters only when its kind (bool < int < float <
    complex) ranks above the higher-priority one's."""
    if higher is None:
        return lower
    if lower is None or higher.is_complex:
        return higher
    if lower.is_complex:
        return higher.to_complex() if higher.is_floating_point else lower
    if higher.is_floating_point:
        return higher
    if higher == torch.bool or lower.is_floating_point:
        return torch.promote_types(higher, lower)
    return higher


def result_type(*operands):
    """torch.result_type for tensors and Python numbers, written out so torch.compile can trace it: tensors with
    dims outrank 0-dim tensors, which outrank Python numbers (a float number counts as the default dtype)."""
    found = [None, None, None]  # dimensioned tensors, 0-dim tensors, Python numbers
    for x in operands:
        if torch.is_tensor(x):
            slot, dtype = (0 if x.dim() else 1), x.dtype
        else:
            slot = 2
            dtype = (torch.bool if isinstance(x, bool) else torch.int64 if isinstance(x, int)
                     else torch.get_default_dtype() if isinstance(x, float) else torch.complex64)
        found[slot] = dtype if found[slot] is None else torch.promote_types(found[slot], dtype)
    return _combine(found[0], _combine(found[1], found[2]))


# torch's names of dtypes in its messages: c10's ScalarType names ("expected ... but got Float") and the C++
# types of its checked conversions ("value cannot be converted to type int8_t without overflow").
SCALAR_TYPE_NAMES = {torch.float64: "Double", torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16",
                     torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char",
                     torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                     torch.complex128: "ComplexDouble"}
C_TYPE_NAMES = {torch.float64: "double", torch.float32: "float", torch.float16: "c10::Half",
                torch.bfloat16: "c10::BFloat16", torch.int64: "int64_t", torch.int32: "int", torch.int16: "int16_t",
                torch.int8: "int8_t", torch.uint8: "uint8_t"}


def scalar_type_name(dtype):
    """The name torch's messages give dtype: 'Float' for torch.float32, 'Long' for torch.int64."""
    return SCALAR_TYPE_NAMES.get(dtype, str(dtype))


NOT_DIFFERENTIABLE = ("The function '{op}' is not differentiable with respect to argument '{name}'. This input "
                      "cannot have requires_grad True.")


def not_differentiable(op, **arguments):
    """Raises torch's error when a tensor argument that torch cannot differentiate requires grad while grad mode
    is on (a class weight, pos_weight): silently leaving its .grad at None would hide a model that never learns
    it. `op` is the name torch's message gives the function."""
    if not torch.is_grad_enabled():
        return
    for name, t in arguments.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(NOT_DIFFERENTIABLE.format(op=op, name=name))

