// The host side of linear_cross_entropy, shared by the CPU and CUDA kernels: argument checks and the loop
// over chunks of rows. x (N, H), weight W (V, H), bias b (V) or none, target t (N) int64. Per chunk of R rows
//   logits = x_chunk W^T + b           (R, V) in the GEMM dtype (below)
//   rows(logits): lse, loss per row and, when gradients are wanted, dlogits = p - y' written over the logits
//   dx_chunk = dlogits W,  dW += dlogits^T x_chunk,  db += sum over rows of dlogits
// so the (N, V) logits never exist whole: R follows a byte budget for the chunk's logits counted in the
// accumulation type (float for float/half/bfloat16), independent of the thread count, so results are the same
// on any number of threads. The per-row pass is the device's own (LceKernels::rows) and computes in the
// accumulation type whatever the logits' dtype.
// The GEMM dtype: float16/bfloat16 x and W are multiplied in their own dtype where the device does that faster
// than float32 (common/half_gemm.h; cuBLAS and oneDNN accumulate in float32 inside): the logits and dlogits of
// a chunk are then half-precision, as torch's unfused pair has them, and dx's and dW's chunk products are
// rounded to it once before joining float32 sums. Elsewhere, and always for float32/float64, the GEMMs run in
// the accumulation type: half x and W are widened once (W) or per chunk (x). dW and db accumulate across
// chunks in the accumulation type either way and are rounded to x's dtype once, by the caller.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eq.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "common/half_gemm.h"

namespace pyengine {

inline at::ScalarType lce_acc_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// What the row pass does to one chunk of logits.
enum class LceMode {
  Loss,         // lse, loss and kept (1 for a kept row, 0 for an ignored one) per row
  LossAndGrad,  // the same, then logits := p - y' (the gradient of the row's loss, unscaled)
  GradFromLse,  // logits := g (p - y') from the saved lse and the per-row incoming gradient g
};

// What each device provides to the chunk loop.
struct LceKernels {
  // An uninitialized contiguous tensor (the CPU's output cache, csrc/cpu/allocator.h: a fresh 100 MB block costs
  // its page faults on every call)
  at::Tensor (*empty)(at::IntArrayRef shape, const at::TensorOptions& options);
  // The row pass over logits (R, V) contiguous in the GEMM dtype, computed in the accumulation type; target (R)
  // int64; lse, loss, kept and g are (R) slices in the accumulation type (g undefined unless GradFromLse).
  void (*rows)(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& lse, const at::Tensor& loss,
               const at::Tensor& kept, const at::Tensor& g, LceMode mode, int64_t ignore_index, double eps);
  // Half-precision GEMMs only: sum += part (same shape, contiguous), and sum (V) += the column sums of
  // part (R, V), in the accumulation type (torch's mixed-dtype add_ and sum(dtype=) run a scalar loop on the CPU).
  void (*add)(const at::Tensor& sum, const at::Tensor& part);
  void (*add_column_sums)(const at::Tensor& sum, const at::Tensor& part);
  // Optional (nullptr: none): a chunk's logits x W^T + b (b undefined: no bias) as a new contiguous tensor, from
  // a product faster than at::addmm's on the device, or undefined where it does not run; the loop then writes
  // them into its own buffer with at::addmm.
  at::Tensor (*logits)(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);
};

// The dtype the chunk GEMMs run in (see the top of this file).
inline at::ScalarType lce_gemm_dtype(const at::Tensor& x) {
  return fast_half_gemm(x) ? x.scalar_type() : lce_acc_dtype(x);
}

struct LceArgs {
  int64_t N, H, V, ignore_index;
  double eps;
  bool need_x, need_weight, need_bias;
  int64_t chunk_rows;
};

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
  // whole panels of 16 rows where the budget holds more (the GEMMs block their rows by 8-16; the LM head's
  // 16 MiB then holds 128 rows of 32000 logits, not 131)
  int64_t rows = chunk_bytes / row_bytes;
  if (rows > 16) rows -= rows % 16;
  rows = std::clamp<int64_t>(rows, 1, std::max<int64_t>(N, 1));
  return {N, H, V, ignore_index, std::max(label_smoothing, 0.0), need_x, need_weight, need_bias && has_bias, rows};
}

