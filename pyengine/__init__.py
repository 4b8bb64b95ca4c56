"""pyengine: hand-written C++/CUDA kernels for the forward and backward passes of PyTorch's basic layers.

    import pyengine
    pyengine.available_backends()          # e.g. ['cpp', 'python']
    with pyengine.use_backend("python"):   # the readable reference implementation
        ...
    pyengine.empty_cache()                 # frees the large CPU outputs kept for reuse (cpu_cache_info())
"""
from ._backend import available_backends, built_backends, current_backend, use_backend
from ._cpu_cache import cpu_cache_info, empty_cache, set_cpu_cache_limit
from . import autograd, functional, nn  # noqa: E402  (after the backend module, which they import)

__version__ = "0.1.0"

__all__ = ["autograd", "available_backends", "built_backends", "cpu_cache_info", "current_backend", "empty_cache",
           "functional", "nn", "set_cpu_cache_limit", "use_backend"]
