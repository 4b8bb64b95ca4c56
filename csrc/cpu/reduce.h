// Sums on the CPU over strided views, accumulating in acc_t (float for half/bfloat16, double for double).
//   sum_columns: out[o, j] = scale * sum_r g[o, r, j]   the summed dims lie outside the last one (column sums)
//   sum_inner:   out[o]    = scale * sum_r g[o, r]      the last dim is summed too (row sums)
//   sum_rows:    out[j]    = scale * sum_i g[i * ld + j]  (linear's bias gradient; add's row-bias gradient)
// The split into chunks depends on the shape alone, never on the thread count, so the result is the same on
// every run and every machine.
#pragma once

#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <vector>

namespace pyengine {
namespace cpu {

// Dims of a strided view, outermost first, each with one stride per operand (in elements).
template <int N> struct StridedDims {
  c10::SmallVector<int64_t, 8> sizes;
  std::array<c10::SmallVector<int64_t, 8>, N> strides;

  void push_back(int64_t size, std::array<int64_t, N> s) {
    sizes.push_back(size);
    for (int k = 0; k < N; ++k) strides[k].push_back(s[k]);
  }
  int64_t ndim() const { return static_cast<int64_t>(sizes.size()); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }
};

// Walks the elements of StridedDims in row-major order from a linear index, keeping each operand's offset.
template <int N> struct DimCounter {
  const StridedDims<N>& dims;
  c10::SmallVector<int64_t, 8> index;
  std::array<int64_t, N> offset{};

  DimCounter(const StridedDims<N>& d, int64_t linear) : dims(d), index(d.sizes.size(), 0) {
    for (int64_t k = d.ndim() - 1; k >= 0; --k) {
      index[k] = linear % d.sizes[k];
      linear /= d.sizes[k];
      for (int i = 0; i < N; ++i) offset[i] += index[k] * d.strides[i][k];
    }
  }
  void next() {
    for (int64_t k = dims.ndim() - 1; k >= 0; --k) {
      for (int i = 0; i < N; ++i) offset[i] += dims.strides[i][k];
      if (++index[k] < dims.sizes[k]) return;
      for (int i = 0; i < N; ++i) offset[i] -= dims.strides[i][k] * dims.sizes[k];
      index[k] = 0;
    }
  }
};

// acc[j] += row[j * stride] for j < n; vectorized for a unit stride.
template <typename scalar_t>
void accumulate_row(acc_t<scalar_t>* acc, const scalar_t* row, int64_t n, int64_t stride = 1) {
  using acc_type = acc_t<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_type>;
  int64_t j = 0;
  if (stride != 1) {
    for (; j < n; ++j) acc[j] += static_cast<acc_type>(row[j * stride]);
    return;
  }
  if constexpr (std::is_same_v<scalar_t, acc_type>) {
    for (; j + AccVec::size() <= n; j += AccVec::size())
      (AccVec::loadu(acc + j) + AccVec::loadu(row + j)).store(acc + j);
  } else {
    using Vec = at::vec::Vectorized<scalar_t>;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Vec::loadu(row + j));
      (AccVec::loadu(acc + j) + lo).store(acc + j);
      (AccVec::loadu(acc + j + AccVec::size()) + hi).store(acc + j + AccVec::size());
    }
  }
  for (; j < n; ++j) acc[j] += static_cast<acc_type>(row[j]);
}

// sum of row[j * stride] for j < n; four vector accumulators for a unit stride.
template <typename scalar_t> acc_t<scalar_t> sum_row(const scalar_t* row, int64_t n, int64_t stride) {
  using acc_type = acc_t<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_type>;
  constexpr int64_t V = AccVec::size();
  acc_type total = 0;
  int64_t j = 0;
  if (stride == 1) {
    auto load = [&](int64_t i) {
      if constexpr (std::is_same_v<scalar_t, acc_type>) {
        return AccVec::loadu(row + i);
      } else {
        return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(row + i, V)));
      }
    };
    AccVec s0(acc_type(0)), s1(acc_type(0)), s2(acc_type(0)), s3(acc_type(0));
    for (; j + 4 * V <= n; j += 4 * V) {
      s0 = s0 + load(j);
      s1 = s1 + load(j + V);
      s2 = s2 + load(j + 2 * V);
      s3 = s3 + load(j + 3 * V);
    }
    for (; j + V <= n; j += V) s0 = s0 + load(j);
    total = at::vec::vec_reduce_all<acc_type>([](const auto& a, const auto& b) { return a + b; }, (s0 + s1) + (s2 + s3));
  }
  for (; j < n; ++j) total += static_cast<acc_type>(row[j * stride]);
  return total;
}

