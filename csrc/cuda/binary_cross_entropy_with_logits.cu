// binary_cross_entropy_with_logits on the GPU. x (logits), y (targets), w (weight), pw (pos_weight): n elements,
// contiguous, one dtype; w and pw optional (1 when absent).
//   l_i = w_i * [(1 - y_i) x_i + (1 + (pw_i - 1) y_i) softplus(-x_i)]   written out or summed (cuda/loss.cuh)
//   dx_i = w_i * [(1 + (pw_i - 1) y_i) sigmoid(x_i) - pw_i y_i] * g_i
//   dy_i = w_i * [(pw_i - 1) softplus(-x_i) - x_i] * g_i               g_i: incoming gradient (1/n for mean)
// Formulas: bce_with_logits_*_math in common/math.h, shared with the CPU kernels.
// forward_with_grad (sum, mean): the loss reduced as the forward's, and dx for g = 1 written by the same pass.
#include <ATen/Dispatch.h>

#include "cuda/loss.cuh"
#include "ops.h"

namespace pyengine {
namespace {

using OptTensor = c10::optional<at::Tensor>;

// The operands of element i; absent weights read as 1.
template <typename scalar_t> struct BceOperands {
  const scalar_t* x;
  const scalar_t* y;
  const scalar_t* w;
  const scalar_t* pw;
  __device__ __forceinline__ acc_t<scalar_t> weight(int64_t i) const { return w ? acc_t<scalar_t>(w[i]) : 1; }
  __device__ __forceinline__ acc_t<scalar_t> pos_weight(int64_t i) const { return pw ? acc_t<scalar_t>(pw[i]) : 1; }
};

template <typename scalar_t> struct BceLossAt {
  BceOperands<scalar_t> op;
  __device__ __forceinline__ acc_t<scalar_t> operator()(int64_t i) const {
    using acc = acc_t<scalar_t>;
    return bce_with_logits_loss_math<acc>(op.x[i], op.y[i], op.pos_weight(i)) * op.weight(i);
  }
};

// The loss of element i, which also writes dx[i] for an incoming gradient of 1 (`scale`: 1/n for the mean, else 1):
// launch_loss calls it once per element, so the reduced loss and dx come from one read of the operands.
template <typename scalar_t> struct BceLossWritingGradAt {
  BceOperands<scalar_t> op;
  scalar_t* dx;
  acc_t<scalar_t> scale;
  __device__ __forceinline__ acc_t<scalar_t> operator()(int64_t i) const {
    using acc = acc_t<scalar_t>;
    const acc w = op.weight(i);
    const LossAndGrad<acc> r = bce_with_logits_loss_and_grad_math<acc>(op.x[i], op.y[i], op.pos_weight(i));
    dx[i] = static_cast<scalar_t>(r.grad * (w * scale));
    return r.loss * w;
  }
};

// dx, dy: n elements each, either may be null (not needed).
template <typename scalar_t>
__global__ void binary_cross_entropy_with_logits_backward_kernel(scalar_t* __restrict__ dx, scalar_t* __restrict__ dy,
                                                                 BceOperands<scalar_t> op, int64_t n,
                                                                 cuda::LossGrad<scalar_t> grad) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc x = op.x[i], pw = op.pos_weight(i), m = op.weight(i) * grad(i);
    if (dx) dx[i] = static_cast<scalar_t>(bce_with_logits_grad_input_math<acc>(x, acc(op.y[i]), pw) * m);
    if (dy) dy[i] = static_cast<scalar_t>(bce_with_logits_grad_target_math<acc>(x, pw) * m);
  }
}

const at::Tensor* present(const OptTensor& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

template <typename T> const T* data_or_null(const at::Tensor* t) { return t ? t->const_data_ptr<T>() : nullptr; }

void check_operands(const at::Tensor& input, const at::Tensor& target, const at::Tensor* weight,
                    const at::Tensor* pos_weight, const char* op) {
  check(input, "input", op).cuda().floating().contiguous();
  check(target, "target", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
  if (weight) check(*weight, "weight", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
  if (pos_weight)
    check(*pos_weight, "pos_weight", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
}

template <typename scalar_t>
BceOperands<scalar_t> operands(const at::Tensor& input, const at::Tensor& target, const at::Tensor* weight,
                               const at::Tensor* pos_weight) {
  return {input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
          data_or_null<scalar_t>(pos_weight)};
}

}  // namespace

at::Tensor binary_cross_entropy_with_logits_forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                         const OptTensor& weight_opt, const OptTensor& pos_weight_opt,
                                                         int64_t reduction) {
  const char* op = "binary_cross_entropy_with_logits_forward_cuda";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_forward_cuda", [&] {
    out = cuda::launch_loss<scalar_t>(input, red, BceLossAt<scalar_t>{operands<scalar_t>(input, target, weight, pos_weight)});
  });
  return out;
}

std::vector<at::Tensor> binary_cross_entropy_with_logits_forward_with_grad_cuda(
    const at::Tensor& input, const at::Tensor& target, const OptTensor& weight_opt, const OptTensor& pos_weight_opt,
    int64_t reduction) {
  const char* op = "binary_cross_entropy_with_logits_forward_with_grad_cuda";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  TORCH_CHECK(red != Reduction::None, op, ": reduction must be mean or sum (1 or 2), got none");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, grad_input = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_forward_with_grad", [&] {
    using acc = acc_t<scalar_t>;
    const acc scale = red == Reduction::Mean ? acc(1) / static_cast<acc>(input.numel()) : acc(1);
    loss = cuda::launch_loss<scalar_t>(input, red, BceLossWritingGradAt<scalar_t>{
        operands<scalar_t>(input, target, weight, pos_weight), grad_input.data_ptr<scalar_t>(), scale});
  });
  return {loss, grad_input};
}

std::vector<at::Tensor> binary_cross_entropy_with_logits_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& target, const OptTensor& weight_opt,
    const OptTensor& pos_weight_opt, int64_t reduction, bool need_input, bool need_target) {
  const char* op = "binary_cross_entropy_with_logits_backward_cuda";
  const at::Tensor *weight = present(weight_opt), *pos_weight = present(pos_weight_opt);
  check_operands(input, target, weight, pos_weight, op);
  const Reduction red = check_reduction(reduction, op);
  check(grad_loss, "grad_loss", op).same_device(input).same_dtype(input).contiguous()
      .sizes(red == Reduction::None ? input.sizes() : at::IntArrayRef{});
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = need_input ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_target = need_target ? at::empty_like(input) : at::Tensor();
  const int64_t n = input.numel();
  if (n == 0 || (!need_input && !need_target)) return {grad_input, grad_target};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "binary_cross_entropy_with_logits_backward_cuda", [&] {
    binary_cross_entropy_with_logits_backward_kernel<<<cuda::grid_stride_blocks(n, cuda::kLossThreads),
                                                       cuda::kLossThreads, 0, cuda::current_stream()>>>(
        need_input ? grad_input.data_ptr<scalar_t>() : nullptr, need_target ? grad_target.data_ptr<scalar_t>() : nullptr,
        operands<scalar_t>(input, target, weight, pos_weight), n, cuda::loss_grad<scalar_t>(grad_loss, n, red));
    PE_CUDA_CHECK_LAUNCH();
  });
  return {grad_input, grad_target};
}

}  // namespace pyengine
