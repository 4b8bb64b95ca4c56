// linear_cross_entropy on the CPU: cross_entropy(x W^T + b, t) over chunks of rows, so the (N, V) logits never
// exist whole (the chunk loop and its GEMMs: common/linear_cross_entropy_chunks.h). Per row r of a chunk of
// logits z (V) in the GEMM dtype, computed in float/double, class target t_r (ignored rows: loss 0, gradient
// 0), smoothing eps:
//   lse = log sum_c exp(z_c),  loss = (1 - eps)(lse - z_t) + eps / V sum_c (lse - z_c)
//   dz_c = g (p_c - (1 - eps) [c == t] - eps / V),  p = exp(z - lse)          written over z, in place
// The row kernels are cross_entropy's (cpu/cross_entropy_rows.h) on a (R, V, 1) view of the chunk; the row
// stays in the cache between the pass that finds lse and the one that writes dz. With half-precision GEMMs the
// chunk's dW product and dz's column sums join float32 sums through add_cpu and add_column_sums_cpu.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/linear_cross_entropy_chunks.h"
#include "cpu/allocator.h"
#include "cpu/cross_entropy_rows.h"
#include "cpu/linear_small.h"
#include "cpu/onednn_linear.h"
#include "cpu/reduce.h"
#include "ops.h"

namespace pyengine {
namespace {

// logits (R, V) of any floating dtype, in place; lse, loss, kept, g in its accumulation type; see LceMode for
// what is read and written.
void linear_cross_entropy_rows_cpu(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                                   const at::Tensor& loss, const at::Tensor& kept, const at::Tensor& g, LceMode mode,
                                   int64_t ignore_index, double eps) {
  const int64_t R = logits.size(0), V = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "linear_cross_entropy_rows_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(false, eps, [&](auto kind) {
      using Op = CrossEntropyCpu<scalar_t, decltype(kind)::value>;
      scalar_t* z = logits.data_ptr<scalar_t>();
      const Op op{z, target.const_data_ptr<int64_t>(), nullptr, nullptr, V, 1, ignore_index,
                  static_cast<acc>(eps), static_cast<acc>(V)};
      acc* lse_p = lse.data_ptr<acc>();
      acc* loss_p = mode == LceMode::GradFromLse ? nullptr : loss.data_ptr<acc>();
      acc* kept_p = mode == LceMode::GradFromLse ? nullptr : kept.data_ptr<acc>();
      const acc* g_p = mode == LceMode::GradFromLse ? g.const_data_ptr<acc>() : nullptr;
      if (mode == LceMode::GradFromLse) {
        at::parallel_for(0, R, grain_for(V), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) op.backward_row(r, g_p[r], lse_p[r], z + r * V, false);
        });
        return;
      }
      // forward_rows, as cross_entropy's: up to 16 classes a row per vector lane (the notes' 10 classes were
      // 5x slower a row at a time, the cost of merging a row's lanes).
      const bool grad = mode == LceMode::LossAndGrad;
      op.forward_rows(R, grain_for(V), lse_p, loss_p, kept_p, [&](int64_t r) {
        if (grad) op.backward_row(r, acc(1), lse_p[r], z + r * V, false);
      });
    });
  });
}

// sum (float) += part (half/bfloat16), elementwise over the same number of contiguous elements.
void add_cpu(const at::Tensor& sum, const at::Tensor& part) {
  AT_DISPATCH_REDUCED_FLOATING_TYPES(part.scalar_type(), "linear_cross_entropy_add_cpu", [&] {
    float* s = sum.data_ptr<float>();
    const scalar_t* p = part.const_data_ptr<scalar_t>();
    at::parallel_for(0, part.numel(), 32768, [&](int64_t i0, int64_t i1) {
      cpu::accumulate_row(s + i0, p + i0, i1 - i0);
    });
  });
}

// sum (V, float) += the column sums of part (R, V, half/bfloat16). Each task owns a block of columns and adds
// the rows in order: the same sums on any number of threads.
void add_column_sums_cpu(const at::Tensor& sum, const at::Tensor& part) {
  constexpr int64_t kCols = 1024;  // a block's float sums stay in L1 while the rows stream past
  const int64_t R = part.size(0), V = part.size(1);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(part.scalar_type(), "linear_cross_entropy_add_column_sums_cpu", [&] {
    float* s = sum.data_ptr<float>();
    const scalar_t* p = part.const_data_ptr<scalar_t>();
    at::parallel_for(0, (V + kCols - 1) / kCols, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0 * kCols; c0 < std::min(V, b1 * kCols); c0 += kCols) {
        const int64_t width = std::min(kCols, V - c0);
        for (int64_t r = 0; r < R; ++r) cpu::accumulate_row(s + c0, p + r * V + c0, width);
      }
    });
  });
}

// oneDNN's linear: 1.4-1.5x MKL's sgemm for a chunk's x W^T (a short x against a tall W) in float32 here
at::Tensor onednn_logits(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return cpu::onednn_linear(x, w, b.defined() ? c10::optional<at::Tensor>(b) : c10::nullopt);
}

constexpr LceKernels kLceCpu{cpu::empty_output, linear_cross_entropy_rows_cpu, add_cpu, add_column_sums_cpu,
                             onednn_logits};

