// linear for small layers on the CPU: widths up to 64 and at most 64K multiply-adds in the product, where
// a BLAS call through at::addmm_out / at::mm costs ~8-10 us of fixed work (dispatch, checks, packing) for a
// 759x8 @ 8x6 product that needs ~1 us of arithmetic. x: (M, K), weight: (N, K), y, dy: (M, N), all contiguous.
//   forward   y[i, :]  = act(b + sum_k x[i, k] * W^T[k, :])   a row at a time: its N outputs stay in vector
//                                                             registers, W^T (K, N) in acc_t sits in L1
//   backward  dz[i, :] = dy[i, :] * act'(y[i, :])             one pass over the rows computes all three:
//             db      += dz[i, :]
//             dx[i, :] = sum_n dz[i, n] * W[n, :]
//             dW[n, :] += dz[i, n] * x[i, :]                   dW and db summed in acc_t in L1, written once
// One thread, rows in order: the same sums on every run, and no parallel region to wake for a few microseconds.
#pragma once

#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace pyengine {
namespace cpu {

// Where BLAS's fixed cost stops dominating (measured against at::addmm / at::mm on one core, float32): at 64K
// multiply-adds this path and BLAS take about the same time (16x64 -> 64: 5.0 vs 4.7 us forward, 8.3 vs 9.4 us
// backward); at 512K BLAS is 1.5-2.5x faster except for the skinniest shapes. Below it, this path wins up to 2.7x
// (759x8 -> 6: 4.9 vs 13.5 us forward).
constexpr int64_t kSmallLinearMaxWidth = 64;               // in and out features: a row's vectors fit in registers
constexpr int64_t kSmallLinearMaxWork = int64_t(1) << 16;  // M * N * K multiply-adds

inline bool use_small_linear(int64_t M, int64_t N, int64_t K) {
  return N > 0 && K > 0 && N <= kSmallLinearMaxWidth && K <= kSmallLinearMaxWidth && M * N * K <= kSmallLinearMaxWork;
}

// Up to one vector of a row: count (1..V) values of any floating type as acc_t, lanes past count zero, and back.
// float and double load and store masked vectors straight from memory; half types go through a staging array.
template <typename scalar_t>
at::vec::Vectorized<acc_t<scalar_t>> load_part(const scalar_t* p, int64_t count) {
  using acc = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return at::vec::Vectorized<acc>::loadu(p, count);
  } else {
    alignas(64) acc tmp[at::vec::Vectorized<acc>::size()] = {};
    for (int64_t j = 0; j < count; ++j) tmp[j] = static_cast<acc>(p[j]);
    return at::vec::Vectorized<acc>::loadu(tmp);
  }
}
template <typename scalar_t>
void store_part(scalar_t* p, const at::vec::Vectorized<acc_t<scalar_t>>& v, int64_t count) {
  using acc = acc_t<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    v.store(p, count);
  } else {
    alignas(64) acc tmp[at::vec::Vectorized<acc>::size()];
    v.store(tmp);
    for (int64_t j = 0; j < count; ++j) p[j] = static_cast<scalar_t>(tmp[j]);
  }
}

// The vectors of a row of up to kSmallLinearMaxWidth values: the loops over them run to the fixed maximum with a
// bound check, so the compiler unrolls them and keeps the row in registers.
template <typename acc>
struct SmallRow {
  using Vec = at::vec::Vectorized<acc>;
  static constexpr int kMaxVecs = kSmallLinearMaxWidth / Vec::size();
  Vec v[kMaxVecs];
};

