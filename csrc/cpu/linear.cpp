// linear on the CPU. x: (M, K), weight: (N, K), bias: (N)
//   y  = x @ weight^T + bias      bias rows written by us, then one BLAS GEMM accumulates onto them (beta = 1)
//   dx = dy @ weight               (M, N) @ (N, K)   BLAS
//   dW = dy^T @ x                  (N, M) @ (M, K)   BLAS
//   db = sum over rows of dy       (N)               our column reduction (cpu/reduce.h)
#include "cpu/vec_math.h"  // first: it silences a gcc false positive in the torch headers it includes

#include <ATen/Dispatch.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <cstring>

#include "common/checks.h"
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

}  // namespace

at::Tensor linear_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_linear_operands(x, weight, "linear_forward_cpu");
  const int64_t M = x.size(0), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (!bias.has_value() || !bias->defined()) return at::mm_out(y, x, weight.t());

  check(*bias, "bias", "linear_forward_cpu").same_device(x).same_dtype(x).sizes({N});
  const at::Tensor b = bias->contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_forward_cpu", [&] {
    const scalar_t* src = b.const_data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(dst + r * N, src, sizeof(scalar_t) * N);
    });
  });
  return at::addmm_out(y, y, x, weight.t());
}

std::vector<at::Tensor> linear_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight,
                                            bool need_x, bool need_weight, bool need_bias) {
  check_linear_operands(x, weight, "linear_backward_cpu");
  check(grad_y_in, "grad_y", "linear_backward_cpu").same_device(x).same_dtype(x).sizes({x.size(0), weight.size(0)});
  const at::Tensor grad_y = grad_y_in.contiguous();
  at::Tensor grad_x, grad_weight, grad_bias;
  if (need_x) grad_x = at::mm(grad_y, weight);
  if (need_weight) grad_weight = at::mm(grad_y.t(), x);
  if (need_bias) {
    const int64_t M = grad_y.size(0), N = grad_y.size(1);
    grad_bias = at::empty({N}, grad_y.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "linear_backward_cpu", [&] {
      cpu::sum_rows(grad_bias.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), M, N, N, acc_t<scalar_t>(1));
    });
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace pyengine
