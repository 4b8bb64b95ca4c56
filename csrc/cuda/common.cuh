// What every CUDA kernel file shares: torch's current stream, launch checking, grid sizing for grid-stride
// loops, and 128-bit packs for vectorized loads and stores.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

#include "common/checks.h"
#include "common/math.h"

namespace pyengine {
namespace cuda {

// Every launch goes on torch's current stream (so CUDA graphs and torch.compile capture it) and is
// followed by PE_CUDA_CHECK_LAUNCH(), which turns a launch error into a Python RuntimeError.
inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
#define PE_CUDA_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

// Blocks for a grid-stride loop over n items at `threads` per block: enough to fill every SM several
// times over, never more than the work needs.
inline int64_t grid_stride_blocks(int64_t n, int threads, int blocks_per_sm = 8) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min<int64_t>((n + threads - 1) / threads, sms * blocks_per_sm));
}

// N elements of T moved as one aligned 16-byte (or smaller) transaction.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack {
  T v[N];
};
template <typename T> constexpr int pack_size() { return 16 / sizeof(T) > 0 ? 16 / sizeof(T) : 1; }

inline bool is_aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// The sizes of up to kMaxDims dims and, for each of N operands, its strides over them (in elements; 0 where the
// operand repeats), passed to a kernel by value. Dim 0 is the innermost (fastest-varying) one. index_t is
// uint32_t when every index and offset fits, which makes the divisions cheap, else int64_t.
constexpr int kMaxDims = 16;
template <int N, typename index_t = int64_t> struct StridedDims {
  int ndim = 0;
  index_t sizes[kMaxDims] = {};
  index_t strides[N][kMaxDims] = {};

  // The offset into every operand of the element with row-major linear index i < numel.
  __device__ __forceinline__ void offsets(index_t i, index_t (&off)[N]) const {
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] = 0;
#pragma unroll
    for (int d = 0; d < kMaxDims; ++d) {  // unrolled up to kMaxDims so the arrays stay in parameter space
      if (d == ndim) break;
      if (d == ndim - 1) {  // the outermost dim needs no division: i < sizes[d] already
#pragma unroll
        for (int k = 0; k < N; ++k) off[k] += i * strides[k][d];
        break;
      }
      const index_t q = i / sizes[d], r = i - q * sizes[d];
#pragma unroll
      for (int k = 0; k < N; ++k) off[k] += r * strides[k][d];
      i = q;
    }
  }
};

}  // namespace cuda
}  // namespace pyengine
