// leaky_relu on the GPU: y = x > 0 ? x : slope * x; dx = dy * (x > 0 ? 1 : slope), from the saved input x.
// Formulas: leaky_relu_forward_math / leaky_relu_backward_math in common/math.h, shared with the CPU kernels;
// the loops (vectorized, grid-stride, any size and alignment) are cuda/elementwise.cuh's.
#include "cuda/elementwise.cuh"
#include "ops.h"

namespace pyengine {
namespace {

struct LeakyReluForward {
  double slope;
  template <typename T> __device__ __forceinline__ T operator()(T x) const {
    return leaky_relu_forward_math(x, static_cast<T>(slope));
  }
};
struct LeakyReluBackward {
  double slope;
  template <typename T> __device__ __forceinline__ T operator()(T dy, T x) const {
    return leaky_relu_backward_math(dy, x, static_cast<T>(slope));
  }
};

}  // namespace

at::Tensor leaky_relu_forward_cuda(const at::Tensor& x, double negative_slope) {
  return cuda::activation_forward(x, "leaky_relu_forward_cuda", LeakyReluForward{negative_slope});
}

at::Tensor leaky_relu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, double negative_slope) {
  return cuda::activation_backward(grad_y, x, "leaky_relu_backward_cuda", FirstOperand::Saved,
                                   LeakyReluBackward{negative_slope});
}

}  // namespace pyengine
