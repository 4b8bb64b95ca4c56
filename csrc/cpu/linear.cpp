// linear on the CPU. x: (M, K), weight: (N, K), bias: (N), act: none, relu or sigmoid (common/math.h)
//   y  = act(z), z = x @ weight^T + bias   bias rows written by us, one BLAS GEMM accumulates onto them
//                                          (beta = 1), then act in place over y
//   dz = dy * act'(y)                      from the saved output y; one pass that also sums db
//   dx = dz @ weight               (M, N) @ (N, K)   BLAS
//   dW = dz^T @ x                  (N, M) @ (M, K)   BLAS
//   db = sum over rows of dz       (N)               our column reduction (cpu/reduce.h, or the fused pass)
// Without an activation dz is dy itself. Small layers (cpu/linear_small.h) and layers of one output feature
// (cpu/linear_single_output.h) skip BLAS and do all of it in one pass.
// float32, and float16/bfloat16 on a CPU with dot products for them: the forward is oneDNN's linear with the bias
// and activation applied to its float32 sums (cpu/onednn_linear.h), one call and no pass over y. float16/bfloat16
// on a CPU without them: the three products in float32 on widened copies, each result rounded to the dtype once.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cstring>
#include <tuple>

#include "common/checks.h"
#include "cpu/elementwise.h"
#include "cpu/linear_single_output.h"
#include "cpu/linear_small.h"
#include "cpu/onednn_linear.h"
#include "cpu/reduce.h"
#include "ops.h"

namespace pyengine {
namespace {

void check_linear_operands(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  check(x, "x", op).cpu().floating().dim(2);
  check(weight, "weight", op).dim(2).same_device(x).same_dtype(x);
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x and weight shapes cannot be multiplied (", x.size(0), "x",
              x.size(1), " and ", weight.size(1), "x", weight.size(0), ")");
}

constexpr int64_t kColBlock = 512;       // columns per task of the fused backward pass: its sums stay in L1
constexpr int64_t kRowsPerBlock = 128;   // rows summed apart before joining the total, as cpu::sum_columns
constexpr int64_t kMaxRowChunks = 64;

// dz = dy * act'(y) and db[j] = sum_i dz[i, j] (db may be null), dy, y, dz (M, N) contiguous, in one pass:
// each element of dy and y is read once, dz written once, and dz is summed while still in registers.
// Tasks are (row chunk, 512-column block); the chunks' column sums (acc_t) are added in chunk order, and the
// split depends on the shape alone: the same db on every run and thread count.
template <Activation A, typename scalar_t>
void activation_grad_with_column_sum(scalar_t* dz, scalar_t* db, const scalar_t* dy, const scalar_t* y, int64_t M,
                                     int64_t N) {
  using acc = acc_t<scalar_t>;
  using AccVec = at::vec::Vectorized<acc>;
  constexpr int64_t V = AccVec::size();
  if (N == 0) return;
  const int64_t row_chunks = std::clamp<int64_t>(M / kRowsPerBlock, 1, kMaxRowChunks);
  const int64_t chunk_rows = (M + row_chunks - 1) / row_chunks;
  const int64_t col_blocks = (N + kColBlock - 1) / kColBlock;
  std::vector<acc> partial(db ? static_cast<size_t>(row_chunks * N) : 0);
  at::parallel_for(0, row_chunks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    acc total[kColBlock], block[kColBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / col_blocks, c0 = (task % col_blocks) * kColBlock;
      const int64_t width = std::min(kColBlock, N - c0);
      const int64_t r0 = chunk * chunk_rows, r1 = std::min(M, r0 + chunk_rows);
      std::fill(total, total + width, acc(0));
      for (int64_t rb = r0; rb < r1; rb += kRowsPerBlock) {
        std::fill(block, block + width, acc(0));
        for (int64_t i = rb; i < std::min(r1, rb + kRowsPerBlock); ++i) {
          const int64_t off = i * N + c0;
          int64_t j = 0;
          if constexpr (cpu::is_reduced_float<scalar_t>()) {
            // a whole vector of the half type at once, as its two float halves: load_acc would convert a
            // whole vector for one half (this pass took 1.5x float32's time in bfloat16 that way)
            using Vec = at::vec::Vectorized<scalar_t>;
            static_assert(Vec::size() == 2 * V && at::vec::Vectorized<int16_t>::size() == 2 * V);
            for (; j + 2 * V <= width; j += 2 * V) {
              AccVec g0, g1;
              if constexpr (A == Activation::kRelu) {  // dz is dy's own bits or 0: no rounding (elementwise.h)
                const auto bits = cpu::relu_backward_bits<scalar_t>(cpu::load_bits(dy + off + j),
                                                                    cpu::load_bits(y + off + j));
                cpu::store_bits(dz + off + j, bits);
                std::tie(g0, g1) = at::vec::convert_to_float<scalar_t>(Vec::loadu(dz + off + j));
              } else {
                const auto [dy0, dy1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(dy + off + j));
                const auto [y0, y1] = at::vec::convert_to_float<scalar_t>(Vec::loadu(y + off + j));
                g0 = activation_backward_math<A>(dy0, y0);
                g1 = activation_backward_math<A>(dy1, y1);
                at::vec::convert_from_float<scalar_t>(g0, g1).store(dz + off + j);
              }
              (AccVec::loadu(block + j) + g0).store(block + j);
              (AccVec::loadu(block + j + V) + g1).store(block + j + V);
            }
          }
          for (; j + V <= width; j += V) {
            const AccVec g = activation_backward_math<A>(cpu::load_acc(dy + off + j), cpu::load_acc(y + off + j));
            cpu::store_acc(dz + off + j, g);
            (AccVec::loadu(block + j) + g).store(block + j);
          }
          for (; j < width; ++j) {
            const acc g = activation_backward_math<A>(static_cast<acc>(dy[off + j]), static_cast<acc>(y[off + j]));
            dz[off + j] = static_cast<scalar_t>(g);
            block[j] += g;
          }
        }
        for (int64_t j = 0; j < width; ++j) total[j] += block[j];
      }
      if (db) std::copy(total, total + width, partial.data() + chunk * N + c0);
    }
  });
  if (!db) return;
  for (int64_t j = 0; j < N; ++j) {
    acc s = 0;
    for (int64_t chunk = 0; chunk < row_chunks; ++chunk) s += partial[chunk * N + j];
    db[j] = static_cast<scalar_t>(s);
  }
}

}  // namespace

