// A caching allocator for the CPU kernels' large outputs, as torch's CUDA caching allocator is for GPU memory.
// A fresh 64 MB output from glibc is a new mmap, returned with munmap on free: every call page-faults it in
// again and the Linux kernel zeroes each page first, which costs as much as the kernel's own writes (see
// benchmarks/NOTES.md, "A caching allocator for large CPU outputs"); outputs of a few hundred KB fault too, once
// long-lived tensors leave them at the top of glibc's heap. Here every output of 64 KiB or more takes a block
// that is kept after its tensor is freed, for the next output of about the same size: blocks of 1 MiB or more
// 2 MiB aligned and advised into transparent huge pages, smaller ones in 64 KiB steps. Outputs are ordinary
// resizable CPU tensors: the storage's allocator is the cache.
//
// PYENGINE_CPU_CACHE_BYTES (read at first use; a byte count, or with a K, M or G suffix in powers of 1024)
// caps the bytes kept in freed blocks, default 1 GiB; 0 turns the cache off: empty_output is then at::empty with
// the huge-page hint, as before the cache existed.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

// In namespace pyengine_shared, not pyengine: the kernels are compiled once per CPU capability with the name
// pyengine renamed (setup.py, csrc/cpu_capability.cpp), and every build of them shares this one cache, compiled
// once (allocator.cpp is not a kernel file). The using-declarations below make it pyengine::cpu's in every build.
namespace pyengine_shared {
namespace cpu {

// An uninitialized contiguous tensor for an output the kernel writes in full: it may hold a freed tensor's data.
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

struct OutputCacheInfo {
  int64_t cached_bytes, cached_blocks;  // freed blocks kept for reuse
  int64_t in_use_bytes, in_use_blocks;  // blocks held by live tensors (whole blocks: 64 KiB or 2 MiB steps)
  int64_t hits, misses;                 // requests served from a kept block, and from fresh memory
  int64_t limit_bytes;                  // the cap on cached_bytes
};

OutputCacheInfo output_cache_info();

// Frees every kept block; blocks held by live tensors are untouched.
void empty_output_cache();

// Sets the cap on the bytes kept (0: no caching) and frees the oldest kept blocks beyond it.
void set_output_cache_limit(int64_t bytes);

}  // namespace cpu
}  // namespace pyengine_shared

namespace pyengine {
namespace cpu {
using pyengine_shared::cpu::empty_output;
using pyengine_shared::cpu::empty_output_cache;
using pyengine_shared::cpu::output_cache_info;
using pyengine_shared::cpu::OutputCacheInfo;
using pyengine_shared::cpu::set_output_cache_limit;
}  // namespace cpu
}  // namespace pyengine
