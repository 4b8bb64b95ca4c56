// linear with one output feature (N = 1: a regression or binary-classifier head, FusedMLP's last layer) beyond the
// small-layer path's reach. Through BLAS its three products are a GEMV, an outer product and another GEMV, each
// behind oneDNN's fixed cost: 4096x64 -> 1 in bfloat16 took 24-31 us per product for 0.26M multiply-adds, 82 us of
// FusedMLP 4096x32->64->64->1's 566 us of products (benchmarks/NOTES.md, session 10). Here each is one pass over x.
// x: (M, K) contiguous, w: weight's one row (K), y, dy: (M), all of the operands' dtype; sums in acc_t.
//   forward   y[i]     = act(b + x[i, :] . w)               rows in parallel, 8 rows' dot products at a time
//   backward  dz[i]    = dy[i] * act'(y[i])                 rows in fixed chunks of kSingleOutputRows (the split
//             dx[i, :] = dz[i] * w                           depends on M alone), each chunk summing its own dw and
//             dw       = sum_i dz[i] * x[i, :]               db in acc_t; the chunks' sums are then added in chunk
//             db       = sum_i dz[i]                         order: the same result on every run and thread count
#pragma once

#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "cpu/elementwise.h"
#include "cpu/linear_small.h"

namespace pyengine {
namespace cpu {

constexpr int64_t kSingleOutputRows = 256;
// Rows handled together: their dot products (forward) and their terms of dw (backward) are independent chains of
// multiply-adds, where one row at a time waited on each multiply-add's latency and on its vector's lane sum.
constexpr int64_t kRowBlock = 8;

// Two vectors of a row as acc_t lanes: a half type's one vector converts to two float ones (a load of one float
// vector's worth of a half type would go through a staging copy), float and double load two.
template <typename scalar_t>
void load_two(const scalar_t* p, at::vec::Vectorized<acc_t<scalar_t>>& lo, at::vec::Vectorized<acc_t<scalar_t>>& hi) {
  if constexpr (is_reduced_float<scalar_t>()) {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  } else {
    lo = at::vec::Vectorized<scalar_t>::loadu(p);
    hi = at::vec::Vectorized<scalar_t>::loadu(p + at::vec::Vectorized<scalar_t>::size());
  }
}
template <typename scalar_t>
void store_two(scalar_t* p, const at::vec::Vectorized<acc_t<scalar_t>>& lo,
               const at::vec::Vectorized<acc_t<scalar_t>>& hi) {
  if constexpr (is_reduced_float<scalar_t>()) {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  } else {
    lo.store(p);
    hi.store(p + at::vec::Vectorized<scalar_t>::size());
  }
}

// The weight row in acc_t, padded with zeros to whole vectors.
template <typename scalar_t> std::vector<acc_t<scalar_t>> padded_weight_row(const scalar_t* weight, int64_t K) {
  constexpr int64_t V = at::vec::Vectorized<acc_t<scalar_t>>::size();
  std::vector<acc_t<scalar_t>> w((K + V - 1) / V * V, acc_t<scalar_t>(0));
  for (int64_t k = 0; k < K; ++k) w[k] = static_cast<acc_t<scalar_t>>(weight[k]);
  return w;
}

// dot[r] = x[r, :] . w for R rows of x (R a constant: the sums stay in registers, where a run-time row count
// kept them on the stack and took 3x the time in bfloat16).
template <int R, typename scalar_t>
void dot_rows(acc_t<scalar_t>* dot, const scalar_t* x, const acc_t<scalar_t>* w, int64_t K) {
  using Vec = at::vec::Vectorized<acc_t<scalar_t>>;
  constexpr int64_t V = Vec::size();
  Vec s[R];
  for (int r = 0; r < R; ++r) s[r] = Vec(acc_t<scalar_t>(0));
  int64_t k = 0;
  for (; k + 2 * V <= K; k += 2 * V) {
    const Vec w0 = Vec::loadu(w + k), w1 = Vec::loadu(w + k + V);
    for (int r = 0; r < R; ++r) {
      Vec x0, x1;
      load_two(x + r * K + k, x0, x1);
      s[r] = at::vec::fmadd(x1, w1, at::vec::fmadd(x0, w0, s[r]));
    }
  }
  for (; k < K; k += V) {
    const Vec wk = Vec::loadu(w + k);
    for (int r = 0; r < R; ++r) s[r] = at::vec::fmadd(load_part(x + r * K + k, std::min(V, K - k)), wk, s[r]);
  }
  for (int r = 0; r < R; ++r) {
    dot[r] = at::vec::vec_reduce_all<acc_t<scalar_t>>([](const Vec& p, const Vec& q) { return p + q; }, s[r]);
  }
}

template <Activation A, typename scalar_t>
void single_output_linear_forward(scalar_t* y, const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                                  int64_t M, int64_t K) {
  using acc = acc_t<scalar_t>;
  const std::vector<acc> w = padded_weight_row(weight, K);
  const acc b = bias ? static_cast<acc>(bias[0]) : acc(0);
  const int64_t grain = std::max<int64_t>(kRowBlock, kElementwiseGrain / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t i0 = r0; i0 < r1; i0 += kRowBlock) {
      const int64_t rows = std::min(kRowBlock, r1 - i0);
      acc dot[kRowBlock];
      if (rows == kRowBlock) {
        dot_rows<kRowBlock>(dot, x + i0 * K, w.data(), K);
      } else {
        for (int64_t r = 0; r < rows; ++r) dot_rows<1>(dot + r, x + (i0 + r) * K, w.data(), K);
      }
      for (int64_t r = 0; r < rows; ++r) y[i0 + r] = static_cast<scalar_t>(activation_forward_math<A>(b + dot[r]));
    }
  });
}