template <Activation A, typename scalar_t>
void small_linear_forward(scalar_t* y, const scalar_t* x, const scalar_t* weight, const scalar_t* bias, int64_t M,
                          int64_t N, int64_t K) {
  using acc = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  constexpr int V = Vec::size(), kMaxVecs = SmallRow<acc>::kMaxVecs;
  const int nv = static_cast<int>((N + V - 1) / V), padded = nv * V;
  std::vector<acc> wt(static_cast<size_t>(K * padded), acc(0));  // W^T, rows padded with zeros
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) wt[k * padded + n] = static_cast<acc>(weight[n * K + k]);
  }
  SmallRow<acc> b;
  for (int j = 0; j < kMaxVecs; ++j) {
    if (j < nv) b.v[j] = bias ? load_part(bias + j * V, std::min<int64_t>(V, N - j * V)) : Vec(acc(0));
  }
  for (int64_t i = 0; i < M; ++i) {
    SmallRow<acc> z = b;
    const scalar_t* xi = x + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const Vec xk(static_cast<acc>(xi[k]));
      const acc* wk = wt.data() + k * padded;
      for (int j = 0; j < kMaxVecs; ++j) if (j < nv) z.v[j] = at::vec::fmadd(xk, Vec::loadu(wk + j * V), z.v[j]);
    }
    for (int j = 0; j < kMaxVecs; ++j) {
      if (j < nv) store_part(y + i * N + j * V, activation_forward_math<A>(z.v[j]), std::min<int64_t>(V, N - j * V));
    }
  }
}

// dx (M, K), dweight (N, K), dbias (N): each null when not asked for; y null without an activation.
template <Activation A, typename scalar_t>
void small_linear_backward(scalar_t* dx, scalar_t* dweight, scalar_t* dbias, const scalar_t* dy, const scalar_t* y,
                           const scalar_t* x, const scalar_t* weight, int64_t M, int64_t N, int64_t K) {
  using acc = acc_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc>;
  constexpr int V = Vec::size(), kMaxVecs = SmallRow<acc>::kMaxVecs;
  const int kv = static_cast<int>((K + V - 1) / V), k_pad = kv * V;
  auto k_count = [&](int j) { return std::min<int64_t>(V, K - j * V); };
  std::vector<acc> w(static_cast<size_t>(N * k_pad), acc(0)), dw(dweight ? static_cast<size_t>(N * k_pad) : 0, acc(0));
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) w[n * k_pad + k] = static_cast<acc>(weight[n * K + k]);
  }
  std::vector<acc> db(N, acc(0));
  for (int64_t i = 0; i < M; ++i) {
    SmallRow<acc> xr, r;
    for (int j = 0; j < kMaxVecs; ++j) {
      if (j < kv) xr.v[j] = dweight ? load_part(x + i * K + j * V, k_count(j)) : Vec(acc(0));
      r.v[j] = Vec(acc(0));
    }
    // dz[i, n] as a scalar, broadcast straight into the two products
    for (int64_t n = 0; n < N; ++n) {
      const acc g = static_cast<acc>(dy[i * N + n]);
      const acc dz = y ? activation_backward_math<A>(g, static_cast<acc>(y[i * N + n])) : g;
      db[n] += dz;
      const Vec d(dz);
      const acc* wn = w.data() + n * k_pad;
      acc* dwn = dweight ? dw.data() + n * k_pad : nullptr;
      for (int j = 0; j < kMaxVecs; ++j) {
        if (j >= kv) continue;
        r.v[j] = at::vec::fmadd(d, Vec::loadu(wn + j * V), r.v[j]);
        if (dwn) at::vec::fmadd(d, xr.v[j], Vec::loadu(dwn + j * V)).store(dwn + j * V);
      }
    }
    if (dx) {
      for (int j = 0; j < kMaxVecs; ++j) if (j < kv) store_part(dx + i * K + j * V, r.v[j], k_count(j));
    }
  }
  if (dweight) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) dweight[n * K + k] = static_cast<scalar_t>(dw[n * k_pad + k]);
    }
  }
  if (dbias) {
    for (int64_t n = 0; n < N; ++n) dbias[n] = static_cast<scalar_t>(db[n]);
  }
}

}  // namespace cpu
}  // namespace pyengine
