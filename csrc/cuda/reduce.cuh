// Warp and block reductions, the one home for them: sums, maxima, and merges of online-softmax states; and the
// deterministic sums over broadcast dims of broadcast add's backward (sum_broadcast_dims, at the end).
// A block reduction needs blockDim.x to be a multiple of 32 and at most 1024.
#pragma once

#include <ATen/ops/empty.h>

#include "common/math.h"
#include "cuda/common.cuh"

namespace pyengine {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// NaN-propagating max, as torch's amax.
template <typename T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    T o = __shfl_xor_sync(kFullMask, v, offset);
    v = (o != o || o > v) ? o : v;
  }
  return v;
}

template <typename T> __device__ __forceinline__ SoftmaxState<T> warp_softmax_merge(SoftmaxState<T> s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState<T> o;
    o.max = __shfl_xor_sync(kFullMask, s.max, offset);
    o.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
    s = online_softmax_merge(s, o);
  }
  return s;
}

// Reduces v over the block with `warp_op`; every thread gets the result. `scratch` holds 32 values.
template <typename T, typename WarpOp>
__device__ __forceinline__ T block_reduce(T v, T* scratch, WarpOp warp_op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_op(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[lane < warps ? lane : 0];
  return warp_op(v);
}

template <typename T> __device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[threadIdx.x >> 5] = v;
  __syncthreads();
  return warp_sum(lane < warps ? scratch[lane] : T(0));
}

template <typename T> __device__ __forceinline__ T block_max(T v, T* scratch) {
  return block_reduce(v, scratch, [](T x) { return warp_max(x); });
}

template <typename T>
__device__ __forceinline__ SoftmaxState<T> block_softmax_merge(SoftmaxState<T> s, SoftmaxState<T>* scratch) {
  const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  s = warp_softmax_merge(s);
  __syncthreads();
  if (lane == 0) scratch[threadIdx.x >> 5] = s;
  __syncthreads();
  return warp_softmax_merge(lane < warps ? scratch[lane] : SoftmaxState<T>{});
}

// Sums over broadcast dims: out[o] = scale * sum_{r < R} g[kept(o) + summed(r)] for o < K, where kept(o) and
// summed(r) are the offsets into g of the o-th kept and the r-th summed element (row-major over their dims).
// Accumulated in acc_t, no atomics: the reduction is split into `splits` fixed chunks of r that depend on the
// shape alone; with splits > 1 each chunk writes partial[split][o] and sum_partials_kernel adds them in order.
// The result is the same on every run.
constexpr int kSumThreads = 256;
constexpr int kSumColumnRows = kSumThreads / 32;
constexpr int64_t kSumTargetBlocks = 1024;

__device__ __forceinline__ int64_t offset_of(const StridedDims<1>& dims, int64_t i) {
  int64_t off[1];
  dims.offsets(i, off);
  return off[0];
}

// Column sums (the general kernel): block (32, kSumColumnRows), lane x owns output o = blockIdx.x * 32 + x, so
// consecutive lanes read consecutive kept elements (coalesced when the innermost dim is kept, as for a bias over
// rows); the rows y of the block split this chunk of r and are added in a fixed order through shared memory.
template <typename scalar_t, typename acc>
__global__ void sum_columns_kernel(scalar_t* __restrict__ out, acc* __restrict__ partial,
                                   const scalar_t* __restrict__ g, StridedDims<1> kept, StridedDims<1> summed,
                                   int64_t K, int64_t R, int64_t chunk, acc scale) {
  __shared__ acc tile[kSumColumnRows][32];
  const int64_t o = blockIdx.x * int64_t(32) + threadIdx.x;
  const int64_t r0 = blockIdx.y * chunk, r1 = min(R, r0 + chunk);
  acc sum = 0;
  if (o < K) {
    const scalar_t* base = g + offset_of(kept, o);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kSumColumnRows)
      sum += static_cast<acc>(base[offset_of(summed, r)]);
  }
  tile[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y != 0 || o >= K) return;
  sum = 0;
#pragma unroll
  for (int y = 0; y < kSumColumnRows; ++y) sum += tile[y][threadIdx.x];
  if (partial) partial[blockIdx.y * K + o] = sum;
  else out[o] = static_cast<scalar_t>(sum * scale);
}

// Row sums, for an innermost summed dim: kGroup threads per output, a warp (many outputs) or the whole block
// (few long rows); consecutive threads read consecutive summed elements.
template <int kGroup, typename scalar_t, typename acc>
__global__ void sum_rows_kernel(scalar_t* __restrict__ out, acc* __restrict__ partial, const scalar_t* __restrict__ g,
                                StridedDims<1> kept, StridedDims<1> summed, int64_t K, int64_t R, int64_t chunk,
                                acc scale) {
  static_assert(kGroup == 32 || kGroup == kSumThreads, "a warp or the whole block per output");
  const int64_t o = blockIdx.x * int64_t(kSumThreads / kGroup) + threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t r0 = blockIdx.y * chunk, r1 = min(R, r0 + chunk);
  acc sum = 0;
  if (o < K) {
    const scalar_t* base = g + offset_of(kept, o);
    for (int64_t r = r0 + lane; r < r1; r += kGroup) sum += static_cast<acc>(base[offset_of(summed, r)]);
  }
  if constexpr (kGroup == 32) {
    sum = warp_sum(sum);
  } else {
    __shared__ acc scratch[32];
    sum = block_sum(sum, scratch);
  }
  if (lane != 0 || o >= K) return;
  if (partial) partial[blockIdx.y * K + o] = sum;
  else out[o] = static_cast<scalar_t>(sum * scale);
}

