// Row-wise online softmax on the CPU in at::vec lanes, shared by cross_entropy.cpp and linear_cross_entropy.cpp:
// vectors of the accumulation type loaded from any float dtype (Pack), the lane-parallel online softmax
// (LaneSoftmax, lane_softmax_add) merged into one row's statistics (merge_lanes), and streaming stores.
#pragma once

#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <type_traits>

#include "cpu/vec_math.h"

namespace pyengine {

using at::vec::Vectorized;


template <typename T> constexpr T kInf = std::numeric_limits<T>::infinity();

template <typename scalar_t>
constexpr bool is_reduced_float_v = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// Stores a vector to vector-aligned p bypassing the caches: a large dx is written once and read much later,
// and a plain store would first read every line of it from memory.
template <typename V> void stream_store(void* p, const V& v) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(sizeof(V) == 64, "an AVX512 vector");
  __m512i bits;
  std::memcpy(&bits, &v, sizeof(bits));
  _mm512_stream_si512(static_cast<__m512i*>(p), bits);
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(sizeof(V) == 32, "an AVX2 vector");
  __m256i bits;
  std::memcpy(&bits, &v, sizeof(bits));
  _mm256_stream_si256(static_cast<__m256i*>(p), bits);
#else
  v.store(p);
#endif
}

// Orders the streaming stores before whatever follows (the target's fix-up, the caller reading dx).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// One Vectorized<scalar_t> of elements as kVecs vectors of the accumulation type (float16/bfloat16 widen to
// two float vectors). With n < kSize only the first n elements are read (the rest are 0) or written.
template <typename scalar_t> struct Pack {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();
  static constexpr int kVecs = static_cast<int>(kSize / AVec::size());
  AVec v[kVecs];

  static Pack load(const scalar_t* p, int64_t n = kSize) {
    Pack r;
    if constexpr (is_reduced_float_v<scalar_t>) {
      auto raw = n == kSize ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      std::tie(r.v[0], r.v[1]) = at::vec::convert_to_float<scalar_t>(raw);
    } else {
      r.v[0] = n == kSize ? AVec::loadu(p) : AVec::loadu(p, n);
    }
    return r;
  }
  static Pack fill(acc value) {
    Pack r;
    for (int j = 0; j < kVecs; ++j) r.v[j] = AVec(value);
    return r;
  }
  void store_stream(scalar_t* p) const {
    if constexpr (is_reduced_float_v<scalar_t>) stream_store(p, at::vec::convert_from_float<scalar_t>(v[0], v[1]));
    else stream_store(p, v[0]);
  }
  void store(scalar_t* p, int64_t n = kSize) const {
    if constexpr (is_reduced_float_v<scalar_t>) {
      auto raw = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      if (n == kSize) raw.store(p); else raw.store(p, n);
    } else {
      if (n == kSize) v[0].store(p); else v[0].store(p, n);
    }
  }
};

// All-ones in the lanes at index >= n: past the end of the row.
template <typename acc> Vectorized<acc> lanes_from(int64_t n) {
  return Vectorized<acc>::arange(acc(0), acc(1)) >= Vectorized<acc>(static_cast<acc>(n));
}

// exp of the softmax's arguments, which are x - max or x - lse: at most ~0, -inf or NaN. The loop is bound by it,
// so it takes the faster exp (vec_math.h pe_exp_fast: the 1-ulp pe_exp on AVX-512, exp_u20 elsewhere).
template <typename acc> Vectorized<acc> softmax_exp(const Vectorized<acc>& v) { return pe_exp_fast(v); }

// Sum and NaN-propagating max of a vector's lanes by halving shuffles (a fixed order: the same result every
// run): a short row pays these once each, and a lane-by-lane loop of 16 dependent steps was most of its cost.
template <typename acc> acc hsum(const Vectorized<acc>& v) {
  return at::vec::vec_reduce_all<acc>([](const Vectorized<acc>& a, const Vectorized<acc>& b) { return a + b; }, v);
}
template <typename acc> acc hmax(const Vectorized<acc>& v) {
  return at::vec::vec_reduce_all<acc>(
      [](const Vectorized<acc>& a, const Vectorized<acc>& b) { return at::vec::maximum(a, b); }, v);
}

// The online softmax of common/math.h in vector lanes. Each lane keeps its running max m and, relative to
// shift = m (0 while m is -inf, so -inf - -inf never makes a NaN), s = sum exp(x - shift); when weighted
// (label smoothing, probability targets: v = w_c or w_c y'_c) also b = sum v (x - shift) and vsum = sum v.
// b is taken from the max, not from 0, so the loss adds terms of one sign and never cancels large logits.
template <typename acc> struct LaneSoftmax {
  using AVec = Vectorized<acc>;
  AVec m = AVec(-kInf<acc>), s = AVec(acc(0)), b = AVec(acc(0)), vsum = AVec(acc(0));
};

