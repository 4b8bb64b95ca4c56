// Softmax cross-entropy on the CPU. logits x: (N, C, D) contiguous, class stride D; target t: (N, D) int64
// class indices, or y: (N, C, D) class probabilities; weight w: (C). For each row r = (n, d), over classes c:
//   lse  = log(sum_c exp(x_c))                                             saved for the backward, (N, D)
//   loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)       class index t (0 where ignored)
//   loss = sum_c w_c y'_c (lse - x_c),  y' = (1 - eps) y + eps / C          class probabilities
//   dx_c = g ((1 - eps) w_t + eps / C sum w) p_c - g [c == t] (1 - eps) w_t - g eps / C w_c,  p = exp(x - lse)
//   dx_c = g (p_c sum_k w_k y'_k - w_c y'_c)
// g: the incoming gradient, over denom (the kept rows' sum of w_t, or N * D for probabilities) for 'mean'.
// The formulas are in common/math.h. The forward reads each logit once (an online softmax) and keeps only
// lse; the backward reads each once and writes dx: the (N, C) softmax is never stored. D == 1: a row is
// contiguous, vector lanes split its classes and are merged at the end. D > 1: the lanes are positions d,
// a tile of them walked class by class, so every load is contiguous over d.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "common/checks.h"
#include "ops.h"

