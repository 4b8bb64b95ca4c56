// The host side of linear_cross_entropy, shared by the CPU and CUDA kernels: argument checks and the loop
// over chunks of rows. x (N, H), weight W (V, H), bias b (V) or none, target t (N) int64. Per chunk of R rows
//   logits = x_chunk W^T + b           (R, V) in the accumulation type (float for float/half/bfloat16)
//   rows(logits): lse, loss per row and, when gradients are wanted, dlogits = p - y' written over the logits
//   dx_chunk = dlogits W,  dW += dlogits^T x_chunk,  db += sum over rows of dlogits
// so the (N, V) logits never exist whole: R follows a byte budget for the chunk's logits, independent of the
// thread count, so results are the same on any machine. The per-row pass is the device's own (rows_fn). The
// GEMMs run in the accumulation type: half/bfloat16 x and W are widened once (W) or per chunk (x), and dW, db
// accumulate in float32.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"

namespace pyengine {

// What the row pass does to one chunk of logits.
enum class LceMode {
  Loss,         // lse, loss and kept (1 for a kept row, 0 for an ignored one) per row
  LossAndGrad,  // the same, then logits := p - y' (the gradient of the row's loss, unscaled)
  GradFromLse,  // logits := g (p - y') from the saved lse and the per-row incoming gradient g
};

// The row pass over logits (R, V) contiguous in the accumulation type; target (R) int64; lse, loss, kept and
// g are (R) slices in the accumulation type (g undefined unless GradFromLse).
using LceRowsFn = void (*)(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse,
                           const at::Tensor& loss, const at::Tensor& kept, const at::Tensor& g, LceMode mode,
                           int64_t ignore_index, double eps);

struct LceArgs {
  int64_t N, H, V, ignore_index;
  double eps;
  bool need_x, need_weight, need_bias;
  int64_t chunk_rows;
};

inline at::ScalarType lce_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline LceArgs check_linear_cross_entropy_args(const at::Tensor& x, const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                               int64_t ignore_index, double label_smoothing, bool need_x,
                                               bool need_weight, bool need_bias, int64_t chunk_bytes, bool cuda,
                                               const char* op) {
  auto xc = check(x, "x", op);
  if (cuda) xc.cuda(); else xc.cpu();
  xc.floating().dim(2);
  const int64_t N = x.size(0), H = x.size(1), V = weight.dim() == 2 ? weight.size(0) : -1;
  check(weight, "weight", op).same_device(x).same_dtype(x).dim(2).sizes({V, H});
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check(*bias, "bias", op).same_device(x).same_dtype(x).sizes({V});
  check(target, "target", op).same_device(x).dtype(at::kLong).sizes({N}).contiguous();
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be positive, got ", chunk_bytes);
  const int64_t row_bytes = std::max<int64_t>(V, 1) * static_cast<int64_t>(c10::elementSize(lce_acc_dtype(x)));
  const int64_t rows = std::clamp<int64_t>(chunk_bytes / row_bytes, 1, std::max<int64_t>(N, 1));
  return {N, H, V, ignore_index, std::max(label_smoothing, 0.0), need_x, need_weight, need_bias && has_bias, rows};
}

// The chunk loop. Loss and LossAndGrad fill lse, loss and kept (N); GradFromLse reads lse and g (N). dx (N, H),
// dw (V, H) and db (V) are the accumulation-type gradients of sum_r g_r loss_r (g = 1 unless GradFromLse),
// written where defined (dw and db start at zero).
inline void linear_cross_entropy_chunks(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                        const LceArgs& a, LceMode mode, LceRowsFn rows_fn, const at::Tensor& lse,
                                        const at::Tensor& loss, const at::Tensor& kept, const at::Tensor& g,
                                        const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db) {
  const at::ScalarType acc = lce_acc_dtype(x);
  const at::Tensor w = weight.to(acc);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->to(acc) : at::Tensor();
  const bool grad = mode != LceMode::Loss;
  at::Tensor buffer = at::empty({a.chunk_rows * a.V}, x.options().dtype(acc));
  for (int64_t r0 = 0; r0 < a.N; r0 += a.chunk_rows) {
    const int64_t n = std::min(a.chunk_rows, a.N - r0);
    const at::Tensor xc = x.narrow(0, r0, n).to(acc);
    at::Tensor logits = buffer.narrow(0, 0, n * a.V).view({n, a.V});
    if (has_bias) at::addmm_out(logits, b, xc, w.t()); else at::mm_out(logits, xc, w.t());
    rows_fn(logits, target.narrow(0, r0, n), lse.narrow(0, r0, n), loss.defined() ? loss.narrow(0, r0, n) : loss,
            kept.defined() ? kept.narrow(0, r0, n) : kept, g.defined() ? g.narrow(0, r0, n) : g, mode,
            a.ignore_index, a.eps);
    if (!grad) continue;
    if (dx.defined()) {
      at::Tensor dx_chunk = dx.narrow(0, r0, n);
      at::mm_out(dx_chunk, logits, w);
    }
    if (dw.defined()) dw.addmm_(logits.t(), xc);
    if (db.defined()) db.add_(logits.sum(0));
  }
}

// The gradient outputs for the flags of a (undefined where not wanted), in the accumulation type.
inline std::vector<at::Tensor> lce_grad_buffers(const at::Tensor& x, const LceArgs& a) {
  const auto opts = x.options().dtype(lce_acc_dtype(x));
  return {a.need_x ? at::empty({a.N, a.H}, opts) : at::Tensor(),
          a.need_weight ? at::zeros({a.V, a.H}, opts) : at::Tensor(),
          a.need_bias ? at::zeros({a.V}, opts) : at::Tensor()};
}

// forward: {loss ((N) or 0-dim, x's dtype), lse (N), denom (0-dim: the count of kept rows), dx, dw, db}.
// With reduction mean or sum and any need_* flag the gradients of the summed loss come out of the same pass.
inline std::vector<at::Tensor> linear_cross_entropy_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& target, const LceArgs& a,
                                                                 Reduction reduction, LceRowsFn rows_fn) {
  const auto opts = x.options().dtype(lce_acc_dtype(x));
  at::Tensor lse = at::empty({a.N}, opts), rows = at::empty({a.N}, opts), kept = at::empty({a.N}, opts);
  const bool grad = reduction != Reduction::None && (a.need_x || a.need_weight || a.need_bias);
  std::vector<at::Tensor> d = grad ? lce_grad_buffers(x, a) : std::vector<at::Tensor>(3);
  linear_cross_entropy_chunks(x, weight, bias, target, a, grad ? LceMode::LossAndGrad : LceMode::Loss, rows_fn,
                              lse, rows, kept, at::Tensor(), d[0], d[1], d[2]);
  // Sums on the device: the mean's divisor is never read by the host. No kept row: 0 / 0 = NaN, as torch.
  at::Tensor denom = kept.sum();
  at::Tensor loss = reduction == Reduction::None ? rows
                    : reduction == Reduction::Sum ? rows.sum()
                                                  : at::div(rows.sum(), denom);
  return {loss.to(x.scalar_type()), lse, denom, d[0], d[1], d[2]};
}

// backward of reduction none: the logits of each chunk are computed again and turned into g (p - y').
inline std::vector<at::Tensor> linear_cross_entropy_backward_impl(const at::Tensor& grad_loss, const at::Tensor& x,
                                                                  const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  const at::Tensor& target, const at::Tensor& lse,
                                                                  const LceArgs& a, LceRowsFn rows_fn,
                                                                  const char* op) {
  const at::ScalarType acc = lce_acc_dtype(x);
  check(grad_loss, "grad_loss", op).same_device(x).dtype(acc).sizes({a.N}).contiguous();
  check(lse, "lse", op).same_device(x).dtype(acc).sizes({a.N}).contiguous();
  std::vector<at::Tensor> d = lce_grad_buffers(x, a);
  if (d[0].defined() || d[1].defined() || d[2].defined())
    linear_cross_entropy_chunks(x, weight, bias, target, a, LceMode::GradFromLse, rows_fn, lse, at::Tensor(),
                                at::Tensor(), grad_loss, d[0], d[1], d[2]);
  return d;
}

}  // namespace pyengine
