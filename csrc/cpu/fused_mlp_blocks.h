// The block machinery of the CPU fused_mlp kernels (fused_mlp.cpp: forward and backward as ops; fused_mlp_step.h:
// a whole training step): the network's parameters in the accumulation type, and the per-block helpers that move
// 64 rows at a time between row-major tensors and feature-major block buffers and run a layer over a block.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/fused_mlp.h"
#include "cpu/vec_math.h"

namespace pyengine {
namespace fused_mlp_cpu {

using namespace fused_mlp;

// A multiple of every at::vec width (16 floats on AVX-512), so block loops need no tails.
constexpr int64_t kBlockRows = 64;
// At most this many chunks of rows carry weight-gradient partials (bounds their memory).
constexpr int64_t kMaxChunks = 64;
// Multiply-adds a parallel task should at least do (waking a thread costs microseconds), so small networks such
// as the notes' 8 -> 6 -> 4 -> 1 at 759 rows run on the calling thread alone.
constexpr int64_t kMinTaskMacs = 1 << 18;

// The weights and biases in acc_t, layer after layer: W_l (n_{l+1}, n_l) then b_l (n_{l+1}). The backward
// passes no biases (it never reads them): their slots are zero and only give the gradients' layout.
template <typename scalar_t> struct Network {
  using acc = acc_t<scalar_t>;
  std::vector<int64_t> widths, offsets;
  std::vector<acc> params;

  Network(std::vector<int64_t> w, const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& biases)
      : widths(std::move(w)) {
    for (size_t l = 0; l < weights.size(); ++l) {
      offsets.push_back(static_cast<int64_t>(params.size()));
      const at::Tensor wc = weights[l].contiguous();
      const scalar_t* p = wc.const_data_ptr<scalar_t>();
      params.insert(params.end(), p, p + wc.numel());
      if (biases.empty()) {
        params.insert(params.end(), wc.size(0), acc(0));
      } else {
        const at::Tensor bc = biases[l].contiguous();
        params.insert(params.end(), bc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>() + bc.numel());
      }
    }
  }
  int64_t layers() const { return static_cast<int64_t>(offsets.size()); }
  int64_t in(int64_t l) const { return widths[l]; }
  int64_t out(int64_t l) const { return widths[l + 1]; }
  const acc* weight(int64_t l) const { return params.data() + offsets[l]; }
  const acc* bias(int64_t l) const { return weight(l) + out(l) * in(l); }
  int64_t max_width() const { return *std::max_element(widths.begin(), widths.end()); }
  int64_t macs_per_row() const {
    int64_t m = 0;
    for (int64_t l = 0; l < layers(); ++l) m += in(l) * out(l);
    return m;
  }
};

// Rows r0 .. r0 + rows of a row-major (M, n) tensor into a feature-major block buffer; rows past the end are 0.
// A whole block of float or double is gathered, a vector of rows (stride n) per feature: a tenth of the
// instructions of the element-by-element transpose, which dominated the notes' narrow layers.
template <typename scalar_t, typename acc_t>
void load_block(const scalar_t* src, int64_t n, int64_t r0, int64_t rows, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    using Index = at::vec::Vectorized<at::vec::int_same_size_t<acc_t>>;
    if (rows == kBlockRows && n * kBlockRows <= std::numeric_limits<int32_t>::max()) {
      const Index lanes = Index::arange(0, n);  // lane i reads row i of its vector of rows
      for (int64_t v = 0; v < kBlockRows; v += Vec::size()) {
        const acc_t* rows_v = src + (r0 + v) * n;
        for (int64_t k = 0; k < n; ++k) {
          at::vec::gather<sizeof(acc_t)>(rows_v + k, lanes).store(buf + k * kBlockRows + v);
        }
      }
      return;
    }
  }
  std::fill(buf, buf + n * kBlockRows, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = src + (r0 + r) * n;
    for (int64_t k = 0; k < n; ++k) buf[k * kBlockRows + r] = static_cast<acc_t>(row[k]);
  }
}

template <typename scalar_t, typename acc_t>
void store_block(const acc_t* buf, int64_t n, int64_t r0, int64_t rows, scalar_t* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    scalar_t* row = dst + (r0 + r) * n;
    for (int64_t k = 0; k < n; ++k) row[k] = static_cast<scalar_t>(buf[k * kBlockRows + r]);
  }
}

// out[i] = bias[i] + sum_m coef[i * stride_i + m * stride_m] in[m] for a block: in (n_in, kBlockRows), out
// (n_out, kBlockRows); bias may be null (0). The block's kBlockRows sums of one output stay in registers
// (4 AVX-512 vectors of float) while the inputs stream past them.
//   layer forward:   out = z,  in = a,  coef = W (stride_i = n_in, stride_m = 1)
//   layer backward:  out = da, in = dz, coef = W^T (stride_i = 1, stride_m = n_in of W)
template <typename acc_t>
void block_combine(const acc_t* coef, int64_t stride_i, int64_t stride_m, const acc_t* bias, int64_t n_in,
                   int64_t n_out, const acc_t* in, acc_t* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kVecs = kBlockRows / Vec::size();
  for (int64_t i = 0; i < n_out; ++i) {
    Vec acc[kVecs];
    for (int64_t v = 0; v < kVecs; ++v) acc[v] = Vec(bias == nullptr ? acc_t(0) : bias[i]);
    for (int64_t m = 0; m < n_in; ++m) {
      const Vec c(coef[i * stride_i + m * stride_m]);
      const acc_t* row = in + m * kBlockRows;
      for (int64_t v = 0; v < kVecs; ++v) acc[v] = at::vec::fmadd(c, Vec::loadu(row + v * Vec::size()), acc[v]);
    }
    for (int64_t v = 0; v < kVecs; ++v) acc[v].store(out + i * kBlockRows + v * Vec::size());
  }
}

