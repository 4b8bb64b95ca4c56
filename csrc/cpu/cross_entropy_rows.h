// The per-row cross-entropy kernels of the CPU (forward: lse and loss from one online-softmax pass; backward:
// the gradient from lse), shared by cross_entropy.cpp and linear_cross_entropy.cpp. The formulas are in
// common/math.h; see cross_entropy.cpp for the layouts.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "cpu/softmax_rows.h"

namespace pyengine {


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

  // Classes few enough for a row per vector lane (forward_lanes); more go a row at a time, classes in lanes.
  static constexpr int64_t kLaneClasses = 16;

  // D == 1, rows n0 .. n0 + AVec::size() of float or double logits (scalar_t == acc) with at most kLaneClasses
  // classes, a row per lane: each class gathered across the rows, so the max, the sum of exps and (weighted) b
  // and vsum are elementwise over the C classes, where forward_row reduces across lanes once per row (most of a
  // short row's cost). The same statistics as forward_row's, summed in class order; the loss from them as it does.
  void forward_lanes(int64_t n0, acc* lse, acc* loss, acc* w_t) const {
    using Index = Vectorized<at::vec::int_same_size_t<acc>>;
    constexpr int64_t L = AVec::size();
    const Index lanes = Index::arange(0, C);  // lane i reads row n0 + i
    const acc* xb = x + n0 * C;
    AVec xs[kLaneClasses];
    for (int64_t c = 0; c < C; ++c) xs[c] = at::vec::gather<sizeof(acc)>(xb + c, lanes);
    const auto [shift, log_sum] = lanes_softmax<acc>(C, [&](int64_t c) { return xs[c]; });
    AVec b(acc(0)), vsum(acc(0));
    if constexpr (kWeighted) {
      for (int64_t c = 0; c < C; ++c) {
        AVec v(weight(c));
        if constexpr (kTarget == Target::Prob) {
          const AVec yc = at::vec::gather<sizeof(acc)>(y + n0 * C + c, lanes);
          v = v * smoothed_probability(yc, AVec(eps), AVec(static_cast<acc>(C)));
        }
        b = at::vec::fmadd(v, xs[c] - shift, b);
        vsum = vsum + v;
      }
    }
    acc shift_a[L], log_sum_a[L], b_a[L], vsum_a[L];
    shift.store(shift_a);
    log_sum.store(log_sum_a);
    b.store(b_a);
    vsum.store(vsum_a);
    for (int64_t i = 0; i < L; ++i) {
      const int64_t n = n0 + i;
      const RowSoftmax<acc> rs{shift_a[i], log_sum_a[i], b_a[i], vsum_a[i]};
      lse[n] = rs.shift + rs.log_sum;
      loss[n] = row_loss(rs, n, x + n * C, 1, w_t[n]);
    }
  }

  // D == 1: forward_row for rows [0, N) over the threads, each row followed by after(n). With at most
  // kLaneClasses float or double classes, whole blocks of AVec::size() rows counted from row 0 (so a row takes
  // the same path for any thread count) go through forward_lanes; the last, partial block row by row.
  template <typename After>
  void forward_rows(int64_t N, int64_t grain, acc* lse, acc* loss, acc* w_t, const After& after) const {
    constexpr int64_t L = AVec::size();
    const bool in_lanes = std::is_same_v<scalar_t, acc> && D == 1 && C >= 1 && C <= kLaneClasses;
    const int64_t per = in_lanes ? L : 1;
    at::parallel_for(0, (N + per - 1) / per, std::max<int64_t>(1, grain / per), [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * per, n1 = std::min(N, n0 + per);
        bool done = false;
        if constexpr (std::is_same_v<scalar_t, acc>) {  // forward_lanes exists for float and double only
          if (in_lanes && n1 - n0 == L) {
            forward_lanes(n0, lse, loss, w_t);
            done = true;
          }
        }
        for (int64_t n = n0; n < n1 && !done; ++n) forward_row(n, lse, loss[n], w_t[n]);
        for (int64_t n = n0; n < n1; ++n) after(n);
      }
    });
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

  // D == 1, row n: dx (C) from lse and g; with stream, dx bypasses the caches (see stream_store). dx may be
  // the row's logits themselves (x_t is read before the row is overwritten).
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
    const acc x_t = tt >= 0 ? static_cast<acc>(xr[tt]) : acc(0);
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
      const acc p_t = pe_exp(x_t - lse);
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
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1));
}

// Calls f.template operator()<kTarget>() for the target kind of the call.
template <typename scalar_t, typename F> void with_target(bool prob, double eps, const F& f) {
  if (prob) f(std::integral_constant<Target, Target::Prob>{});
  else if (eps > 0) f(std::integral_constant<Target, Target::IndexSmooth>{});
  else f(std::integral_constant<Target, Target::Index>{});
}

}  // namespace pyengine
