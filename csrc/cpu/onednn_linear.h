// torch's own oneDNN linear on the CPU (mkldnn::_linear_pointwise, what torch.compile's CPU code calls):
//   y (M, N) = act(x (M, K) weight^T + bias)
// with the bias and activation applied to the float32 sums as post-ops and y rounded to the dtype once. Its
// products run faster than MKL's sgemm behind at::mm for the same x W^T on AMD's Zen 4: float32 1.05-1.2x on square
// layers, 1.4-1.5x for a short chunk of rows against a tall weight (linear_cross_entropy's logits; numbers in
// benchmarks/NOTES.md, "oneDNN for the x W^T products"); on an Intel Xeon they tie on large layers and oneDNN is
// 1.05-1.08x faster for that chunk; bfloat16 at the CPU's native rate.
// Used where it runs natively: float32 products of at least onednn_float_min_macs() (its fixed cost, ~10 us a call,
// loses to MKL's below: 64x64->32 took 16 us against 6), and float16/bfloat16 where the CPU multiplies them fast
// (common/half_gemm.h), while torch.backends.mkldnn is enabled (torch's own switch turns this path off too).
// Returns an undefined tensor where it does not run (float64, an empty operand, a torch without the operator),
// and the caller takes its BLAS path. oneDNN may split a product's sums by the thread count: results can differ
// in the last bit between thread counts, as torch's own do.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <vector>

#include "common/activation.h"
#include "common/half_gemm.h"

namespace pyengine {
namespace cpu {

// Where the two meet for float32 (M x K -> N multiply-adds, two threads). oneDNN's fixed cost is ~10 us a call on
// both CPUs measured; what differs is how fast MKL's sgemm runs beside it:
//   AMD EPYC Zen 4: 128x256->256 (8.4M), 174 us either way, oneDNN 1.05-1.2x faster above;
//   Intel Xeon (AVX-512, no AMX): 512x256->256 (33.5M), 232 against 229 us; at 8.4M oneDNN took 85-87 us against
//   MKL's 74, at 16.8M 130-132 against 123-124.
inline int64_t onednn_float_min_macs() {
  static const int64_t macs = cpu_is_intel() ? int64_t(1) << 25 : int64_t(1) << 23;
  return macs;
}

inline bool onednn_linear_runs(const at::Tensor& x, int64_t M, int64_t N, int64_t K) {
  if (M == 0 || N == 0 || K == 0 || !x.is_cpu() || !at::globalContext().userEnabledMkldnn()) return false;
  const at::ScalarType t = x.scalar_type();
  if (t == at::kFloat) return M * N * K >= onednn_float_min_macs();
  return (t == at::kBFloat16 || t == at::kHalf) && fast_half_gemm(x) && cpu_fast_half(t);
}

inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                Activation act = Activation::kNone) {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!op.has_value() || !onednn_linear_runs(x, x.size(0), weight.size(0), x.size(1))) return at::Tensor();
  const char* attr = act == Activation::kRelu ? "relu" : act == Activation::kSigmoid ? "sigmoid" : "none";
  // x and weight may be strided; a strided bias is read as if it were contiguous (torch 2.14)
  const c10::IValue b = bias.has_value() && bias->defined() ? c10::IValue(bias->contiguous()) : c10::IValue();
  std::vector<c10::IValue> stack{x, weight, b, std::string(attr), c10::List<c10::optional<at::Scalar>>(),
                                 c10::IValue()};
  op->callBoxed(stack);
  return stack[0].toTensor();
}

}  // namespace cpu
}  // namespace pyengine