// A layer small enough for linear's one-pass kernels (cpu/linear_small.h: widths up to 64, at most 64K
// multiply-adds): the whole batch is one chunk, and its three products run in those kernels instead of three BLAS
// calls, each ~10 us of fixed work where the notes' 759 x 8 -> 10 layer needs ~1 us of arithmetic. Then logits
// (N, V) = linear(x), the row pass over them, and {dx, dW, db} = linear's backward of dz. float16/bfloat16 operands
// are converted to float32 first (at most 64K elements each: cheaper than the chunk loop's fixed work), so
// everything runs in the accumulation type, as the chunk loop keeps its logits and gradients; the backward of
// reduction none recomputes the logits the same way, so that they match the forward's lse.
bool use_small_path(const LceArgs& a) { return cpu::use_small_linear(a.N, a.V, a.H); }

struct SmallOperands {
  at::Tensor x, weight;
  c10::optional<at::Tensor> bias;
  at::Tensor logits;  // x weight^T + bias (N, V), in the accumulation type
};
SmallOperands small_logits(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const auto acc = lce_acc_dtype(x);
  const at::Tensor x_acc = x.to(acc), weight_acc = weight.to(acc);
  const c10::optional<at::Tensor> bias_acc =
      bias.has_value() && bias->defined() ? c10::optional<at::Tensor>(bias->to(acc)) : c10::nullopt;
  return {x_acc, weight_acc, bias_acc, linear_forward_cpu(x_acc, weight_acc, bias_acc, /*activation=*/0)};
}

std::vector<at::Tensor> small_forward(const at::Tensor& x, const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                      const LceArgs& a, Reduction reduction) {
  const SmallOperands s = small_logits(x, weight, bias);
  const LceRowBuffers r = lce_row_buffers(x, a);
  const bool grad = lce_forward_computes_grad(a, reduction);
  linear_cross_entropy_rows_cpu(s.logits, target, r.lse, r.rows, r.kept, at::Tensor(),
                                grad ? LceMode::LossAndGrad : LceMode::Loss, a.ignore_index, a.eps);
  std::vector<at::Tensor> d(3);
  if (grad) d = linear_backward_cpu(s.logits, s.x, s.weight, a.need_x, a.need_weight, a.need_bias, 0, c10::nullopt);
  return lce_forward_outputs(x, r.lse, r.rows, r.kept, reduction, d);
}

std::vector<at::Tensor> small_backward(const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                       const at::Tensor& lse, const LceArgs& a) {
  if (!a.need_x && !a.need_weight && !a.need_bias) return std::vector<at::Tensor>(3);
  const SmallOperands s = small_logits(x, weight, bias);
  linear_cross_entropy_rows_cpu(s.logits, target, lse, at::Tensor(), at::Tensor(), grad_loss, LceMode::GradFromLse,
                                a.ignore_index, a.eps);
  return linear_backward_cpu(s.logits, s.x, s.weight, a.need_x, a.need_weight, a.need_bias, 0, c10::nullopt);
}

}  // namespace

// x (N, H), weight (V, H), bias (V), target (N) -> {loss, lse (N), denom, dx (N, H), dweight (V, H), dbias (V)}
std::vector<at::Tensor> linear_cross_entropy_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                         const c10::optional<at::Tensor>& bias,
                                                         const at::Tensor& target, int64_t ignore_index,
                                                         int64_t reduction, double label_smoothing, bool need_x,
                                                         bool need_weight, bool need_bias, int64_t chunk_bytes) {
  const char* op = "linear_cross_entropy_forward_cpu";
  const Reduction red = check_reduction(reduction, op);
  const LceArgs a = check_linear_cross_entropy_args(x, weight, bias, target, ignore_index, label_smoothing, need_x,
                                                    need_weight, need_bias, chunk_bytes, false, op);
  if (use_small_path(a)) return small_forward(x, weight, bias, target, a, red);
  return linear_cross_entropy_forward_impl(x, weight, bias, target, a, red, kLceCpu);
}

// grad_loss (N) -> {dx (N, H), dweight (V, H), dbias (V)} = the gradients of sum_r grad_loss_r loss_r
std::vector<at::Tensor> linear_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x,
                                                          const at::Tensor& weight,
                                                          const c10::optional<at::Tensor>& bias,
                                                          const at::Tensor& target, const at::Tensor& lse,
                                                          int64_t ignore_index, double label_smoothing, bool need_x,
                                                          bool need_weight, bool need_bias, int64_t chunk_bytes) {
  const char* op = "linear_cross_entropy_backward_cpu";
  const LceArgs a = check_linear_cross_entropy_args(x, weight, bias, target, ignore_index, label_smoothing, need_x,
                                                    need_weight, need_bias, chunk_bytes, false, op);
  if (use_small_path(a)) {
    check_lce_backward_operands(grad_loss, lse, x, a, op);
    return small_backward(grad_loss, x, weight, bias, target, lse, a);
  }
  return linear_cross_entropy_backward_impl(grad_loss, x, weight, bias, target, lse, a, kLceCpu, op);
}

}  // namespace pyengine
