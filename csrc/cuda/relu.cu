// relu on the GPU: y = max(x, 0) (NaN stays NaN); dx = dy * (y > 0), from the saved output y.
// Formulas: relu_forward_math / relu_backward_math in common/math.h, shared with the CPU kernels; the loops
// (vectorized, grid-stride, any size and alignment) are cuda/elementwise.cuh's.
#include "cuda/elementwise.cuh"
#include "ops.h"

namespace pyengine {
namespace {

struct ReluForward {
  template <typename T> __device__ __forceinline__ T operator()(T x) const { return relu_forward_math(x); }
};
struct ReluBackward {
  template <typename T> __device__ __forceinline__ T operator()(T dy, T y) const { return relu_backward_math(dy, y); }
};

}  // namespace

at::Tensor relu_forward_cuda(const at::Tensor& x) {
  return cuda::activation_forward(x, "relu_forward_cuda", ReluForward{});
}

at::Tensor relu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& y) {
  return cuda::activation_backward(grad_y, y, "relu_backward_cuda", FirstOperand::Saved, ReluBackward{});
}

}  // namespace pyengine
