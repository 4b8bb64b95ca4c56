// tanh on the GPU: y = tanh(x); dx = dy * (1 - y^2), from the saved output y.
// Formulas: tanh_forward_math / tanh_backward_math in common/math.h, shared with the CPU kernels; the loops
// (vectorized, grid-stride, any size and alignment) are cuda/elementwise.cuh's.
#include "cuda/elementwise.cuh"
#include "ops.h"

namespace pyengine {
namespace {

struct TanhForward {
  template <typename T> __device__ __forceinline__ T operator()(T x) const { return tanh_forward_math(x); }
};
struct TanhBackward {
  template <typename T> __device__ __forceinline__ T operator()(T dy, T y) const { return tanh_backward_math(dy, y); }
};

}  // namespace

at::Tensor tanh_forward_cuda(const at::Tensor& x) {
  return cuda::activation_forward(x, "tanh_forward_cuda", TanhForward{});
}

at::Tensor tanh_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y) {
  return cuda::activation_backward(grad_y, y, "tanh_backward_cuda", FirstOperand::Grad, TanhBackward{});
}

}  // namespace pyengine