// out[o] = scale * sum over the splits of partial[split][o], in split order.
template <typename scalar_t, typename acc>
__global__ void sum_partials_kernel(scalar_t* __restrict__ out, const acc* __restrict__ partial, int64_t K,
                                    int64_t splits, acc scale) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < K; o += int64_t(gridDim.x) * blockDim.x) {
    acc sum = 0;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * K + o];
    out[o] = static_cast<scalar_t>(sum * scale);
  }
}

// Splits R into chunks of at least min_chunk so that about kSumTargetBlocks blocks run in all; returns the chunk.
inline int64_t sum_chunk(int64_t R, int64_t blocks_x, int64_t min_chunk) {
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(65535, (R + min_chunk - 1) / min_chunk));
  const int64_t splits = std::clamp<int64_t>(kSumTargetBlocks / std::max<int64_t>(blocks_x, 1), 1, max_splits);
  return std::max<int64_t>(1, (R + splits - 1) / splits);
}

// out (K contiguous elements, like's options) = scale * the sums described above, K > 0, R > 0.
// The row kernels take an innermost summed dim of at least 32 elements (inner_summed); the column kernel the rest.
template <typename scalar_t>
void sum_broadcast_dims(scalar_t* out, const scalar_t* g, const StridedDims<1>& kept, const StridedDims<1>& summed,
                        int64_t K, int64_t R, bool inner_summed, acc_t<scalar_t> scale, const at::Tensor& like) {
  using acc = acc_t<scalar_t>;
  const cudaStream_t stream = current_stream();
  int64_t blocks_x, chunk;
  dim3 block(kSumThreads);
  void (*kernel)(scalar_t*, acc*, const scalar_t*, StridedDims<1>, StridedDims<1>, int64_t, int64_t, int64_t, acc);
  if (!inner_summed) {
    kernel = sum_columns_kernel<scalar_t, acc>;
    block = dim3(32, kSumColumnRows);
    blocks_x = (K + 31) / 32;
    chunk = sum_chunk(R, blocks_x, 16 * kSumColumnRows);
  } else if (K < 1024 && R >= 2048) {
    kernel = sum_rows_kernel<kSumThreads, scalar_t, acc>;
    blocks_x = K;
    chunk = sum_chunk(R, blocks_x, 16 * kSumThreads);
  } else {
    kernel = sum_rows_kernel<32, scalar_t, acc>;
    blocks_x = (K + kSumThreads / 32 - 1) / (kSumThreads / 32);
    chunk = sum_chunk(R, blocks_x, 16 * 32);
  }
  const int64_t splits = (R + chunk - 1) / chunk;
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, K}, like.options().dtype(c10::CppTypeToScalarType<acc>::value));
  acc* partial_ptr = splits > 1 ? partial.data_ptr<acc>() : nullptr;
  kernel<<<dim3(static_cast<unsigned>(blocks_x), static_cast<unsigned>(splits)), block, 0, stream>>>(
      out, partial_ptr, g, kept, summed, K, R, chunk, scale);
  PE_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    sum_partials_kernel<<<grid_stride_blocks(K, kSumThreads), kSumThreads, 0, stream>>>(out, partial_ptr, K, splits,
                                                                                        scale);
    PE_CUDA_CHECK_LAUNCH();
  }
}

// Merges of a multi-field state S (e.g. an online softmax with extra sums): shfl(s, offset) shuffles every
// field by __shfl_xor_sync, merge(a, b) combines two states, S{} is the empty state. Every lane (thread)
// gets the result. The block version needs `scratch` for 32 states.
template <typename S, typename Shfl, typename Merge>
__device__ __forceinline__ S warp_merge_with(S s, Shfl shfl, Merge merge) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s = merge(s, shfl(s, offset));
  return s;
}

template <typename S, typename Shfl, typename Merge>
__device__ __forceinline__ S block_merge_with(S s, S* scratch, Shfl shfl, Merge merge) {
  const int lane = threadIdx.x & 31, warps = (blockDim.x + 31) >> 5;
  s = warp_merge_with(s, shfl, merge);
  __syncthreads();
  if (lane == 0) scratch[threadIdx.x >> 5] = s;
  __syncthreads();
  return warp_merge_with(lane < warps ? scratch[lane] : S{}, shfl, merge);
}

}  // namespace cuda
}  // namespace pyengine
