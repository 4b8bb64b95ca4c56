// sigmoid on the CPU: y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y), from the saved output y.
// The formulas are sigmoid_forward_math / sigmoid_backward_math in common/math.h, shared with the CUDA kernels.
#include "cpu/elementwise.h"
#include "ops.h"

namespace pyengine {

at::Tensor sigmoid_forward_cpu(const at::Tensor& x) {
  return cpu::activation_forward(x, "sigmoid_forward_cpu", [](auto v) { return sigmoid_forward_math(v); });
}

at::Tensor sigmoid_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y) {
  return cpu::activation_backward(grad_y, y, "sigmoid_backward_cpu", FirstOperand::Grad,
                                  [](auto dy, auto yv) { return sigmoid_backward_math(dy, yv); });
}

}  // namespace pyengine
