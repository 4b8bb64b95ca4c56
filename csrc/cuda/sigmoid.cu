// sigmoid on the GPU: y = 1 / (1 + e^-x); dx = dy * y * (1 - y), from the saved output y.
// Formulas: sigmoid_forward_math / sigmoid_backward_math in common/math.h, shared with the CPU kernels; the loops
// (vectorized, grid-stride, any size and alignment) are cuda/elementwise.cuh's.
#include "cuda/elementwise.cuh"
#include "ops.h"

namespace pyengine {
namespace {

struct SigmoidForward {
  template <typename T> __device__ __forceinline__ T operator()(T x) const { return sigmoid_forward_math(x); }
};
struct SigmoidBackward {
  template <typename T> __device__ __forceinline__ T operator()(T dy, T y) const { return sigmoid_backward_math(dy, y); }
};

}  // namespace

at::Tensor sigmoid_forward_cuda(const at::Tensor& x) {
  return cuda::activation_forward(x, "sigmoid_forward_cuda", SigmoidForward{});
}

at::Tensor sigmoid_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y) {
  return cuda::activation_backward(grad_y, y, "sigmoid_backward_cuda", FirstOperand::Grad, SigmoidBackward{});
}

}  // namespace pyengine
