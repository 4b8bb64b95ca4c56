// mse_loss on the GPU. x (input), y (target): n elements, contiguous, one dtype.
//   l_i = (x_i - y_i)^2, written out (none) or summed on the device (sum, mean; cuda/loss.cuh)
//   dx_i = 2 (x_i - y_i) * g_i;  dy_i = -dx_i     with g_i the incoming gradient (times 1/n for mean)
// Formulas: mse_loss_math / mse_loss_grad_math in common/math.h, shared with the CPU kernels.
// forward_with_grad (sum, mean): the loss reduced as the forward's, and dx for g = 1 written by the same pass.
#include <ATen/Dispatch.h>

#include "cuda/loss.cuh"
#include "ops.h"

namespace pyengine {
namespace {

template <typename scalar_t> struct MseLossAt {
  const scalar_t* x;
  const scalar_t* y;
  __device__ __forceinline__ acc_t<scalar_t> operator()(int64_t i) const {
    return mse_loss_math<acc_t<scalar_t>>(x[i], y[i]);
  }
};

// The loss of element i, which also writes dx[i] for an incoming gradient of 1 (`scale`: 1/n for the mean, else 1):
// launch_loss calls it once per element, so the reduced loss and dx come from one read of the operands.
template <typename scalar_t> struct MseLossWritingGradAt {
  const scalar_t* x;
  const scalar_t* y;
  scalar_t* dx;
  acc_t<scalar_t> scale;
  __device__ __forceinline__ acc_t<scalar_t> operator()(int64_t i) const {
    using acc = acc_t<scalar_t>;
    const LossAndGrad<acc> r = mse_loss_and_grad_math<acc>(x[i], y[i], scale);
    dx[i] = static_cast<scalar_t>(r.grad);
    return r.loss;
  }
};

// dx, dy: n elements each, either may be null (not needed).
template <typename scalar_t>
__global__ void mse_loss_backward_kernel(scalar_t* __restrict__ dx, scalar_t* __restrict__ dy,
                                         const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n,
                                         cuda::LossGrad<scalar_t> grad) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc d = mse_loss_grad_math<acc>(x[i], y[i], grad(i));
    if (dx) dx[i] = static_cast<scalar_t>(d);
    if (dy) dy[i] = static_cast<scalar_t>(-d);
  }
}

void check_operands(const at::Tensor& input, const at::Tensor& target, const char* op) {
  check(input, "input", op).cuda().floating().contiguous();
  check(target, "target", op).same_device(input).same_dtype(input).sizes(input.sizes()).contiguous();
}

}  // namespace

at::Tensor mse_loss_forward_cuda(const at::Tensor& input, const at::Tensor& target, int64_t reduction) {
  check_operands(input, target, "mse_loss_forward_cuda");
  const Reduction red = check_reduction(reduction, "mse_loss_forward_cuda");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_loss_forward_cuda", [&] {
    out = cuda::launch_loss<scalar_t>(input, red,
                                      MseLossAt<scalar_t>{input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>()});
  });
  return out;
}

std::vector<at::Tensor> mse_loss_forward_with_grad_cuda(const at::Tensor& input, const at::Tensor& target,
                                                       int64_t reduction) {
  const char* op = "mse_loss_forward_with_grad_cuda";
  check_operands(input, target, op);
  const Reduction red = check_reduction(reduction, op);
  TORCH_CHECK(red != Reduction::None, op, ": reduction must be mean or sum (1 or 2), got none");
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor loss, grad_input = at::empty_like(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "mse_loss_forward_with_grad_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc scale = red == Reduction::Mean ? acc(1) / static_cast<acc>(input.numel()) : acc(1);
    loss = cuda::launch_loss<scalar_t>(input, red, MseLossWritingGradAt<scalar_t>{
        input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(),
        scale});
  });
  return {loss, grad_input};
}

std::vector<at::Tensor> mse_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& input,
                                               const at::Tensor& target, int64_t reduction, bool need_input,
                                               bool need_target) {
  check_operands(input, target, "mse_loss_backward_cuda");
  const Reduction red = check_reduction(reduction, "mse_loss_backward_cuda");
  check(grad_loss, "grad_loss", "mse_loss_backward_cuda").same_device(input).same_dtype(input).contiguous()
      .sizes(red == Reduction::None ? input.sizes() : at::IntArrayRef{});
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor grad_input = need_input ? at::empty_like(input) : at::Tensor();
  at::Tensor grad_target = need_target ? at::empty_like(input) : at::Tensor();
  const int64_t n = input.numel();
  if (n == 0 || (!need_input && !need_target)) return {grad_input, grad_target};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mse_loss_backward_cuda", [&] {
    mse_loss_backward_kernel<<<cuda::grid_stride_blocks(n, cuda::kLossThreads), cuda::kLossThreads, 0,
                               cuda::current_stream()>>>(
        need_input ? grad_input.data_ptr<scalar_t>() : nullptr, need_target ? grad_target.data_ptr<scalar_t>() : nullptr,
        input.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), n, cuda::loss_grad<scalar_t>(grad_loss, n, red));
    PE_CUDA_CHECK_LAUNCH();
  });
  return {grad_input, grad_target};
}

}  // namespace pyengine
