// Sums over rows on the CPU, accumulating in acc_t (float for half/bfloat16, double for double):
//   out[j] = scale * sum_i g[i * ld + j],  g: (rows, cols) with row stride ld.
// Used by linear's bias gradient and broadcast add's backward. The split into row chunks depends on the
// shape alone, never on the thread count, so the result is the same on every run and every machine.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/vec_math.h"

namespace pyengine {
namespace cpu {

// acc[j] += row[j] for j < n.
template <typename scalar_t> void accumulate_row(acc_t<scalar_t>* acc, const scalar_t* row, int64_t n) {
  using acc_type = acc_t<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_type>;
  int64_t j = 0;
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

template <typename scalar_t>
void sum_rows(scalar_t* out, const scalar_t* g, int64_t rows, int64_t cols, int64_t ld, acc_t<scalar_t> scale) {
  using acc_type = acc_t<scalar_t>;
  constexpr int64_t kColBlock = 512;     // 2-4 KB of accumulators: stays in L1
  constexpr int64_t kRowsPerChunk = 2048;
  constexpr int64_t kMaxChunks = 32;
  const int64_t col_blocks = (cols + kColBlock - 1) / kColBlock;
  // Few column blocks (a narrow output) need the rows split too, so that every core has work.
  const int64_t row_chunks = col_blocks >= 8 ? 1 : std::clamp<int64_t>(rows / kRowsPerChunk, 1, kMaxChunks);
  const int64_t chunk_rows = (rows + row_chunks - 1) / std::max<int64_t>(row_chunks, 1);
  std::vector<acc_type> partial(static_cast<size_t>(row_chunks * cols), acc_type(0));

  at::parallel_for(0, row_chunks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / col_blocks, c0 = (task % col_blocks) * kColBlock;
      const int64_t width = std::min(kColBlock, cols - c0);
      acc_type* acc = partial.data() + chunk * cols + c0;
      const int64_t r_end = std::min(rows, (chunk + 1) * chunk_rows);
      for (int64_t r = chunk * chunk_rows; r < r_end; ++r) accumulate_row(acc, g + r * ld + c0, width);
    }
  });
  at::parallel_for(0, cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_type s = 0;
      for (int64_t chunk = 0; chunk < row_chunks; ++chunk) s += partial[chunk * cols + j];
      out[j] = static_cast<scalar_t>(s * scale);
    }
  });
}

}  // namespace cpu
}  // namespace pyengine