namespace pyengine {
namespace {

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

// exp of the softmax's arguments, which are x - max or x - lse: at most ~0, -inf or NaN. exp_u20 (within
// 20 ulp, 1e-6 relative; Sleef's exp for double) is several times faster than the 1-ulp exp and the loop is
// bound by it; it would clamp a NaN to a finite value, so NaN lanes pass through.
template <typename acc> Vectorized<acc> softmax_exp(const Vectorized<acc>& v) {
  return Vectorized<acc>::blendv(v.exp_u20(), v, v.isnan());
}

template <typename acc> acc hsum(const Vectorized<acc>& v) {
  acc a[Vectorized<acc>::size()];
  v.store(a);
  acc s = 0;
  for (int64_t i = 0; i < Vectorized<acc>::size(); ++i) s += a[i];
  return s;
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

// One row's softmax statistics: lse = shift + log_sum; b and vsum as in LaneSoftmax.
template <typename acc> struct RowSoftmax {
  acc shift, log_sum, b, vsum;
};

// online_softmax_merge over the lanes of st.
template <bool kWeighted, typename acc> RowSoftmax<acc> merge_lanes(const LaneSoftmax<acc>& st) {
  using AVec = Vectorized<acc>;
  acc m[AVec::size()];
  st.m.store(m);
  acc row_max = m[0];
  for (int64_t i = 1; i < AVec::size(); ++i) row_max = pe_max_nan(m[i], row_max);
  const acc shift = row_shift(row_max);
  const AVec r = lane_rescale(st.m, AVec(shift));
  RowSoftmax<acc> out{shift, pe_log(hsum(st.s * softmax_exp(r))), acc(0), acc(0)};
  if constexpr (kWeighted) {
    out.b = hsum(at::vec::fmadd(st.vsum, r, st.b));
    out.vsum = hsum(st.vsum);
  }
  return out;
}

enum class Target { Index, IndexSmooth, Prob };

template <typename scalar_t, Target kTarget> struct CrossEntropyCpu {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  using P = Pack<scalar_t>;
  static constexpr bool kWeighted = kTarget != Target::Index;
  static constexpr int kChunk = 4;                                      // packs (D == 1) or classes (D > 1) per step
  static constexpr int64_t kTile = P::kSize > 64 ? P::kSize : 64;      // positions per D > 1 tile
  static constexpr int kUnits = static_cast<int>(kTile / P::kSize);
  static constexpr int kLanes = kUnits * P::kVecs;                     // vectors of lanes per tile

  const scalar_t* x;
  const int64_t* t;   // class targets, or nullptr
  const scalar_t* y;  // probability targets, or nullptr
  const scalar_t* w;  // class weights, or nullptr
  int64_t C, D, ignore_index;
  acc eps, w_sum;

  acc weight(int64_t c) const { return w ? static_cast<acc>(w[c]) : acc(1); }

  // The class target of row r, -1 when ignored; out-of-range targets raise IndexError, as torch does.
  int64_t target_of(int64_t r) const {
    const int64_t tt = t[r];
    if (tt == ignore_index) return -1;
    TORCH_CHECK_INDEX(tt >= 0 && tt < C, "Target ", tt, " is out of bounds.");
    return tt;
  }

  // The row's loss from its softmax statistics; x_col points at class 0 of the row (classes stride apart).
  acc row_loss(const RowSoftmax<acc>& rs, int64_t r, const scalar_t* x_col, int64_t stride, acc& w_t) const {
    if constexpr (kTarget == Target::Prob) {
      w_t = acc(1);
      return C == 0 ? acc(0) : cross_entropy_prob_loss(rs.vsum, rs.log_sum, rs.b);
    } else {
      const int64_t tt = target_of(r);
      if (tt < 0) return w_t = acc(0);
      w_t = weight(tt);
      const auto k = cross_entropy_index_coefs(w_t, w_sum, eps, static_cast<acc>(C));
      const acc x_t = static_cast<acc>(x_col[tt * stride]) - rs.shift;
      return cross_entropy_index_loss(k, rs.log_sum, x_t, w_sum, kWeighted ? rs.b : acc(0));
    }
  }

  // v of the D == 1 row's classes [c, c + n): w_c (smoothing) or w_c y'_c, 0 past the end.
  P row_weights(const scalar_t* yr, int64_t c, int64_t n) const {
    P v = w ? P::load(w + c, n) : P::fill(acc(1));
    if constexpr (kTarget == Target::Prob) {
      const P yp = P::load(yr + c, n);
      for (int j = 0; j < P::kVecs; ++j)
        v.v[j] = v.v[j] * smoothed_probability(yp.v[j], AVec(eps), AVec(static_cast<acc>(C)));
    }
    if (n < P::kSize)
      for (int j = 0; j < P::kVecs; ++j)
        v.v[j] = AVec::blendv(v.v[j], AVec(acc(0)), lanes_from<acc>(n - j * AVec::size()));
    return v;
  }

  // v of class c at the D > 1 tile's positions [off, off + n).
  P tile_weights(const scalar_t* yb, int64_t c, int64_t off, int64_t n) const {
    P v = P::fill(weight(c));
    if constexpr (kTarget == Target::Prob) {
      const P yp = P::load(yb + c * D + off, n);
      for (int j = 0; j < P::kVecs; ++j)
        v.v[j] = v.v[j] * smoothed_probability(yp.v[j], AVec(eps), AVec(static_cast<acc>(C)));
    }
    return v;
  }

  template <int K>
  void row_add(LaneSoftmax<acc>& st, const scalar_t* xr, const scalar_t* yr, int64_t c, int64_t n) const {
    constexpr int V = K * P::kVecs;
    AVec xv[V], vv[V], pad[V];
    for (int k = 0; k < K; ++k) {
      const P xp = P::load(xr + c + k * P::kSize, n);
      P vp;
      if constexpr (kWeighted) vp = row_weights(yr, c + k * P::kSize, n);
      for (int j = 0; j < P::kVecs; ++j) {
        xv[k * P::kVecs + j] = xp.v[j];
        if constexpr (kWeighted) vv[k * P::kVecs + j] = vp.v[j];
      }
    }
    const bool tail = n < P::kSize;
    if (tail) {
      for (int j = 0; j < V; ++j) {
        pad[j] = lanes_from<acc>(n - j * AVec::size());
        xv[j] = AVec::blendv(xv[j], AVec(-kInf<acc>), pad[j]);
      }
    }
    lane_softmax_add<kWeighted, V>(st, xv, vv, tail ? pad : nullptr);
  }

  // D == 1, row n: lse, and the loss and w_t of the row.
  void forward_row(int64_t n, acc* lse, acc& loss, acc& w_t) const {
    const scalar_t* xr = x + n * C;
    const scalar_t* yr = y ? y + n * C : nullptr;
    LaneSoftmax<acc> st;
    int64_t c = 0;
    for (; c + kChunk * P::kSize <= C; c += kChunk * P::kSize) row_add<kChunk>(st, xr, yr, c, P::kSize);
    for (; c + P::kSize <= C; c += P::kSize) row_add<1>(st, xr, yr, c, P::kSize);
    if (c < C) row_add<1>(st, xr, yr, c, C - c);
    const RowSoftmax<acc> rs = merge_lanes<kWeighted>(st);
    lse[n] = rs.shift + rs.log_sum;
    loss = row_loss(rs, n, xr, 1, w_t);
  }

  template <int K>
  void tile_add(LaneSoftmax<acc>* st, const scalar_t* xb, const scalar_t* yb, int64_t c, int64_t nd) const {
    for (int u = 0; u * P::kSize < nd; ++u) {
      const int64_t off = u * P::kSize, n = std::min(P::kSize, nd - off);
      P xp[K], vp[K];
      for (int k = 0; k < K; ++k) {
        xp[k] = P::load(xb + (c + k) * D + off, n);
        if constexpr (kWeighted) vp[k] = tile_weights(yb, c + k, off, n);
      }
      for (int j = 0; j < P::kVecs; ++j) {
        AVec xv[K], vv[K];
        for (int k = 0; k < K; ++k) {
          xv[k] = xp[k].v[j];
          vv[k] = vp[k].v[j];
        }
        lane_softmax_add<kWeighted, K>(st[u * P::kVecs + j], xv, vv, nullptr);
      }
    }
  }

  // D > 1: positions [d0, d0 + nd) of batch n; loss and w_t per position (tile-local).
  void forward_tile(int64_t n, int64_t d0, int64_t nd, acc* lse, acc* loss, acc* w_t) const {
    const scalar_t* xb = x + n * C * D + d0;
    const scalar_t* yb = y ? y + n * C * D + d0 : nullptr;
    LaneSoftmax<acc> st[kLanes];
    int64_t c = 0;
    for (; c + kChunk <= C; c += kChunk) tile_add<kChunk>(st, xb, yb, c, nd);
    for (; c < C; ++c) tile_add<1>(st, xb, yb, c, nd);
    acc m[kTile], s[kTile], b[kTile], vsum[kTile];
    for (int i = 0; i < kLanes; ++i) {
      st[i].m.store(m + i * AVec::size());
      st[i].s.store(s + i * AVec::size());
      st[i].b.store(b + i * AVec::size());
      st[i].vsum.store(vsum + i * AVec::size());
    }
    for (int64_t i = 0; i < nd; ++i) {
      const RowSoftmax<acc> rs{row_shift(m[i]), pe_log(s[i]), b[i], vsum[i]};
      const int64_t r = n * D + d0 + i;
      lse[r] = rs.shift + rs.log_sum;
      loss[i] = row_loss(rs, r, xb + i, D, w_t[i]);
    }
  }

  // Per-row backward coefficients, already times g: dx_c = p_c row - [c == t] target - smooth w_c
  // (class index; all 0 for an ignored row, leaving p * 0: 0, or NaN where torch's is NaN), or
  // dx_c = g (p_c wy_sum - w_c y'_c) (probabilities: row = wy_sum, target = g).
  CrossEntropyIndexCoefs<acc> row_coefs(int64_t r, acc g, int64_t& tt) const {
    tt = target_of(r);
    if (tt < 0) return {acc(0), acc(0), acc(0)};
    const auto k = cross_entropy_index_coefs(weight(tt), w_sum, eps, static_cast<acc>(C));
    return {k.target * g, k.row * g, k.smooth * g};
  }

  // D == 1, row n: dx (C) from lse and g; with stream, dx bypasses the caches (see stream_store).
  void backward_row(int64_t n, acc g, acc lse, scalar_t* dx, bool stream) const {
    const scalar_t* xr = x + n * C;
    const scalar_t* yr = y ? y + n * C : nullptr;
    int64_t tt = -1;
    CrossEntropyIndexCoefs<acc> k{};
    acc wy_sum = 0;
    if constexpr (kTarget == Target::Prob) {
      AVec sum(acc(0));
      for (int64_t c = 0; c < C; c += P::kSize) {
        const P v = row_weights(yr, c, std::min(P::kSize, C - c));
        for (int j = 0; j < P::kVecs; ++j) sum = sum + v.v[j];
      }
      wy_sum = hsum(sum);
    } else {
      k = row_coefs(n, g, tt);
    }
    const CrossEntropyIndexCoefs<AVec> kv{AVec(k.target), AVec(k.row), AVec(k.smooth)};
    // Streaming needs aligned full vectors: a first partial vector reaches the alignment.
    constexpr uintptr_t kAlign = sizeof(Vectorized<scalar_t>);
    const int64_t head = stream ? static_cast<int64_t>((kAlign - reinterpret_cast<uintptr_t>(dx) % kAlign) % kAlign /
                                                       sizeof(scalar_t)) : 0;
    for (int64_t c = 0, nc = 0; c < C; c += nc) {
      nc = std::min(c == 0 && head > 0 ? head : P::kSize, C - c);
      const P xp = P::load(xr + c, nc);
      P out;
      if constexpr (kTarget == Target::Index) {
        for (int j = 0; j < P::kVecs; ++j) out.v[j] = softmax_exp(xp.v[j] - AVec(lse)) * kv.row;
      } else if constexpr (kTarget == Target::IndexSmooth) {
        const P wp = w ? P::load(w + c, nc) : P::fill(acc(1));
        for (int j = 0; j < P::kVecs; ++j)
          out.v[j] = cross_entropy_index_grad(kv, softmax_exp(xp.v[j] - AVec(lse)), false, wp.v[j]);
      } else {
        const P wp = w ? P::load(w + c, nc) : P::fill(acc(1));
        const P yp = P::load(yr + c, nc);
        for (int j = 0; j < P::kVecs; ++j) {
          const AVec ys = smoothed_probability(yp.v[j], AVec(eps), AVec(static_cast<acc>(C)));
          out.v[j] = cross_entropy_prob_grad(softmax_exp(xp.v[j] - AVec(lse)), AVec(wy_sum), wp.v[j], ys) * AVec(g);
        }
      }
      if (stream && nc == P::kSize) out.store_stream(dx + c); else out.store(dx + c, nc);
    }
    if (stream) stream_fence();
    if (tt >= 0) {
      const acc p_t = pe_exp(static_cast<acc>(xr[tt]) - lse);
      dx[tt] = static_cast<scalar_t>(cross_entropy_index_grad(k, p_t, true, weight(tt)));
    }
  }

  // D > 1: dx at positions [d0, d0 + nd) of batch n; g(r) gives row r's incoming gradient.
  template <typename G>
  void backward_tile(int64_t n, int64_t d0, int64_t nd, const G& g, const acc* lse_all, scalar_t* dx) const {
    const scalar_t* xb = x + n * C * D + d0;
    const scalar_t* yb = y ? y + n * C * D + d0 : nullptr;
    scalar_t* dxb = dx + n * C * D + d0;
    acc lse[kTile], row[kTile], smooth[kTile];
    int64_t tt[kTile];
    CrossEntropyIndexCoefs<acc> k[kTile];
    for (int64_t i = 0; i < kTile; ++i) {
      lse[i] = row[i] = smooth[i] = acc(0);
      tt[i] = -1;
      if (i >= nd) continue;
      const int64_t r = n * D + d0 + i;
      lse[i] = lse_all[r];
      if constexpr (kTarget == Target::Prob) {
        smooth[i] = g(r);
      } else {
        k[i] = row_coefs(r, g(r), tt[i]);
        row[i] = k[i].row;
        smooth[i] = k[i].smooth;
      }
    }
    if constexpr (kTarget == Target::Prob) {  // row = sum_c w_c y'_c per position, then dx = g (p row - w y')
      AVec sum[kLanes];
      for (int i = 0; i < kLanes; ++i) sum[i] = AVec(acc(0));
      for (int64_t c = 0; c < C; ++c)
        for (int u = 0; u * P::kSize < nd; ++u) {
          const P v = tile_weights(yb, c, u * P::kSize, std::min(P::kSize, nd - u * P::kSize));
          for (int j = 0; j < P::kVecs; ++j) sum[u * P::kVecs + j] = sum[u * P::kVecs + j] + v.v[j];
        }
      for (int i = 0; i < kLanes; ++i) sum[i].store(row + i * AVec::size());
    }
    AVec lse_v[kLanes], row_v[kLanes], smooth_v[kLanes];
    for (int i = 0; i < kLanes; ++i) {
      lse_v[i] = AVec::loadu(lse + i * AVec::size());
      row_v[i] = AVec::loadu(row + i * AVec::size());
      smooth_v[i] = AVec::loadu(smooth + i * AVec::size());
    }
    for (int64_t c = 0; c < C; ++c) {
      const AVec w_c(weight(c));
      for (int u = 0; u * P::kSize < nd; ++u) {
        const int64_t off = u * P::kSize, nu = std::min(P::kSize, nd - off);
        const P xp = P::load(xb + c * D + off, nu);
        P yp, out;
        if constexpr (kTarget == Target::Prob) yp = P::load(yb + c * D + off, nu);
        for (int j = 0; j < P::kVecs; ++j) {
          const int i = u * P::kVecs + j;
          const AVec p = softmax_exp(xp.v[j] - lse_v[i]);
          if constexpr (kTarget == Target::Index) {
            out.v[j] = p * row_v[i];
          } else if constexpr (kTarget == Target::IndexSmooth) {
            out.v[j] = cross_entropy_index_grad(CrossEntropyIndexCoefs<AVec>{AVec(acc(0)), row_v[i], smooth_v[i]}, p,
                                                false, w_c);
          } else {
            const AVec ys = smoothed_probability(yp.v[j], AVec(eps), AVec(static_cast<acc>(C)));
            out.v[j] = cross_entropy_prob_grad(p, row_v[i], w_c, ys) * smooth_v[i];
          }
        }
        out.store(dxb + c * D + off, nu);
      }
    }
    if constexpr (kTarget != Target::Prob) {
      for (int64_t i = 0; i < nd; ++i) {
        if (tt[i] < 0) continue;
        const acc p_t = pe_exp(static_cast<acc>(xb[tt[i] * D + i]) - lse[i]);
        dxb[tt[i] * D + i] = static_cast<scalar_t>(cross_entropy_index_grad(k[i], p_t, true, weight(tt[i])));
      }
    }
  }
};

// Sum in a fixed order (chunks of 4096 summed in double), the same for any thread count.
template <typename acc> double ordered_sum(const std::vector<acc>& v) {
  constexpr int64_t kBlock = 4096;
  const int64_t n = static_cast<int64_t>(v.size()), blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s = 0;
      for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) s += v[i];
      part[b] = s;
    }
  });
  double s = 0;
  for (double p : part) s += p;
  return s;
}

