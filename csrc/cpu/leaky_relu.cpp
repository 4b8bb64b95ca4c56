// leaky_relu on the CPU: y = x > 0 ? x : slope * x; dx = dy * (x > 0 ? 1 : slope), from the saved input x.
// The formulas are leaky_relu_forward_math / leaky_relu_backward_math in common/math.h, shared with CUDA.
#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {

at::Tensor leaky_relu_forward_cpu(const at::Tensor& x, double negative_slope) {
  return cpu::activation_forward(x, "leaky_relu_forward_cpu", [negative_slope](auto v) {
    return leaky_relu_forward_math(v, decltype(v)(negative_slope));
  });
}

at::Tensor leaky_relu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x, double negative_slope) {
  return cpu::activation_backward(grad_y, x, "leaky_relu_backward_cpu", FirstOperand::Saved,
                                   [negative_slope](auto dy, auto xv) {
                                     return leaky_relu_backward_math(dy, xv, decltype(dy)(negative_slope));
                                   });
}

}  // namespace pyengine