// For R rows (a constant, as dot_rows) with their dz in d: dx[r, :] = d[r] * w (dx may be null), and
// dw += sum_r d[r] * x[r, :] (dw null: not asked for).
template <int R, typename scalar_t>
void scatter_rows(scalar_t* dx, acc_t<scalar_t>* dw, const acc_t<scalar_t>* d, const scalar_t* x,
                  const acc_t<scalar_t>* w, int64_t K) {
  using Vec = at::vec::Vectorized<acc_t<scalar_t>>;
  constexpr int64_t V = Vec::size();
  Vec dv[R];
  for (int r = 0; r < R; ++r) dv[r] = Vec(d[r]);
  int64_t k = 0;
  for (; k + 2 * V <= K; k += 2 * V) {
    if (dx) {
      const Vec w0 = Vec::loadu(w + k), w1 = Vec::loadu(w + k + V);
      for (int r = 0; r < R; ++r) store_two(dx + r * K + k, dv[r] * w0, dv[r] * w1);
    }
    if (dw) {
      Vec sum0 = Vec::loadu(dw + k), sum1 = Vec::loadu(dw + k + V);
      for (int r = 0; r < R; ++r) {
        Vec x0, x1;
        load_two(x + r * K + k, x0, x1);
        sum0 = at::vec::fmadd(dv[r], x0, sum0);
        sum1 = at::vec::fmadd(dv[r], x1, sum1);
      }
      sum0.store(dw + k);
      sum1.store(dw + k + V);
    }
  }
  for (; k < K; k += V) {
    const int64_t count = std::min(V, K - k);
    if (dx) {
      const Vec wk = Vec::loadu(w + k);
      for (int r = 0; r < R; ++r) store_part(dx + r * K + k, dv[r] * wk, count);
    }
    if (dw) {
      Vec sum = Vec::loadu(dw + k);
      for (int r = 0; r < R; ++r) sum = at::vec::fmadd(dv[r], load_part(x + r * K + k, count), sum);
      sum.store(dw + k);
    }
  }
}

// dx (M, K), dweight (K), dbias (1): each null when not asked for; y null without an activation.
template <Activation A, typename scalar_t>
void single_output_linear_backward(scalar_t* dx, scalar_t* dweight, scalar_t* dbias, const scalar_t* dy,
                                   const scalar_t* y, const scalar_t* x, const scalar_t* weight, int64_t M, int64_t K) {
  using acc = acc_t<scalar_t>;
  const std::vector<acc> w = padded_weight_row(weight, K);
  const int64_t width = static_cast<int64_t>(w.size()), stride = width + 1;  // a chunk's sums: dw, then db
  const int64_t chunks = (M + kSingleOutputRows - 1) / kSingleOutputRows;
  const bool sums = dweight || dbias;
  std::vector<acc> partial(sums ? static_cast<size_t>(chunks * stride) : 0, acc(0));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      acc* dw = dweight ? partial.data() + c * stride : nullptr;
      acc db(0);
      const int64_t end = std::min(M, (c + 1) * kSingleOutputRows);
      for (int64_t i0 = c * kSingleOutputRows; i0 < end; i0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, end - i0);
        acc d[kRowBlock];
        for (int64_t r = 0; r < rows; ++r) {
          const acc g = static_cast<acc>(dy[i0 + r]);
          d[r] = y ? activation_backward_math<A>(g, static_cast<acc>(y[i0 + r])) : g;
          db += d[r];
        }
        scalar_t* dx_rows = dx ? dx + i0 * K : nullptr;
        if (rows == kRowBlock) {
          scatter_rows<kRowBlock>(dx_rows, dw, d, x + i0 * K, w.data(), K);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            scatter_rows<1>(dx ? dx_rows + r * K : nullptr, dw, d + r, x + (i0 + r) * K, w.data(), K);
          }
        }
      }
      if (sums) partial[c * stride + width] = db;
    }
  });
  if (!sums) return;
  std::vector<acc> total(static_cast<size_t>(stride), acc(0));
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t p = 0; p < stride; ++p) total[p] += partial[c * stride + p];
  }
  if (dweight) {
    for (int64_t k = 0; k < K; ++k) dweight[k] = static_cast<scalar_t>(total[k]);
  }
  if (dbias) dbias[0] = static_cast<scalar_t>(total[width]);
}

}  // namespace cpu
}  // namespace pyengine