// Rows per parallel task: about 32K logits of work each.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

struct Args {
  int64_t N, C, D, ignore_index;
  Reduction reduction;
  double eps;
};

template <typename scalar_t, Target kTarget>
CrossEntropyCpu<scalar_t, kTarget> make_op(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& w,
                                           const Args& a) {
  using acc = acc_t<scalar_t>;
  acc w_sum = static_cast<acc>(a.C);
  const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
  if (wp) {
    w_sum = 0;
    for (int64_t c = 0; c < a.C; ++c) w_sum += static_cast<acc>(wp[c]);
  }
  const bool prob = kTarget == Target::Prob;
  return {logits.const_data_ptr<scalar_t>(), prob ? nullptr : target.const_data_ptr<int64_t>(),
          prob ? target.const_data_ptr<scalar_t>() : nullptr, wp, a.C, a.D, a.ignore_index,
          static_cast<acc>(a.eps), w_sum};
}

// Calls f.template operator()<kTarget>() for the target kind of the call.
template <typename scalar_t, typename F> void with_target(bool prob, double eps, const F& f) {
  if (prob) f(std::integral_constant<Target, Target::Prob>{});
  else if (eps > 0) f(std::integral_constant<Target, Target::IndexSmooth>{});
  else f(std::integral_constant<Target, Target::Index>{});
}