at::Tensor linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              int64_t activation) {
  check_linear_operands(x, weight, "linear_forward_cpu");
  const Activation act = check_activation(activation, "linear_forward_cpu");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check(*bias, "bias", "linear_forward_cpu").same_device(x).same_dtype(x).sizes({N});
  const bool small = cpu::use_small_linear(M, N, K), single_output = N == 1 && !small;
  if (!small && !single_output && half_gemm_widens(x)) {
    // A CPU with no fast product for the half dtype (common/half_gemm.h) emulates it: 1024x512->512 in bfloat16 took
    // 9.1 ms on an Intel Xeon without avx512_bf16, float32 1.8 ms. The product, bias and activation then run in
    // float32 on widened copies, rounded to the dtype once, as fused_mlp and linear_cross_entropy do.
    const at::Tensor b = has_bias ? bias->to(at::kFloat) : at::Tensor();
    return linear_forward_cpu(x.to(at::kFloat), weight.to(at::kFloat), b, activation).to(x.scalar_type());
  }
  if (!small && !single_output) {
    if (at::Tensor fused = cpu::onednn_linear(x, weight, bias, act); fused.defined()) return fused;
  }
  at::Tensor y = cpu::empty_output({M, N}, x.options());
  if (small || single_output) {
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), b = has_bias ? bias->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_forward_cpu", [&] {
      dispatch_activation(act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        scalar_t* out = y.data_ptr<scalar_t>();
        const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *wp = wc.const_data_ptr<scalar_t>();
        const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
        if (small) {
          cpu::small_linear_forward<A>(out, xp, wp, bp, M, N, K);
        } else {
          cpu::single_output_linear_forward<A>(out, xp, wp, bp, M, K);
        }
      });
    });
    return y;
  }
  if (!has_bias) {
    at::mm_out(y, x, weight.t());
  } else {
    const at::Tensor b = bias->contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_forward_cpu", [&] {
      const scalar_t* src = b.const_data_ptr<scalar_t>();
      scalar_t* dst = y.data_ptr<scalar_t>();
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * N, src, sizeof(scalar_t) * N);
      });
    });
    at::addmm_out(y, y, x, weight.t());
  }
  if (act == Activation::kNone) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_forward_cpu", [&] {
    scalar_t* p = y.data_ptr<scalar_t>();
    dispatch_activation(act, [&](auto a) {
      cpu::map_contiguous(p, p, y.numel(), [](auto z) { return activation_forward_math<decltype(a)::value>(z); });
    });
  });
  return y;
}