// The chunk loop. Loss and LossAndGrad fill lse, loss and kept (N); GradFromLse reads lse and g (N). dx (N, H),
// dw (V, H) and db (V) are the accumulation-type gradients of sum_r g_r loss_r (g = 1 unless GradFromLse),
// written where defined (db starts at zero, and dw too unless the GEMMs are half-precision and N > 0).
inline void linear_cross_entropy_chunks(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, const at::Tensor& target,
                                        const LceArgs& a, LceMode mode, const LceKernels& k, const at::Tensor& lse,
                                        const at::Tensor& loss, const at::Tensor& kept, const at::Tensor& g,
                                        const at::Tensor& dx, const at::Tensor& dw, const at::Tensor& db) {
  const at::ScalarType gemm = lce_gemm_dtype(x);
  const bool half = gemm != lce_acc_dtype(x);  // half-precision products, summed in float32 below
  const at::Tensor w = weight.to(gemm);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->to(gemm) : at::Tensor();
  const bool grad = mode != LceMode::Loss;
  const auto opts = x.options().dtype(gemm);
  at::Tensor buffer;  // for at::addmm's logits, allocated at the first chunk that needs it
  // A chunk's dx and dW products in the half dtype, reused by every chunk
  const at::Tensor dx_part = half && grad && dx.defined() ? k.empty({a.chunk_rows, a.H}, opts) : at::Tensor();
  const at::Tensor dw_part = half && grad && dw.defined() ? k.empty({a.V, a.H}, opts) : at::Tensor();
  for (int64_t r0 = 0; r0 < a.N; r0 += a.chunk_rows) {
    const int64_t n = std::min(a.chunk_rows, a.N - r0);
    const at::Tensor xc = x.narrow(0, r0, n).to(gemm);
    at::Tensor logits = k.logits != nullptr ? k.logits(xc, w, b) : at::Tensor();
    if (!logits.defined()) {
      if (!buffer.defined()) buffer = k.empty({a.chunk_rows * a.V}, opts);
      logits = buffer.narrow(0, 0, n * a.V).view({n, a.V});
      if (has_bias) at::addmm_out(logits, b, xc, w.t()); else at::mm_out(logits, xc, w.t());
    }
    k.rows(logits, target.narrow(0, r0, n), lse.narrow(0, r0, n), loss.defined() ? loss.narrow(0, r0, n) : loss,
           kept.defined() ? kept.narrow(0, r0, n) : kept, g.defined() ? g.narrow(0, r0, n) : g, mode,
           a.ignore_index, a.eps);
    if (!grad) continue;
    if (dx.defined()) {
      at::Tensor dx_chunk = dx.narrow(0, r0, n);
      if (half) {
        at::Tensor part = dx_part.narrow(0, 0, n);
        dx_chunk.copy_(at::mm_out(part, logits, w));
      } else {
        at::mm_out(dx_chunk, logits, w);
      }
    }
    if (dw.defined()) {
      if (half) {
        at::Tensor part = dw_part;
        at::mm_out(part, logits.t(), xc);
        if (r0 == 0) dw.copy_(part); else k.add(dw, part);  // dw starts uninitialized (lce_grad_buffers)
      } else {
        dw.addmm_(logits.t(), xc);
      }
    }
    if (db.defined()) {
      if (half) k.add_column_sums(db, logits); else db.add_(logits.sum(0));
    }
  }
}

// The gradient outputs for the flags of a (undefined where not wanted), in the accumulation type. dW sums the
// chunks' products from zero, except where the first chunk's half-precision product is copied in.
inline std::vector<at::Tensor> lce_grad_buffers(const at::Tensor& x, const LceArgs& a, const LceKernels& k) {
  const auto opts = x.options().dtype(lce_acc_dtype(x));
  at::Tensor dw;
  if (a.need_weight) {
    dw = k.empty({a.V, a.H}, opts);
    if (lce_gemm_dtype(x) == lce_acc_dtype(x) || a.N == 0) dw.zero_();
  }
  return {a.need_x ? k.empty({a.N, a.H}, opts) : at::Tensor(), dw, a.need_bias ? at::zeros({a.V}, opts) : at::Tensor()};
}

// The row pass's outputs, N each in the accumulation type: log-sum-exp, loss and kept flag (1, 0 where ignored).
struct LceRowBuffers {
  at::Tensor lse, rows, kept;
};
inline LceRowBuffers lce_row_buffers(const at::Tensor& x, const LceArgs& a) {
  const auto opts = x.options().dtype(lce_acc_dtype(x));
  return {at::empty({a.N}, opts), at::empty({a.N}, opts), at::empty({a.N}, opts)};
}
// Whether the forward computes the gradients too: a reduced loss with any of them wanted.
inline bool lce_forward_computes_grad(const LceArgs& a, Reduction reduction) {
  return reduction != Reduction::None && (a.need_x || a.need_weight || a.need_bias);
}