Args check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                              const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
                              double label_smoothing, const char* op) {
  const Reduction red = check_reduction(reduction, op);
  check(logits, "logits", op).cpu().floating().dim(3).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  if (target.defined() && target.is_floating_point())
    check(target, "target", op).same_device(logits).same_dtype(logits).sizes(logits.sizes()).contiguous();
  else
    check(target, "target", op).same_device(logits).dtype(at::kLong).sizes({N, D}).contiguous();
  if (weight.has_value() && weight->defined())
    check(*weight, "weight", op).same_device(logits).same_dtype(logits).sizes({C});
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  return {N, C, D, ignore_index, red, std::max(label_smoothing, 0.0)};
}

// A large dx is a fresh allocation written once, and page faults (one per 4 KB page) take a third of the
// backward's time: ask for 2 MB pages where the system grants them on request (transparent_hugepage=madvise).
// Only a hint: if it fails nothing changes.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (t.nbytes() < (size_t{8} << 20)) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + page - 1) / page * page, end = (p + t.nbytes()) / page * page;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// logits (N, C, D), target (N, D) int64 or (N, C, D), weight (C) -> {loss ((N, D) or 0-dim), lse (N, D), denom}
std::vector<at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                  int64_t reduction, double label_smoothing) {
  const Args a = check_cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing,
                                          "cross_entropy_forward_cpu");
  const bool prob = target.is_floating_point();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor lse = at::empty({a.N, a.D}, acc_opts);
  at::Tensor denom = at::empty({}, acc_opts);
  at::Tensor loss = a.reduction == Reduction::None ? at::empty({a.N, a.D}, logits.options())
                                                   : at::empty({}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(prob, a.eps, [&](auto kind) {
      const auto op = make_op<scalar_t, decltype(kind)::value>(logits, target, w, a);
      using Op = std::decay_t<decltype(op)>;
      const int64_t rows = a.N * a.D;
      std::vector<acc> row_loss(static_cast<size_t>(rows)), row_w(static_cast<size_t>(rows));
      acc* lse_p = lse.data_ptr<acc>();
      if (a.D == 1) {
        at::parallel_for(0, a.N, grain_for(a.C), [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n) op.forward_row(n, lse_p, row_loss[n], row_w[n]);
        });
      } else {
        const int64_t tiles = (a.D + Op::kTile - 1) / Op::kTile;
        at::parallel_for(0, a.N * tiles, grain_for(a.C * Op::kTile), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = i / tiles, d0 = (i % tiles) * Op::kTile, r = n * a.D + d0;
            op.forward_tile(n, d0, std::min(Op::kTile, a.D - d0), lse_p, row_loss.data() + r, row_w.data() + r);
          }
        });
      }
      // Probability targets: torch's mean is NaN for an empty input, even when only C is 0.
      const double den = prob ? static_cast<double>(a.C == 0 ? 0 : rows) : ordered_sum(row_w);
      denom.data_ptr<acc>()[0] = static_cast<acc>(den);
      scalar_t* out = loss.data_ptr<scalar_t>();
      if (a.reduction == Reduction::None) {
        for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<scalar_t>(row_loss[r]);
      } else {
        const double total = ordered_sum(row_loss);
        out[0] = static_cast<scalar_t>(static_cast<acc>(a.reduction == Reduction::Mean ? total / den : total));
      }
    });
  });
  return {loss, lse, denom};
}

