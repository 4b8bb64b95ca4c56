// Softmax cross-entropy on the CPU. logits x: (N, C, D) contiguous, class stride D; target t: (N, D) int64
// class indices, or y: (N, C, D) class probabilities; weight w: (C). For each row r = (n, d), over classes c:
//   lse  = log(sum_c exp(x_c))                                             saved for the backward, (N, D)
//   loss = (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)       class index t (0 where ignored)
//   loss = sum_c w_c y'_c (lse - x_c),  y' = (1 - eps) y + eps / C          class probabilities
//   dx_c = g ((1 - eps) w_t + eps / C sum w) p_c - g [c == t] (1 - eps) w_t - g eps / C w_c,  p = exp(x - lse)
//   dx_c = g (p_c sum_k w_k y'_k - w_c y'_c)
// g: the incoming gradient, over denom (the kept rows' sum of w_t, or N * D for probabilities) for 'mean'.
// The formulas are in common/math.h. The forward reads each logit once (an online softmax) and keeps only
// lse; the backward reads each once and writes dx: the (N, C) softmax is never stored. D == 1: a row is
// contiguous, vector lanes split its classes and are merged at the end. D > 1: the lanes are positions d,
// a tile of them walked class by class, so every load is contiguous over d.
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>

#include <algorithm>
#include <vector>

#include "common/checks.h"
#include "cpu/allocator.h"
#include "cpu/cross_entropy_rows.h"
#include "ops.h"

namespace pyengine {
namespace {

struct Args {
  int64_t N, C, D, ignore_index;
  Reduction reduction;
  double eps;
};

template <typename scalar_t, Target kTarget>
CrossEntropyCpu<scalar_t, kTarget> make_op(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& w,
                                           const Args& a) {
  using acc = acc_t<scalar_t>;
  acc w_sum = static_cast<acc>(a.C);
  const scalar_t* wp = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
  if (wp) {
    w_sum = 0;
    for (int64_t c = 0; c < a.C; ++c) w_sum += static_cast<acc>(wp[c]);
  }
  const bool prob = kTarget == Target::Prob;
  return {logits.const_data_ptr<scalar_t>(), prob ? nullptr : target.const_data_ptr<int64_t>(),
          prob ? target.const_data_ptr<scalar_t>() : nullptr, wp, a.C, a.D, a.ignore_index,
          static_cast<acc>(a.eps), w_sum};
}

Args check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& target,
                              const c10::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
                              double label_smoothing, const char* op) {
  const Reduction red = check_reduction(reduction, op);
  check(logits, "logits", op).cpu().floating().dim(3).contiguous();
  const int64_t N = logits.size(0), C = logits.size(1), D = logits.size(2);
  if (target.defined() && target.is_floating_point())
    check(target, "target", op).same_device(logits).same_dtype(logits).sizes(logits.sizes()).contiguous();
  else
    check(target, "target", op).same_device(logits).dtype(at::kLong).sizes({N, D}).contiguous();
  if (weight.has_value() && weight->defined())
    check(*weight, "weight", op).same_device(logits).same_dtype(logits).sizes({C});
  TORCH_CHECK(label_smoothing <= 1.0, op, ": label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
  return {N, C, D, ignore_index, red, std::max(label_smoothing, 0.0)};
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

// logits (N, C, D), target (N, D) int64 or (N, C, D), weight (C) -> {loss ((N, D) or 0-dim), lse (N, D), denom}
std::vector<at::Tensor> cross_entropy_forward_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& weight, int64_t ignore_index,
                                                  int64_t reduction, double label_smoothing) {
  const Args a = check_cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing,
                                          "cross_entropy_forward_cpu");
  const bool prob = target.is_floating_point();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor lse = cpu::empty_output({a.N, a.D}, acc_opts);
  at::Tensor denom = at::empty({}, acc_opts);
  at::Tensor loss = a.reduction == Reduction::None ? cpu::empty_output({a.N, a.D}, logits.options())
                                                   : at::empty({}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(prob, a.eps, [&](auto kind) {
      const auto op = make_op<scalar_t, decltype(kind)::value>(logits, target, w, a);
      using Op = std::decay_t<decltype(op)>;
      const int64_t rows = a.N * a.D;
      std::vector<acc> row_loss(static_cast<size_t>(rows)), row_w(static_cast<size_t>(rows));
      acc* lse_p = lse.data_ptr<acc>();
      if (a.D == 1) {
        op.forward_rows(a.N, grain_for(a.C), lse_p, row_loss.data(), row_w.data(), [](int64_t) {});
      } else {
        const int64_t tiles = (a.D + Op::kTile - 1) / Op::kTile;
        at::parallel_for(0, a.N * tiles, grain_for(a.C * Op::kTile), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = i / tiles, d0 = (i % tiles) * Op::kTile, r = n * a.D + d0;
            op.forward_tile(n, d0, std::min(Op::kTile, a.D - d0), lse_p, row_loss.data() + r, row_w.data() + r);
          }
        });
      }
      // Probability targets: torch's mean is NaN for an empty input, even when only C is 0.
      const double den = prob ? static_cast<double>(a.C == 0 ? 0 : rows) : ordered_sum(row_w);
      denom.data_ptr<acc>()[0] = static_cast<acc>(den);
      scalar_t* out = loss.data_ptr<scalar_t>();
      if (a.reduction == Reduction::None) {
        for (int64_t r = 0; r < rows; ++r) out[r] = static_cast<scalar_t>(row_loss[r]);
      } else {
        const double total = ordered_sum(row_loss);
        out[0] = static_cast<scalar_t>(static_cast<acc>(a.reduction == Reduction::Mean ? total / den : total));
      }
    });
  });
  return {loss, lse, denom};
}

