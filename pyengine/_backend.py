"""Which implementation runs an op: the one place that decides.

Three backends implement every op's forward and backward:
  cpp     the compiled C++ kernels in pyengine._C, for CPU tensors
  cuda    the compiled CUDA kernels in pyengine._C, for CUDA tensors
  python  the readable reference in pyengine/ops/*.py: plain tensor arithmetic, any device

Choice, first match wins: the innermost ``with pyengine.use_backend(name):``, then the environment
variable PYENGINE_BACKEND (read at import), then the tensors' device (cpp for CPU, cuda for CUDA, python
where that backend is not built). The backend chosen in forward also runs that call's backward.
"""
import contextvars
import os
import types
import warnings

import torch

BACKENDS = ("cpp", "cuda", "python")
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` in the pyengine checkout (see README.md)"

try:
    from . import _C
except ImportError as exc:  # no compiled extension: everything still works on the python backend
    _C = None
    # without the file, Python's own message ("partially initialized module ... circular import") misleads
    _HERE = os.path.dirname(os.path.abspath(__file__))
    _C_IMPORT_ERROR = (exc if any(f.startswith("_C.") for f in os.listdir(_HERE))
                       else ImportError(f"the extension is not built: no pyengine/_C*.so in {_HERE}"))
    warnings.warn(f"pyengine: the compiled extension pyengine._C is not available ({_C_IMPORT_ERROR}); "
                  f"falling back to the python backend. To get the C++/CUDA kernels, {BUILD_HINT}.",
                  RuntimeWarning, stacklevel=2)
else:
    _C_IMPORT_ERROR = None

# The python backend: filled by @reference in pyengine/ops/*.py, with the same function names as _C.
REFERENCE = types.SimpleNamespace()
if _C is not None:  # what the C++ autograd Functions' backwards run while autograd records them (double backward)
    _C.autograd.set_reference(REFERENCE)


def reference(fn):
    """Registers fn as the python backend's implementation of the kernel of the same name."""
    setattr(REFERENCE, fn.__name__, fn)
    return fn


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"unknown pyengine backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def _cuda_built():
    return _C is not None and _C.with_cuda()


def built_backends():
    """Backends compiled into this installation, whether or not this machine can run them."""
    return [b for b, ok in (("cpp", _C is not None), ("cuda", _cuda_built()), ("python", True)) if ok]


def available_backends():
    """Backends that can run here: cpp when the extension is built, cuda when it has CUDA kernels and a GPU
    is visible, python always."""
    return [b for b in built_backends() if b != "cuda" or torch.cuda.is_available()]


ENV = "PYENGINE_BACKEND"
_chosen = contextvars.ContextVar("pyengine_backend", default=None)
_env_backend = os.environ.get(ENV) or None
if _env_backend is not None:
    try:
        _check_name(_env_backend)
    except ValueError as exc:
        raise ValueError(f"{ENV}={_env_backend!r}: {exc} (or unset {ENV} to choose by the tensors' device)") from None


def _check_runnable(name):
    """A backend that this installation has and this machine can run: the cuda backend needs a visible GPU."""
    _require_built(_check_name(name))
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pyengine backend 'cuda' needs a GPU, and none is visible here "
                           "(torch.cuda.is_available() is False); use 'cpp' or 'python' for CPU tensors.")
    return name


class use_backend:  # noqa: N801  (a function to its callers, like torch.set_grad_enabled)
    """Runs pyengine's ops on backend `name` ('cpp', 'cuda' or 'python'), checked when called: an unknown name,
    a backend not built, or 'cuda' without a visible GPU raise at once.

        with pyengine.use_backend("python"):   # inside the block only; the innermost block wins
            ...
        pyengine.use_backend("python")         # from here on, in this thread (context), as torch.set_grad_enabled

    The choice is per thread and per asyncio task (a context variable)."""

    def __init__(self, name):
        self._token = _chosen.set(_check_runnable(name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _chosen.reset(self._token)
        return False


def current_backend():
    """The backend forced by use_backend or PYENGINE_BACKEND, or None when the device decides."""
    return _chosen.get() or _env_backend


EXPECT_ENV = "PYENGINE_EXPECT_BACKENDS"


def missing_expected_backends(expected=None):
    """The backends named in PYENGINE_EXPECT_BACKENDS (or `expected`, comma-separated) that this installation
    does not have built, each with why: CI sets it to what it built, so an extension that fails to import fails
    the run instead of leaving the python fallback to pass every test."""
    expected = os.environ.get(EXPECT_ENV, "") if expected is None else expected
    missing = []
    for name in (n.strip() for n in expected.split(",") if n.strip()):
        _check_name(name)
        if name not in built_backends():
            why = (f"importing pyengine._C failed ({_C_IMPORT_ERROR})" if _C is None
                   else "pyengine._C was built without CUDA kernels")
            missing.append((name, why))
    return missing


def _require_built(name):
    if name == "cpp" and _C is None:
        raise RuntimeError(f"pyengine backend 'cpp' is not built: importing pyengine._C failed "
                           f"({_C_IMPORT_ERROR}). To get it, {BUILD_HINT}.")
    if name == "cuda" and not _cuda_built():
        why = "pyengine._C is missing" if _C is None else "pyengine._C was built without CUDA kernels"
        raise RuntimeError(f"pyengine backend 'cuda' is not built: {why}. Rebuild on a machine with a CUDA "
                           "toolkit (nvcc) and a CUDA build of torch: "
                           "`PYENGINE_CUDA=1 pip install --no-build-isolation -e .`.")


def _default(device_type):
    if device_type == "cpu":
        return "cpp" if _C is not None else "python"
    if device_type == "cuda":
        return "cuda" if _cuda_built() else "python"
    return "python"


def select(device):
    """The backend name that runs an op whose tensors live on `device`."""
    chosen = _chosen.get()
    name = chosen or _env_backend
    if name is None:
        return _default(device.type)
    if name == "python":
        return name
    source = "pyengine.use_backend" if chosen else f"the environment variable {ENV}"
    try:
        _require_built(name)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc} (backend chosen by {source})") from None
    wanted = "cpu" if name == "cpp" else "cuda"
    if device.type != wanted:
        raise RuntimeError(f"pyengine backend {name!r}, chosen by {source}, runs on {wanted} tensors, but these "
                           f"are on {device}. Move them with .to('{wanted}'), or choose the backend for "
                           f"{device.type} tensors ({_default(device.type)!r}) or 'python'.")
    return name


def kernels(device):
    """The namespace of <op>_forward/<op>_backward kernels that runs on `device`: pyengine._C or REFERENCE.
    While torch.compile traces, the compiled kernels as registered operators (torch.ops.pyengine, see
    pyengine/ops/_library.py), which the graph can hold; a forced backend is not consulted there. Under torch.func
    transforms (vmap, grad, jacrev, ...) and torch.jit.trace the registered operators too: the tensors there may be
    functorch's wrappers (a batch of tensors seen as one), which only the dispatcher knows how to unwrap, and the
    tracer records only what goes through the dispatcher."""
    if _C is not None:
        if _is_compiling():
            return torch.ops.pyengine
        if _functorch_active() or _tracing_state():
            return REFERENCE if select(device) == "python" else torch.ops.pyengine
    return REFERENCE if select(device) == "python" else _C


def backward_kernels(forward_kernels):
    """The kernels a backward (or a jvp) runs: the forward's, or the python reference while autograd records the
    backward (create_graph=True, and every torch.func.grad), since its torch operations can be differentiated again
    (double backward); the registered operators in place of pyengine._C when a torch.func transform is active (a
    vjp taken eagerly and then vmapped runs its backward on batched tensors)."""
    if torch.is_grad_enabled():
        return REFERENCE
    if forward_kernels is _C and _functorch_active():
        return torch.ops.pyengine
    return forward_kernels


def compiled_autograd(tensor):
    """pyengine._C.autograd, the ops as C++ autograd Functions (csrc/autograd.cpp), when the compiled kernels run
    this call eagerly; else None, and the op's Python Function runs: on the python backend, while torch.compile
    traces (it needs the Python Functions to reach torch.ops.pyengine), under torch.func transforms and inside a
    forward-mode AD level (C++ Functions have no jvp; the Python ones have). While torch.jit.trace records, the
    same interface over the differentiable registered operators (pyengine/ops/_library.py TRACED), so the trace
    holds pyengine::<op>_forward calls that run, save and load like torch's own ops. The C++ Functions build the
    same graph node without the ~8 us per call that a Python Function costs forward and again backward; this check
    runs on every op call, hence the shortcut for the usual case (a CPU tensor, no backend or 'cpp' forced)."""
    if _AUTOGRAD is None or _is_compiling() or _functorch_active() or _forward_ad._current_level >= 0:
        return None
    if _tracing_state():
        from .ops._library import TRACED
        return None if select(tensor.device) == "python" else TRACED
    if (_chosen.get() or _env_backend) in (None, "cpp") and tensor.is_cpu:  # not .device: that makes an object
        return _AUTOGRAD
    return None if select(tensor.device) == "python" else _AUTOGRAD


def eager_entries():
    """pyengine._C.eager (csrc/eager.cpp), the C++ first stop of the elementwise ops and add: the set for the
    backend forced (use_backend or PYENGINE_BACKEND: 'cpp' takes CPU tensors alone, 'cuda' CUDA tensors alone,
    'python' none), else the one the tensors' device decides; None while torch.compile traces. Its functions return
    the result of a usual call (floating tensors of one dtype on a device with built kernels, no tracer, torch.func
    transform or dual tensor) and None for anything else, which the Python function then handles in full."""
    if _is_compiling():
        return None
    chosen = _chosen.get()
    return _EAGER if chosen is None else _EAGER_BY_BACKEND.get(chosen)


_AUTOGRAD = None if _C is None else _C.autograd
_EAGER_BY_BACKEND = {} if _C is None else {None: _C.eager, "cpp": _C.eager_cpp, "cuda": _C.eager_cuda}
_EAGER = _EAGER_BY_BACKEND.get(_env_backend)
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_tracing_state = torch._C._get_tracing_state
_forward_ad = torch.autograd.forward_ad