// d /= denom (the count of kept rows), in place: the summed loss's gradients become the mean's. No kept row: d is
// all zeros and stays so (torch's gradient of that NaN mean). On the CPU the count is read as one number (one
// multiply an element); on a GPU reading it would wait for the device, so the reciprocal stays there.
inline void divide_by_kept_rows(const std::vector<at::Tensor>& d, const at::Tensor& denom) {
  if (denom.is_cpu()) {
    const double kept = denom.item<double>();
    for (const at::Tensor& g : d) {
      if (g.defined() && kept != 0) g.mul_(1.0 / kept);
    }
    return;
  }
  const at::Tensor scale = at::where(at::eq(denom, 0), at::ones_like(denom), denom).reciprocal();
  for (const at::Tensor& g : d) {
    if (g.defined()) g.mul_(scale);
  }
}

// The forward's outputs from the row pass's lse, per-row loss and kept flags (N) and the gradients d (3) of the
// summed loss: {loss ((N) or 0-dim, x's dtype), lse, denom (0-dim: the count of kept rows), dx, dw, db}, the
// gradients now those of the loss returned (the mean's divided here, in place: no second weight-sized tensor).
inline std::vector<at::Tensor> lce_forward_outputs(const at::Tensor& x, const at::Tensor& lse, const at::Tensor& rows,
                                                   const at::Tensor& kept, Reduction reduction,
                                                   const std::vector<at::Tensor>& d) {
  // Sums on the device: the mean's divisor is never read by the host. No kept row: 0 / 0 = NaN, as torch.
  at::Tensor denom = kept.sum();
  at::Tensor loss = reduction == Reduction::None ? rows
                    : reduction == Reduction::Sum ? rows.sum()
                                                  : at::div(rows.sum(), denom);
  if (reduction == Reduction::Mean) divide_by_kept_rows(d, denom);
  return {loss.to(x.scalar_type()), lse, denom, d[0], d[1], d[2]};
}

// forward: {loss ((N) or 0-dim, x's dtype), lse (N), denom (0-dim: the count of kept rows), dx, dw, db}.
// With reduction mean or sum and any need_* flag the loss's gradients come out of the same pass.
inline std::vector<at::Tensor> linear_cross_entropy_forward_impl(const at::Tensor& x, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& bias,
                                                                 const at::Tensor& target, const LceArgs& a,
                                                                 Reduction reduction, const LceKernels& k) {
  const LceRowBuffers r = lce_row_buffers(x, a);
  const bool grad = lce_forward_computes_grad(a, reduction);
  std::vector<at::Tensor> d = grad ? lce_grad_buffers(x, a, k) : std::vector<at::Tensor>(3);
  linear_cross_entropy_chunks(x, weight, bias, target, a, grad ? LceMode::LossAndGrad : LceMode::Loss, k, r.lse,
                              r.rows, r.kept, at::Tensor(), d[0], d[1], d[2]);
  return lce_forward_outputs(x, r.lse, r.rows, r.kept, reduction, d);
}

// The backward's own operands: the incoming gradient and the saved lse, (N) each in the accumulation type.
inline void check_lce_backward_operands(const at::Tensor& grad_loss, const at::Tensor& lse, const at::Tensor& x,
                                        const LceArgs& a, const char* op) {
  const at::ScalarType acc = lce_acc_dtype(x);
  check(grad_loss, "grad_loss", op).same_device(x).dtype(acc).sizes({a.N}).contiguous();
  check(lse, "lse", op).same_device(x).dtype(acc).sizes({a.N}).contiguous();
}

// backward of reduction none: the logits of each chunk are computed again and turned into g (p - y').
inline std::vector<at::Tensor> linear_cross_entropy_backward_impl(const at::Tensor& grad_loss, const at::Tensor& x,
                                                                  const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& bias,
                                                                  const at::Tensor& target, const at::Tensor& lse,
                                                                  const LceArgs& a, const LceKernels& k,
                                                                  const char* op) {
  check_lce_backward_operands(grad_loss, lse, x, a, op);
  std::vector<at::Tensor> d = lce_grad_buffers(x, a, k);
  if (d[0].defined() || d[1].defined() || d[2].defined())
    linear_cross_entropy_chunks(x, weight, bias, target, a, LceMode::GradFromLse, k, lse, at::Tensor(),
                                at::Tensor(), grad_loss, d[0], d[1], d[2]);
  return d;
}

}  // namespace pyengine