// buf = act(buf) over n features of a block (kBlockRows is a multiple of every vector width).
template <typename acc_t> void block_activate(acc_t* buf, int64_t n, int64_t act) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (act == kNone) return;
  for (int64_t i = 0; i < n * kBlockRows; i += Vec::size()) activate(Vec::loadu(buf + i), act).store(buf + i);
}

// dz = act'(a) * da, in place in da.
template <typename acc_t> void block_activation_grad(acc_t* da, const acc_t* a, int64_t n, int64_t act) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (act == kNone) return;
  for (int64_t i = 0; i < n * kBlockRows; i += Vec::size()) {
    activation_grad(Vec::loadu(da + i), Vec::loadu(a + i), act).store(da + i);
  }
}

// The block's rows r0 .. r0 + rows of a row-major (M, n) tensor, row-major in acc_t (the weight gradient's layout).
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, int64_t n, int64_t r0, int64_t rows, acc_t* buf) {
  const scalar_t* from = src + r0 * n;
  for (int64_t i = 0; i < rows * n; ++i) buf[i] = static_cast<acc_t>(from[i]);
}

// dW[j][k] += sum_r dz[j][r] a[r][k] for a block, a row-major (rows, n_in). For each j, up to 64 columns of dW
// (4 AVX-512 vectors of float) stay in registers while the rows stream past: no horizontal sums. A layer of at
// most one vector of columns (the notes' 8, 6 and 4) takes four rows at a time into four sums instead: one
// chain of fused multiply-adds would wait out each one's latency (measured: wider layers lose by it).
template <typename acc_t>
void block_weight_grad(const acc_t* dz, const acc_t* a_rows, int64_t rows, int64_t n_in, int64_t n_out, acc_t* dW) {
  using Vec = at::vec::Vectorized<acc_t>;
  if (n_in <= Vec::size()) {
    for (int64_t j = 0; j < n_out; ++j) {
      const acc_t* g = dz + j * kBlockRows;
      Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) {
        s0 = at::vec::fmadd(Vec(g[r]), Vec::loadu(a_rows + r * n_in, n_in), s0);
        s1 = at::vec::fmadd(Vec(g[r + 1]), Vec::loadu(a_rows + (r + 1) * n_in, n_in), s1);
        s2 = at::vec::fmadd(Vec(g[r + 2]), Vec::loadu(a_rows + (r + 2) * n_in, n_in), s2);
        s3 = at::vec::fmadd(Vec(g[r + 3]), Vec::loadu(a_rows + (r + 3) * n_in, n_in), s3);
      }
      for (; r < rows; ++r) s0 = at::vec::fmadd(Vec(g[r]), Vec::loadu(a_rows + r * n_in, n_in), s0);
      acc_t* out = dW + j * n_in;
      ((s0 + s1) + (s2 + s3) + Vec::loadu(out, n_in)).store(out, n_in);
    }
    return;
  }
  constexpr int64_t kVecs = 4, kCols = kVecs * Vec::size();
  for (int64_t j = 0; j < n_out; ++j) {
    const acc_t* g = dz + j * kBlockRows;
    for (int64_t k0 = 0; k0 < n_in; k0 += kCols) {
      int64_t count[kVecs];  // columns of each vector inside the layer (0 past its end)
      Vec acc[kVecs];
      for (int64_t v = 0; v < kVecs; ++v) {
        count[v] = std::clamp<int64_t>(n_in - k0 - v * Vec::size(), 0, Vec::size());
        acc[v] = Vec(acc_t(0));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const Vec c(g[r]);
        const acc_t* row = a_rows + r * n_in + k0;
        for (int64_t v = 0; v < kVecs; ++v) {
          if (count[v] > 0) acc[v] = at::vec::fmadd(c, Vec::loadu(row + v * Vec::size(), count[v]), acc[v]);
        }
      }
      for (int64_t v = 0; v < kVecs; ++v) {
        if (count[v] == 0) continue;
        acc_t* out = dW + j * n_in + k0 + v * Vec::size();
        (acc[v] + Vec::loadu(out, count[v])).store(out, count[v]);
      }
    }
  }
}

// sum_r u[r] over the first `rows` entries, in vector lanes (a scalar loop would be one long chain of adds).
template <typename acc_t> acc_t sum(const acc_t* u, int64_t rows) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec acc(acc_t(0));
  int64_t r = 0;
  for (; r + Vec::size() <= rows; r += Vec::size()) acc = acc + Vec::loadu(u + r);
  acc_t s = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, acc);
  for (; r < rows; ++r) s += u[r];
  return s;
}

}  // namespace fused_mlp_cpu
}  // namespace pyengine
