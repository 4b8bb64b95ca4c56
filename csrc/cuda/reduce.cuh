// Warp and block reductions, the one home for them: sums, maxima, and merges of online-softmax states.
// A block reduction needs blockDim.x to be a multiple of 32 and at most 1024.
#pragma once

#include "common/math.h"

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