// out[o * n + j] = scale * sum over r of g[off_o + off_r + j * inner_stride], o over `kept`, r over `summed`
// (strides of g in element units; dims of size > 1). out: (kept.numel(), n) contiguous.
// Tasks are (row chunk, o, 2048-column block). Fewer than 8 (o, block) pairs split the rows into chunks of about
// 64K elements (at most 32 chunks), so that every core has work, and the chunks' partial sums are added in chunk
// order: a 1024 x 1024 column sum as one task ran on one core at half torch's speed.
template <typename scalar_t>
void sum_columns(scalar_t* out, const scalar_t* g, const StridedDims<1>& kept, const StridedDims<1>& summed,
                 int64_t n, int64_t inner_stride, acc_t<scalar_t> scale) {
  using acc_type = acc_t<scalar_t>;
  constexpr int64_t kColBlock = 2048;  // 8-16 KB of accumulators: stays in L1
  constexpr int64_t kChunkElements = 65536;
  constexpr int64_t kMaxChunks = 32;
  constexpr int64_t kRowsPerBlock = 128;  // rows summed apart before joining the total: error ~ 128 + rows/128
  const int64_t outer = kept.numel(), rows = summed.numel();
  const int64_t col_blocks = (n + kColBlock - 1) / kColBlock;
  if (outer * n == 0) return;
  if (rows == 0) return std::fill(out, out + outer * n, scalar_t(0));
  const int64_t row_chunks = outer * col_blocks >= 8
                                ? 1
                                : std::clamp<int64_t>(rows * std::min(n, kColBlock) / kChunkElements, 1, kMaxChunks);
  const int64_t chunk_rows = (rows + row_chunks - 1) / row_chunks;
  std::vector<acc_type> partial(row_chunks > 1 ? static_cast<size_t>(row_chunks * outer * n) : 0);

  const int64_t tasks = row_chunks * outer * col_blocks;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * std::min(n, kColBlock)));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    acc_type total[kColBlock], block[kColBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / (outer * col_blocks), o = task / col_blocks % outer;
      const int64_t c0 = (task % col_blocks) * kColBlock, width = std::min(kColBlock, n - c0);
      const int64_t r0 = chunk * chunk_rows, r1 = std::min(rows, r0 + chunk_rows);
      const scalar_t* base = g + DimCounter<1>(kept, o).offset[0] + c0 * inner_stride;
      std::fill(total, total + width, acc_type(0));
      DimCounter<1> r(summed, r0);
      for (int64_t rb = r0; rb < r1; rb += kRowsPerBlock) {
        std::fill(block, block + width, acc_type(0));
        for (int64_t i = rb; i < std::min(r1, rb + kRowsPerBlock); ++i, r.next())
          accumulate_row(block, base + r.offset[0], width, inner_stride);
        for (int64_t j = 0; j < width; ++j) total[j] += block[j];
      }
      if (row_chunks == 1) {
        for (int64_t j = 0; j < width; ++j) out[o * n + c0 + j] = static_cast<scalar_t>(total[j] * scale);
      } else {
        std::copy(total, total + width, partial.data() + (chunk * outer + o) * n + c0);
      }
    }
  });
  if (row_chunks == 1) return;
  at::parallel_for(0, outer * n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_type s = 0;
      for (int64_t chunk = 0; chunk < row_chunks; ++chunk) s += partial[chunk * outer * n + j];
      out[j] = static_cast<scalar_t>(s * scale);
    }
  });
}

// out[o] = scale * sum over r and j < m of g[off_o + off_r + j * inner_stride]: the summed elements of each
// output, ordered (r, j), split into chunks of kChunk elements whose partial sums are added in order.
template <typename scalar_t>
void sum_inner(scalar_t* out, const scalar_t* g, const StridedDims<1>& kept, const StridedDims<1>& summed,
               int64_t m, int64_t inner_stride, acc_t<scalar_t> scale) {
  using acc_type = acc_t<scalar_t>;
  constexpr int64_t kChunk = 32768;
  const int64_t outer = kept.numel(), per_out = summed.numel() * m;
  if (outer == 0) return;
  if (per_out == 0) return std::fill(out, out + outer, scalar_t(0));
  const int64_t chunks = std::max<int64_t>(1, (per_out + kChunk - 1) / kChunk);
  std::vector<acc_type> partial(static_cast<size_t>(outer * chunks), acc_type(0));
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, per_out));
  at::parallel_for(0, outer * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o = task / chunks, e0 = (task % chunks) * kChunk, e1 = std::min(per_out, e0 + kChunk);
      const scalar_t* base = g + DimCounter<1>(kept, o).offset[0];
      DimCounter<1> r(summed, e0 / m);
      acc_type s = 0;
      for (int64_t e = e0, j = e0 % m; e < e1; j = 0, r.next()) {
        const int64_t len = std::min(m - j, e1 - e);
        s += sum_row(base + r.offset[0] + j * inner_stride, len, inner_stride);
        e += len;
      }
      partial[task] = s;
    }
  });
  at::parallel_for(0, outer, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      acc_type s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += partial[o * chunks + c];
      out[o] = static_cast<scalar_t>(s * scale);
    }
  });
}

template <typename scalar_t>
void sum_rows(scalar_t* out, const scalar_t* g, int64_t rows, int64_t cols, int64_t ld, acc_t<scalar_t> scale) {
  StridedDims<1> kept, summed;
  if (rows != 1) summed.push_back(rows, {ld});
  sum_columns(out, g, kept, summed, cols, 1, scale);
}

}  // namespace cpu
}  // namespace pyengine
