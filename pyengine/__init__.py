"""pyengine: hand-written C++/CUDA kernels for the forward and backward passes of PyTorch's basic layers.

    pyengine.functional   torch's functional ops (relu, linear, cross_entropy, ...) on pyengine's kernels
    pyengine.nn           torch.nn modules whose forward runs them, FusedMLP, and convert(model)
    pyengine.autograd     the torch.autograd.Function behind each op

Backends: 'cpp' (the C++ kernels, CPU tensors), 'cuda' (the CUDA kernels, CUDA tensors) and 'python' (the
readable reference in pyengine/ops/*.py, any device). The first match wins: the innermost
``with pyengine.use_backend(name):`` (or a plain use_backend(name) call, from then on in this thread), then the
environment variable PYENGINE_BACKEND, then the tensors' device (cpp for CPU, cuda for CUDA, python where that
backend is not built). The backend that ran a forward also runs its backward. available_backends() lists what
runs here, built_backends() what was compiled, current_backend() the forced choice (None: by device).

Environment variables read at run time:
    PYENGINE_BACKEND           'cpp', 'cuda' or 'python': the backend when no use_backend is active (read once,
                               at import; another value raises ValueError there)
    PYENGINE_CPU_CACHE_BYTES   the cap on the freed CPU output blocks the cpp backend keeps for reuse: a byte
                               count or e.g. 512M, 2G; 0 turns the cache off (read once, at the first kernel
                               output; default 1 GiB; set_cpu_cache_limit overrides it)
    PYENGINE_LINEAR_CROSS_ENTROPY_CHUNK_BYTES
                               linear_cross_entropy's budget for the logits of one chunk of rows when its
                               chunk_bytes is not given (read at each call; default 16 MiB)
    PYENGINE_HALF_GEMM         'on' or 'off': linear_cross_entropy's and fused_mlp's float16/bfloat16 matrix
                               products in the input's dtype, or widened to float32 (fused_mlp on the CPU: its
                               float32 loop), and linear's CPU products (oneDNN's fused linear in the dtype,
                               or widened to float32), whatever the device's fast path (read at each call;
                               default 'auto': in the dtype on CUDA, and on a CPU with avx512_bf16/AMX for
                               bfloat16 or avx512_fp16/AMX-FP16 for float16)
    PYENGINE_EXPECT_BACKENDS   comma-separated backends that `python -m pyengine info --check` requires built
    PYENGINE_CPU_CAPABILITY    'default', 'avx2' or 'avx512': run a lower build of the CPU kernels than the best
                               this CPU runs (read once, at the first kernel call; ATEN_CPU_CAPABILITY lowers it
                               too); `python -m pyengine info` says which build runs
Build time (setup.py): PYENGINE_CUDA, PYENGINE_CPU_ARCH, PYENGINE_WERROR; see README.md.

The CPU output cache: cpu_cache_info() reports it, empty_cache() frees its kept blocks (as torch.cuda.empty_cache
does on the GPU), set_cpu_cache_limit(nbytes) caps it.

Example:
    >>> import torch, pyengine
    >>> "python" in pyengine.available_backends()
    True
    >>> with pyengine.use_backend("python"):  # the readable reference implementation, inside the block only
    ...     y = pyengine.functional.relu(torch.tensor([-1.0, 2.0]))
    >>> y
    tensor([0., 2.])
    >>> pyengine.empty_cache()
"""
from ._backend import available_backends, built_backends, current_backend, use_backend
from ._cpu_cache import cpu_cache_info, empty_cache, set_cpu_cache_limit
from . import autograd, functional, nn  # noqa: E402  (after the backend module, which they import)

__version__ = "0.1.0"

__all__ = ["autograd", "available_backends", "built_backends", "cpu_cache_info", "current_backend", "empty_cache",
           "functional", "nn", "set_cpu_cache_limit", "use_backend"]

_MODULE_ATTRIBUTES = ("__all__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__path__",
                      "__spec__", "__version__")


def __dir__():
    """dir(pyengine): the public names (__all__, __version__) and the standard module attributes, not the
    private modules."""
    return sorted([*__all__, *(n for n in _MODULE_ATTRIBUTES if n in globals())])