// dlogits (N, C, D) = (p - y') * w * grad_loss [/ denom], p = exp(logits - lse)
at::Tensor cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                      const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                      const at::Tensor& denom, int64_t ignore_index, int64_t reduction,
                                      double label_smoothing) {
  const char* name = "cross_entropy_backward_cpu";
  const Args a = check_cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing, name);
  const bool prob = target.is_floating_point();
  check(lse, "lse", name).same_device(logits).dtype(acc_dtype(logits)).sizes({a.N, a.D}).contiguous();
  check(denom, "denom", name).same_device(logits).dtype(acc_dtype(logits)).dim(0);
  auto g_check = check(grad_loss, "grad_loss", name);
  g_check.same_device(logits).same_dtype(logits);
  if (a.reduction == Reduction::None) g_check.sizes({a.N, a.D}).contiguous(); else g_check.dim(0);
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  at::Tensor dx = cpu::empty_output(logits.sizes(), logits.options());
  const bool stream = dx.nbytes() >= (size_t{8} << 20);  // past the caches anyway
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(prob, a.eps, [&](auto kind) {
      const auto op = make_op<scalar_t, decltype(kind)::value>(logits, target, w, a);
      using Op = std::decay_t<decltype(op)>;
      const scalar_t* gp = grad_loss.const_data_ptr<scalar_t>();
      // 'mean' divides g by denom (0 when every row is ignored: then no kept row uses it).
      const acc g_all = a.reduction == Reduction::None ? acc(0)
                        : a.reduction == Reduction::Mean ? static_cast<acc>(gp[0]) / denom.const_data_ptr<acc>()[0]
                                                         : static_cast<acc>(gp[0]);
      const bool per_row = a.reduction == Reduction::None;
      const auto g = [&](int64_t r) { return per_row ? static_cast<acc>(gp[r]) : g_all; };
      const acc* lse_p = lse.const_data_ptr<acc>();
      scalar_t* dx_p = dx.data_ptr<scalar_t>();
      if (a.D == 1) {
        at::parallel_for(0, a.N, grain_for(a.C), [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n) op.backward_row(n, g(n), lse_p[n], dx_p + n * a.C, stream);
        });
      } else {
        const int64_t tiles = (a.D + Op::kTile - 1) / Op::kTile;
        at::parallel_for(0, a.N * tiles, grain_for(a.C * Op::kTile), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t n = i / tiles, d0 = (i % tiles) * Op::kTile;
            op.backward_tile(n, d0, std::min(Op::kTile, a.D - d0), g, lse_p, dx_p);
          }
        });
      }
    });
  });
  return dx;
}

// The training forward of 'mean'/'sum': loss and dlogits = d loss / d logits (for an incoming gradient of 1) in
// one read of the logits. The divisor of 'mean' is summed from the targets first, so the gradient comes out
// scaled; each row is read once from memory for its lse and again from the cache to write its gradient.
// D > 1: the forward, then the backward with a gradient of 1.
std::vector<at::Tensor> cross_entropy_forward_with_grad_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                            const c10::optional<at::Tensor>& weight,
                                                            int64_t ignore_index, int64_t reduction,
                                                            double label_smoothing) {
  const char* name = "cross_entropy_forward_with_grad_cpu";
  const Args a = check_cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing, name);
  TORCH_CHECK(a.reduction != Reduction::None, name, ": reduction must be 1 (mean) or 2 (sum)");
  if (a.D != 1) {
    auto out = cross_entropy_forward_cpu(logits, target, weight, ignore_index, reduction, label_smoothing);
    const at::Tensor one = at::ones({}, logits.options());
    return {out[0], cross_entropy_backward_cpu(one, logits, target, weight, out[1], out[2], ignore_index, reduction,
                                               label_smoothing), out[2]};
  }
  const bool prob = target.is_floating_point();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const auto acc_opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor denom = at::empty({}, acc_opts), loss = at::empty({}, logits.options());
  at::Tensor dx = cpu::empty_output(logits.sizes(), logits.options());
  const bool stream = dx.nbytes() >= (size_t{8} << 20);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_forward_with_grad_cpu",
                                  [&] {
    using acc = acc_t<scalar_t>;
    with_target<scalar_t>(prob, a.eps, [&](auto kind) {
      const auto op = make_op<scalar_t, decltype(kind)::value>(logits, target, w, a);
      const auto rows = static_cast<size_t>(a.N);
      std::vector<acc> row_loss(rows), row_w(rows), lse(rows);
      if (!prob)
        for (int64_t n = 0; n < a.N; ++n) {
          const int64_t t = op.target_of(n);
          row_w[n] = t < 0 ? acc(0) : op.weight(t);
        }
      const double den = prob ? static_cast<double>(a.C == 0 ? 0 : a.N) : ordered_sum(row_w);
      // 'mean' over no kept rows: every row's coefficients are 0 and g is never used.
      const acc g = a.reduction == Reduction::Mean ? static_cast<acc>(1.0 / den) : acc(1);
      scalar_t* dx_p = dx.data_ptr<scalar_t>();
      op.forward_rows(a.N, grain_for(a.C), lse.data(), row_loss.data(), row_w.data(),
                      [&](int64_t n) { op.backward_row(n, g, lse[n], dx_p + n * a.C, stream); });
      denom.data_ptr<acc>()[0] = static_cast<acc>(den);
      const double total = ordered_sum(row_loss);
      loss.data_ptr<scalar_t>()[0] =
          static_cast<scalar_t>(static_cast<acc>(a.reduction == Reduction::Mean ? total / den : total));
    });
  });
  return {loss, dx, denom};
}

}  // namespace pyengine
