"""The cache of CPU outputs behind the cpp backend (csrc/cpu/allocator.h).

A fresh output of tens of MB is new memory from the system: every page faults on first write and the kernel
zeroes it, which costs about as much as an elementwise kernel's own work; once a process holds long-lived
tensors, outputs of a few hundred KB fault too. So the C++ kernels take their outputs of 64 KiB or more from
blocks kept after earlier outputs were freed, as torch's CUDA caching allocator does for GPU memory. The outputs
are ordinary CPU tensors. PYENGINE_CPU_CACHE_BYTES (read once, at the first kernel output or call below; a byte
count or e.g. 512M, 2G) caps the bytes kept in freed blocks: 1 GiB by default, 0 for no caching.
"""
from . import _backend

_INFO_KEYS = ("cached_bytes", "cached_blocks", "in_use_bytes", "in_use_blocks", "hits", "misses", "limit_bytes")


def empty_cache():
    """Frees every block the CPU output cache keeps, returning that memory to the system (blocks held by live
    tensors stay). The CPU counterpart of torch.cuda.empty_cache; nothing to do without the compiled extension."""
    if _backend._C is not None:
        _backend._C.empty_cpu_cache()


def cpu_cache_info():
    """The CPU output cache's counters, a dict:

    cached_bytes, cached_blocks   freed blocks kept for reuse
    in_use_bytes, in_use_blocks   blocks held by live tensors (whole blocks: sizes rounded up to 64 KiB steps
                                  below 1 MiB, to 2 MiB steps from 1 MiB up)
    hits, misses                  outputs served from a kept block, and from fresh memory, since the start
    limit_bytes                   the cap on cached_bytes (PYENGINE_CPU_CACHE_BYTES or set_cpu_cache_limit)

    All zero without the compiled extension, which alone uses the cache."""
    if _backend._C is None:
        return dict.fromkeys(_INFO_KEYS, 0)
    return _backend._C.cpu_cache_info()


def set_cpu_cache_limit(nbytes):
    """Caps the bytes the CPU output cache keeps in freed blocks at `nbytes`, at once freeing the least
    recently freed blocks beyond it; 0 turns the cache off (outputs then come from torch's allocator).
    Overrides PYENGINE_CPU_CACHE_BYTES."""
    if _backend._C is not None:
        _backend._C.set_cpu_cache_limit(int(nbytes))
