// Row-level online softmax on the GPU, shared by cross_entropy.cu and linear_cross_entropy.cu: a thread's part
// of a row (RowState: the online softmax of common/math.h and, for weighted kinds, b = sum v (x - shift) and
// vsum = sum v), added to class by class and merged across threads (row_merge, row_shfl for the warp and
// block merges of reduce.cuh).
#pragma once

#include <limits>

#include "common/math.h"
#include "cuda/reduce.cuh"

namespace pyengine {
namespace cuda {

// The value the running sums are kept relative to: the running max, or 0 while the max is -inf (so that
// -inf - -inf never makes a NaN).
template <typename T> __device__ __forceinline__ T row_shift(T m) {
  return m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// A thread's (or a merged group's) part of a row: the online softmax and, for the weighted kinds (label
// smoothing: v = w_c; probabilities: v = w_c y'_c), b = sum v (x - shift) and vsum = sum v. b is kept
// relative to the running max, not 0, so the loss adds terms of one sign and never cancels large logits.
template <typename T> struct RowState {
  SoftmaxState<T> sm;
  T b = T(0);
  T vsum = T(0);
};

template <typename T> __device__ __forceinline__ void row_add(RowState<T>& st, T x, T v) {
  const T old_shift = row_shift(st.sm.max);
  online_softmax_add(st.sm, x);
  const T shift = row_shift(st.sm.max);
  if (old_shift != shift) st.b += st.vsum * (old_shift - shift);
  st.b += v * (x - shift);
  st.vsum += v;
}

template <typename T> __device__ __forceinline__ RowState<T> row_merge(RowState<T> a, RowState<T> o) {
  RowState<T> r;
  r.sm = online_softmax_merge(a.sm, o.sm);
  const T shift = row_shift(r.sm.max), sa = row_shift(a.sm.max), so = row_shift(o.sm.max);
  r.b = a.b + o.b;
  if (sa != shift) r.b += a.vsum * (sa - shift);
  if (so != shift) r.b += o.vsum * (so - shift);
  r.vsum = a.vsum + o.vsum;
  return r;
}

template <typename T> __device__ __forceinline__ RowState<T> row_shfl(RowState<T> s, int offset) {
  RowState<T> o;
  o.sm.max = __shfl_xor_sync(kFullMask, s.sm.max, offset);
  o.sm.sum = __shfl_xor_sync(kFullMask, s.sm.sum, offset);
  o.b = __shfl_xor_sync(kFullMask, s.b, offset);
  o.vsum = __shfl_xor_sync(kFullMask, s.vsum, offset);
  return o;
}

}  // namespace cuda
}  // namespace pyengine