// dlogits (N, C, D) = (p - y') * w * grad_loss [/ denom], p = exp(logits - lse)
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      const at::Tensor& denom, int64_t ignore_index, int64_t reduction,
                                      double label_smoothing) {
  const char* name = "cross_entropy_backward_cpu";
  const Args a = check_cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing, name);
  const bool prob = target.is_floating_point();
  check(lse, "lse", name).same_device(logits).dtype(acc_dtype(logits)).sizes({a.N, a.D}).contiguous();
  check(denom, "denom", name).same_device(logits).dtype(acc_dtype(logits)).dim(0);
  auto g_check = check(grad_loss, "grad_loss", name);
  g_check.same_device(logits).same_dtype(logits);
  if (a.reduction == Reduction::None) g_check.sizes({a.N, a.D}).contiguous(); else g_check.dim(0);
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  at::Tensor dx = at::empty(logits.sizes(), logits.options());
  advise_huge_pages(dx);
  const bool stream = dx.nbytes() >= (size_t{8} << 20);  // past the caches anyway
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(prob, a.eps, [&](auto kind) {
      const auto op = make_op<scalar_t, decltype(kind)::value>(logits, target, w, a);
      using Op = std::decay_t<decltype(op)>;
      const scalar_t* gp = grad_loss.const_data_ptr<scalar_t>();
      // 'mean' divides g by denom (0 when every row is ignored: then no kept row uses it).
      const acc g_all = a.reduction == Reduction::None ? acc(0)
                        : a.reduction == Reduction::Mean ? static_cast<acc>(gp[0]) / denom.const_data_ptr<acc>()[0]
                                                         : static_cast<acc>(gp[0]);
      const bool per_row = a.reduction == Reduction::None;
      const auto g = [&](int64_t r) { return per_row ? static_cast<acc>(gp[r]) : g_all; };
      const acc* lse_p = lse.const_data_ptr<acc>();
      scalar_t* dx_p = dx.data_ptr<scalar_t>();
      if (a.D == 1) {
        at::parallel_for(0, a.N, grain_for(a.C), [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n) op.backward_row(n, g(n), lse_p[n], dx_p + n * a.C, stream);
        });
      } else {
        const int64_t tiles = (a.D + Op::kTile - 1) / Op::kTile;
        at::parallel_for(0, a.N * tiles, grain_for(a.C * Op::kTile), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = i / tiles, d0 = (i % tiles) * Op::kTile;
            op.backward_tile(n, d0, std::min(Op::kTile, a.D - d0), g, lse_p, dx_p);
          }
        });
      }
    });
  });
  return dx;
}

}  // namespace pyengine