std::vector<at::Tensor> linear_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight,
                                            bool need_x, bool need_weight, bool need_bias, int64_t activation,
                                            const c10::optional<at::Tensor>& y_saved) {
  check_linear_operands(x, weight, "linear_backward_cpu");
  const int64_t M = x.size(0), N = weight.size(0);
  check(grad_y_in, "grad_y", "linear_backward_cpu").same_device(x).same_dtype(x).sizes({M, N});
  const Activation act = check_activation(activation, "linear_backward_cpu");
  at::Tensor grad_z = grad_y_in.contiguous();
  at::Tensor grad_x, grad_weight, grad_bias;
  if (need_bias) grad_bias = at::empty({N}, grad_z.options());
  at::Tensor y;
  if (act != Activation::kNone) {
    TORCH_CHECK(y_saved.has_value() && y_saved->defined(), "linear_backward_cpu: an activation needs the saved y");
    check(*y_saved, "y", "linear_backward_cpu").same_device(x).same_dtype(x).sizes({M, N});
    y = y_saved->contiguous();
  }
  const bool small = cpu::use_small_linear(M, N, x.size(1));
  if (small || N == 1) {
    const int64_t K = x.size(1);
    const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
    if (need_x) grad_x = cpu::empty_output({M, K}, x.options());
    if (need_weight) grad_weight = cpu::empty_output({N, K}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_backward_cpu", [&] {
      dispatch_activation(act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        scalar_t* dx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
        scalar_t* dw = need_weight ? grad_weight.data_ptr<scalar_t>() : nullptr;
        scalar_t* db = need_bias ? grad_bias.data_ptr<scalar_t>() : nullptr;
        const scalar_t* dy = grad_z.const_data_ptr<scalar_t>();
        const scalar_t* yp = y.defined() ? y.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t *xp = xc.const_data_ptr<scalar_t>(), *wp = wc.const_data_ptr<scalar_t>();
        if (small) {
          cpu::small_linear_backward<A>(dx, dw, db, dy, yp, xp, wp, M, N, K);
        } else {
          cpu::single_output_linear_backward<A>(dx, dw, db, dy, yp, xp, wp, M, K);
        }
      });
    });
    return {grad_x, grad_weight, grad_bias};
  }
  if (act != Activation::kNone) {
    const at::Tensor grad_y = grad_z;
    grad_z = cpu::empty_output({M, N}, grad_y.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_backward_cpu", [&] {
      dispatch_activation(act, [&](auto a) {
        activation_grad_with_column_sum<decltype(a)::value>(
            grad_z.data_ptr<scalar_t>(), need_bias ? grad_bias.data_ptr<scalar_t>() : nullptr,
            grad_y.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), M, N);
      });
    });
  } else if (need_bias) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_backward_cpu", [&] {
      cpu::sum_rows(grad_bias.data_ptr<scalar_t>(), grad_z.const_data_ptr<scalar_t>(), M, N, N, acc_t<scalar_t>(1));
    });
  }
  const int64_t K = x.size(1);
  // The products in float32 from widened copies where the forward's ran so, each rounded to the dtype once.
  const bool widen = half_gemm_widens(x);
  const at::Tensor gz = widen ? grad_z.to(at::kFloat) : grad_z;
  if (need_x) {
    grad_x = cpu::empty_output({M, K}, x.options());
    if (widen) grad_x.copy_(at::mm(gz, weight.to(at::kFloat))); else at::mm_out(grad_x, grad_z, weight);
  }
  if (need_weight) {
    grad_weight = cpu::empty_output({N, K}, x.options());
    if (widen) grad_weight.copy_(at::mm(gz.t(), x.to(at::kFloat))); else at::mm_out(grad_weight, grad_z.t(), x);
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace pyengine