template <typename acc> Vectorized<acc> lane_shift(const Vectorized<acc>& m) {
  return Vectorized<acc>::blendv(m, Vectorized<acc>(acc(0)), m == Vectorized<acc>(-kInf<acc>));
}
template <typename acc> acc row_shift(acc m) { return m == -kInf<acc> ? acc(0) : m; }

// shift(old) - shift(new), 0 in lanes that saw only -inf: their s is 0 and b is 0, -inf or NaN, and stays
// as it is (online_softmax_merge's rule). A +inf max gives inf - inf = NaN, as torch's log_softmax does.
template <typename acc> Vectorized<acc> lane_rescale(const Vectorized<acc>& m_old, const Vectorized<acc>& shift_new) {
  using AVec = Vectorized<acc>;
  return AVec::blendv(lane_shift(m_old) - shift_new, AVec(acc(0)), m_old == AVec(-kInf<acc>));
}

// online_softmax_add of K vectors at once: one rescale per chunk, skipped when no lane's max grew.
// pad (or nullptr) marks lanes past the row's end, whose x is -inf and v is 0: their b term is dropped.
template <bool kWeighted, int K, typename acc>
inline void lane_softmax_add(LaneSoftmax<acc>& st, const Vectorized<acc>* x, const Vectorized<acc>* v,
                             const typename LaneSoftmax<acc>::AVec* pad) {
  using AVec = Vectorized<acc>;
  AVec cmax = x[0];
  for (int k = 1; k < K; ++k) cmax = at::vec::maximum(cmax, x[k]);
  const AVec m_new = at::vec::maximum(st.m, cmax);
  const AVec shift = lane_shift(m_new);
  if ((m_new == st.m).zero_mask() != 0) {
    const AVec r = lane_rescale(st.m, shift);
    st.s = st.s * softmax_exp(r);
    if constexpr (kWeighted) st.b = at::vec::fmadd(st.vsum, r, st.b);
  }
  AVec e = softmax_exp(x[0] - shift);
  for (int k = 1; k < K; ++k) e = e + softmax_exp(x[k] - shift);
  st.s = st.s + e;
  if constexpr (kWeighted) {
    for (int k = 0; k < K; ++k) {
      AVec term = v[k] * (x[k] - shift);
      if (pad) term = AVec::blendv(term, AVec(acc(0)), pad[k]);
      st.b = st.b + term;
      st.vsum = st.vsum + v[k];
    }
  }
  st.m = m_new;
}

// The softmax statistics of a row per lane over n classes, class c's vector of lanes from load(c) (read twice):
// shift = the lanes' max (0 where it is -inf, as lane_shift) and log_sum = log sum_c exp(x_c - shift), so that
// lse = shift + log_sum; NaN propagates. For short rows put in lanes (cross_entropy_rows.h forward_lanes,
// fused_mlp_step.h).
template <typename acc, typename Load>
std::pair<Vectorized<acc>, Vectorized<acc>> lanes_softmax(int64_t n, const Load& load) {
  Vectorized<acc> m(-kInf<acc>);
  for (int64_t c = 0; c < n; ++c) m = at::vec::maximum(m, load(c));
  const Vectorized<acc> shift = lane_shift(m);
  Vectorized<acc> s(acc(0));
  for (int64_t c = 0; c < n; ++c) s = s + softmax_exp(load(c) - shift);
  return {shift, pe_log(s)};
}

// One row's softmax statistics: lse = shift + log_sum; b and vsum as in LaneSoftmax.
template <typename acc> struct RowSoftmax {
  acc shift, log_sum, b, vsum;
};

// online_softmax_merge over the lanes of st.
template <bool kWeighted, typename acc> RowSoftmax<acc> merge_lanes(const LaneSoftmax<acc>& st) {
  using AVec = Vectorized<acc>;
  const acc shift = row_shift(hmax(st.m));
  const AVec r = lane_rescale(st.m, AVec(shift));
  RowSoftmax<acc> out{shift, pe_log(hsum(st.s * softmax_exp(r))), acc(0), acc(0)};
  if constexpr (kWeighted) {
    out.b = hsum(at::vec::fmadd(st.vsum, r, st.b));
    out.vsum = hsum(st.vsum);
  }
  return out;
}

}  // namespace pyengine
